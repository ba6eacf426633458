"""Never lose a run: hard crashes at any point, broken checkpoints, signals, a full disk, hostile files."""
import errno
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
import yaml

from dinokit.cli import main as cli_main
from dinokit.models.weights import safe_load
from dinokit.train.checkpoint import CheckpointWriteError, load_latest
from dinokit.train.config import Config, resolve
from dinokit.train.loop import train
from test_loop import TINY, write_fmnist_pngs
from test_weights import WritesAFile, tiny_vit

STEPS = 12  # TINY on 48 images: 6 steps per epoch, 2 epochs, a checkpoint every 2 steps


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_fmnist_pngs(tmp_path_factory.mktemp("fm"), "train", 48)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """The final teacher of an uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(Config(**TINY, data=str(folder)).validate(), run, progress=False)
    return safe_load(run / "checkpoint.pt")["teacher"]


def assert_same_teacher(run_dir, reference):
    teacher = safe_load(run_dir / "checkpoint.pt")["teacher"]
    assert teacher.keys() == reference.keys()
    for k in reference:
        assert torch.equal(teacher[k], reference[k]), k


def step_of(path) -> int:
    return safe_load(path)["dinokit"]["step"]


def train_args(folder, run, config_path, *extra):
    return [sys.executable, "-m", "dinokit", "train", "--data", str(folder), "--out", str(run),
            "--config", str(config_path), "--no-progress", *extra]


def tiny_config(tmp_path, **changes):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


def run_cli(args, kill_at=None):
    env = dict(os.environ)  # the same thread count as the reference run in this process: same rounding
    env.pop("DINOKIT_TEST_KILL_AT", None)
    if kill_at:
        env["DINOKIT_TEST_KILL_AT"] = kill_at  # the test hook in dinokit.train.checkpoint.crash_for_tests
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def test_sigkill_anywhere_then_resume_is_bit_identical(folder, tmp_path, reference):
    run, config = tmp_path / "run", tiny_config(tmp_path)
    r = run_cli(train_args(folder, run, config), kill_at="step:3")  # mid-step: after the update, before the EMA
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert step_of(run / "checkpoint.pt") == 2

    r = run_cli(train_args(folder, run, config, "--resume"), kill_at="write:6")  # half-way through a checkpoint
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "resumed from step 2" in r.stderr
    assert (run / "checkpoint.pt.new.tmp").stat().st_size > 0  # the half-written file
    assert step_of(run / "checkpoint.pt") == 4 and step_of(run / "checkpoint.prev.pt") == 2

    r = run_cli(train_args(folder, run, config, "--resume"), kill_at="rename:8")  # between the two renames
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (run / "checkpoint.pt").exists() and step_of(run / "checkpoint.pt.new") == 8

    r = run_cli(train_args(folder, run, config, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "resumed from step 8" in r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["step"] == STEPS
    assert_same_teacher(run, reference)
    assert not (run / "checkpoint.pt.new").exists() and not (run / "checkpoint.pt.new.tmp").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # steps run twice are logged once


def test_the_same_command_requeued_after_kills_ends_where_an_uninterrupted_run_does(folder, tmp_path):
    """--max-steps is the run's total, as in Hugging Face's Trainer and Lightning: a preempted job requeued with
    the very same command line (--resume included, from the first launch on) ends at the same step, with the
    same weights as a run that was never stopped."""
    config = tiny_config(tmp_path)
    straight = tmp_path / "straight"
    assert run_cli(train_args(folder, straight, config, "--max-steps", "10")).returncode == 0
    run = tmp_path / "requeued"
    command = train_args(folder, run, config, "--resume", "--max-steps", "10")  # never changes
    kills = ["step:3", "write:6", "step:8"]  # a kill mid-step, mid-checkpoint, mid-step again
    for attempt in range(len(kills) + 1):
        r = run_cli(command, kill_at=kills[attempt] if attempt < len(kills) else None)
        if r.returncode == 0:
            break
        assert r.returncode == -signal.SIGKILL, r.stderr
    assert attempt == len(kills) and r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["step"] == 10
    assert_same_teacher(run, safe_load(straight / "checkpoint.pt")["teacher"])
    again = run_cli(command)  # requeued once more after it finished: nothing left to do, nothing changes
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["step"] == 10
    assert_same_teacher(run, safe_load(straight / "checkpoint.pt")["teacher"])


def flip_a_byte(data: bytes) -> bytes:
    """One bit pattern changed in the middle of the largest tensor's bytes: torch.load alone would not notice.
    (Found through the zip directory: the middle of the file may fall in alignment padding.)"""
    import io
    import zipfile
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data = bytearray(data)
    data[start + info.file_size // 2] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("damage", ["truncated", "bit-flip"])
def test_broken_latest_checkpoint_falls_back_to_the_previous(folder, tmp_path, reference, capsys, damage):
    cfg, run = Config(**TINY, data=str(folder)).validate(), tmp_path / "run"
    train(cfg, run, max_steps=6, progress=False)  # checkpoint.pt: step 6; checkpoint.prev.pt: step 4
    latest = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(latest[: len(latest) // 2] if damage == "truncated" else flip_a_byte(latest))
    (run / "checkpoint.pt.new").write_bytes(latest[:1000])  # a corrupt leftover, newer still
    capsys.readouterr()
    summary = train(cfg, run, resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoint.pt.new'} is unusable" in err
    assert f"checkpoint {run / 'checkpoint.pt'} is unusable" in err
    assert ("fails its checksum" in err) == (damage == "bit-flip")
    assert "resumed from step 4" in err
    assert summary["step"] == STEPS
    assert_same_teacher(run, reference)


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(folder, tmp_path):
    cfg, run = Config(**TINY, data=str(folder)).validate(), tmp_path / "run"
    train(cfg, run, max_steps=2, progress=False)
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="no usable checkpoint.*checkpoint.pt"):
        train(cfg, run, resume=True, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == b""  # left for the user to look at


class FillsUp:
    """A file on a disk with `room` bytes left: then every write fails with ENOSPC."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(folder, tmp_path, monkeypatch, capsys):
    run, config = tmp_path / "run", tiny_config(tmp_path)
    cmd = ["train", "--data", str(folder), "--out", str(run), "--config", str(config), "--no-progress"]
    assert cli_main([*cmd, "--max-steps", "2"]) == 0
    before = (run / "checkpoint.pt").read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, FillsUp(f, 20_000)))  # full half-way
    capsys.readouterr()
    assert cli_main([*cmd, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 4" in err and "no space left on the device" in err
    assert "previous checkpoint is kept" in err and str(run) in err
    assert "Traceback" not in err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint.pt"]  # no temporary file left
    assert load_latest(run)["dinokit"]["step"] == 2
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run goes on
    assert cli_main([*cmd, "--resume", "--max-steps", "4"]) == 0
    assert step_of(run / "checkpoint.pt") == 4


def test_disk_full_on_a_real_small_file_system(folder, tmp_path):
    """The same with a real ENOSPC from the kernel: a small tmpfs (needs root; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        cfg, run = Config(**TINY, data=str(folder)).validate(), mount / "run"
        train(cfg, run, max_steps=2, progress=False)
        size = (run / "checkpoint.pt").stat().st_size
        free = shutil.disk_usage(mount).free
        with open(mount / "filler", "wb") as f:  # leave room for the logs, not for another checkpoint
            f.write(b"\0" * max(0, free - size // 2))
        with pytest.raises(CheckpointWriteError, match="no space left on the device"):
            train(cfg, run, resume=True, progress=False)
        assert load_latest(run)["dinokit"]["step"] == 2
        assert not (run / "checkpoint.pt.new.tmp").exists()
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def wait_for_metrics(run, lines, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run logged too few steps in time")


def test_sigterm_saves_and_exits_cleanly_then_resumes(folder, tmp_path):
    run, config = tmp_path / "run", tiny_config(tmp_path, epochs=100, save_every_steps=1000)
    env = dict(os.environ)  # the same thread count as the reference run in this process: same rounding
    proc = subprocess.Popen(train_args(folder, run, config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    wait_for_metrics(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM: saving a checkpoint, then stopping" in err
    summary = json.loads(out.splitlines()[-1])
    assert summary["stopped_by_signal"] and 3 <= summary["step"] < summary["total_steps"]
    assert step_of(run / "checkpoint.pt") == summary["step"]  # saved where it stopped, not at a save point
    r = run_cli(train_args(folder, run, config, "--resume", "--max-steps", str(summary["step"] + 2)))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["step"] == summary["step"] + 2


def test_second_signal_exits_at_once(tmp_path):
    script = (
        "import os, signal, time\n"
        "from dinokit.train.loop import StopRequested\n"
        "with StopRequested() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert stop.requested\n"
        "    print('first signal: asked to stop', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "    print('still running')\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout == "first signal: asked to stop\n"
    assert r.returncode == 128 + signal.SIGTERM
    assert "SIGINT: saving a checkpoint" in r.stderr


def pickled_trap(path, victim, how):
    payload = {"student": tiny_vit().state_dict(), "teacher": {}, "optimizer": {}, "dino_loss": {},
               "dinokit": {"step": 1}, "trap": WritesAFile(victim)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.pt.new", "checkpoint.prev.pt"])
def test_resume_refuses_a_checkpoint_that_would_run_code(folder, tmp_path, capsys, how, name):
    run, victim = tmp_path / "run", tmp_path / "created-by-unpickling"
    run.mkdir()
    if name != "checkpoint.pt":
        (run / "checkpoint.pt").write_bytes(b"truncated")  # broken: the malicious one is tried next
    pickled_trap(run / name, victim, how)
    code = cli_main(["train", "--data", str(folder), "--out", str(run), "--config", str(tiny_config(tmp_path)),
                     "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"refused to load {run / name}" in err and "io.open" in err and "Nothing from it was executed" in err
    assert not victim.exists()
    assert not (run / "metrics.jsonl").exists()  # refused before anything ran


def files_under(root):
    return {p for p in root.rglob("*") if p.is_file()}


def test_nothing_is_written_outside_the_run_folder(folder, tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    (data / "class0" / "broken.png").write_bytes(b"not a png")  # skipped.txt gets written too
    before = files_under(tmp_path)
    run = tmp_path / "run"
    train(Config(**{**TINY, "keep_every_epochs": 1}, data=str(data)).validate(), run, progress=False)
    written = files_under(tmp_path) - before
    assert all(p.is_relative_to(run) for p in written), sorted(written)
    assert {"checkpoint0001.pt", "checkpoint0002.pt", "skipped.txt"} <= {p.name for p in written}

    # Config keys hold no output paths; values that are not of a key's type are refused.
    for bad, message in [({"out": "/tmp/elsewhere"}, "unknown config key 'out'"),
                         ({"run_dir": "../elsewhere"}, "unknown config key 'run_dir'"),
                         ({"keep_every_epochs": "../../elsewhere"}, "keep_every_epochs must be int")]:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=message):
            resolve(file=str(tmp_path / "bad.yaml"))
    # A checkpoint's saved configuration is checked the same way before it is used.
    ckpt = safe_load(run / "checkpoint.pt")
    ckpt["dinokit"]["config"]["out"] = str(tmp_path / "elsewhere")
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="unknown config key 'out'"):
        train(Config(**TINY, data=str(data)).validate(), run, resume=True, progress=False)
    assert not (tmp_path / "elsewhere").exists()
