"""Data-parallel training in 2 CPU processes (Gloo), launched with torchrun the way a user would, against
the same training in 1 process: same global batch, same seed, so the same teacher."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dinokit.cli import main as cli_main
from dinokit.models.weights import safe_load
from dinokit.train.config import Config
from dinokit.train.loop import train

from test_loop import TINY, write_fmnist_pngs

# Drop path draws its masks from each process's own RNG, so 1 and 2 processes would drop different paths:
# off here, which makes the two set-ups compute the same thing up to float rounding.
CONFIG = {**TINY, "drop_path_rate": 0.0}  # global batch 8, 6 steps per epoch on 48 images, 12 in all
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = write_fmnist_pngs(root / "data", "train", 48)
    (root / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    # The reference: one process, at step 6 and at the end (step 12).
    cfg = Config(**CONFIG, data=str(data)).validate()
    train(cfg, root / "one", max_steps=6, progress=False)
    shutil.copytree(root / "one", root / "one@6")
    train(cfg, root / "one", resume=True, progress=False)
    return root


def torchrun(root, out, *args, env=None, launcher=TORCHRUN):
    cmd = [*launcher, "-m", "dinokit", "train", "--data", str(root / "data"), "--out", str(out),
           "--config", str(root / "tiny.yaml"), "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_close(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max())


def run_files(run_dir: Path) -> list:
    """The files of a run folder; TensorBoard's are named after their host and process id: counted instead."""
    return sorted(re.sub(r"events\.out\.tfevents\..*", "events", str(p.relative_to(run_dir)))
                  for p in run_dir.rglob("*"))


@pytest.fixture(scope="module")
def ddp_run(setup):
    """The DDP run: 2 processes, 6 steps."""
    r = torchrun(setup, setup / "two", "--max-steps", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_processes_train_like_one(setup, ddp_run):
    r = ddp_run
    one, two = safe_load(setup / "one@6" / "checkpoint.pt"), safe_load(setup / "two" / "checkpoint.pt")
    assert two["dinokit"]["step"] == 6
    assert_close(one["teacher"], two["teacher"])
    assert_close(one["dino_loss"], two["dino_loss"])  # the center: reduced over both processes
    # Logged metrics are reduced over the processes: the same numbers as one process's.
    rows1 = [json.loads(x) for x in (setup / "one@6" / "metrics.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (setup / "two" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "teacher_entropy", "batch_entropy", "kl", "center_norm", "lr"):
        assert [r[key] for r in rows2] == pytest.approx([r[key] for r in rows1], abs=1e-4), key
    # Only rank 0 writes: the run folder holds what a one-process run's holds, and one summary is printed.
    assert run_files(setup / "two") == run_files(setup / "one@6")
    assert r.stdout.count('"step": 6') == 1
    config = yaml.safe_load((setup / "two" / "config.yaml").read_text())
    assert config["resolved"]["world_size"] == 2 and config["batch_size"] == 8  # the global batch


def test_killed_two_process_run_resumes_in_one_process(setup):
    # Launched by `dinokit train --nproc 2`; both processes are SIGKILLed midway through step 5, after
    # the checkpoint of step 4.
    r = torchrun(setup, setup / "killed", "--nproc", "2", env={"DINOKIT_TEST_KILL_AT": "step:5"},
                 launcher=[sys.executable])
    assert r.returncode != 0
    assert safe_load(setup / "killed" / "checkpoint.pt")["dinokit"]["step"] == 4
    assert cli_main(["train", "--data", str(setup / "data"), "--out", str(setup / "killed"),
                     "--config", str(setup / "tiny.yaml"), "--resume", "--no-progress"]) == 0
    done = safe_load(setup / "killed" / "checkpoint.pt")
    assert done["dinokit"]["step"] == done["dinokit"]["total_steps"] == 12
    # The same global batches in the same order: it ends where one process alone ends.
    assert_close(done["teacher"], safe_load(setup / "one" / "checkpoint.pt")["teacher"])


def test_fsdp_matches_ddp_and_its_checkpoint_loads_anywhere(setup, ddp_run):
    # Student and teacher sharded over 2 processes; the EMA runs shard by shard.
    r = torchrun(setup, setup / "fsdp", "--max-steps", "6", "--set", "fsdp=true")
    assert r.returncode == 0, r.stderr[-3000:]
    fsdp, ddp = safe_load(setup / "fsdp" / "checkpoint.pt"), safe_load(setup / "two" / "checkpoint.pt")
    assert fsdp["dinokit"]["step"] == 6
    for key in ("teacher", "student", "dino_loss"):  # gathered whole: the same keys and shapes as DDP's
        assert_close(fsdp[key], ddp[key])
    for i, state in ddp["optimizer"]["state"].items():
        assert_close(fsdp["optimizer"]["state"][i], state)
    # Resumed sharded in 2 processes (the full checkpoint split into shards) to step 9, then in 1 process
    # (the gathered checkpoint as it is) to the end: where one process alone ends.
    r = torchrun(setup, setup / "fsdp", "--max-steps", "9", "--resume", "--set", "fsdp=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert safe_load(setup / "fsdp" / "checkpoint.pt")["dinokit"]["step"] == 9
    assert yaml.safe_load((setup / "fsdp" / "config.yaml").read_text())["fsdp"] is True
    train(Config(**CONFIG, data=str(setup / "data")).validate(), setup / "fsdp", resume=True, progress=False)
    done = safe_load(setup / "fsdp" / "checkpoint.pt")
    assert done["dinokit"]["step"] == 12
    assert_close(done["teacher"], safe_load(setup / "one" / "checkpoint.pt")["teacher"])
