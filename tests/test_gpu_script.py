"""bench/gpu.sh, the one command that measures issue 15 on a GPU machine, runs here at toy sizes (`--dry-run`,
CPU) so that it cannot rot; its report's parsers are checked on known inputs."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_report  # noqa: E402

from dinokit.data.sources import FASHION_MNIST_DIR  # noqa: E402
from dinokit.train import bench  # noqa: E402

# A stand-in for the paper's main_dino.py: its argument parser lists torch.hub models (which needs the network,
# so this one refuses) and it prints what the paper's MetricLogger prints, at 0.5 s and 0.1 s of data per step.
FAKE_MAIN_DINO = '''
import argparse, types

def offline(name):
    raise RuntimeError("torch.hub needs the network")

torch = types.SimpleNamespace(hub=types.SimpleNamespace(list=offline))
torchvision_archs = ["resnet50"]
p = argparse.ArgumentParser()
p.add_argument("--arch", choices=["vit_small"] + torchvision_archs + torch.hub.list("facebookresearch/xcit:main"))
for flag in ("--patch_size", "--batch_size_per_gpu", "--local_crops_number", "--epochs", "--warmup_epochs",
             "--num_workers", "--saveckp_freq"):
    p.add_argument(flag, type=int)
p.add_argument("--data_path")
p.add_argument("--output_dir")
a = p.parse_args()
n = 32
for e in range(a.epochs):
    for i in list(range(0, n, 10)) + [n - 1]:
        print(f"Epoch: [{e}/{a.epochs}]  [{i:2d}/{n}]  eta: 0:00:01  loss: 9.1 (9.2)  lr: 0.0001 (0.0001)  "
              f"wd: 0.04 (0.04)  time: {0.5 + (i < 20) * e:.6f}  data: 0.100000  max mem: 1000")
    print(f"Epoch: [{e}/{a.epochs}] Total time: 0:00:17 ({0.55 + e:.6f} s / it)")
'''


def test_dry_run_measures_every_part_and_writes_one_report(tmp_path):
    ref = tmp_path / "dino"
    ref.mkdir()
    (ref / "main_dino.py").write_text(FAKE_MAIN_DINO)
    env = {**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "work"), "REF_DINO": str(ref)}
    env.pop("OUT", None)
    start = time.perf_counter()
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "gpu-report.json").read_text())
    failed = {k: v for k, v in report["parts"].items() if v.get("exit_code")}
    fmnist_here = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
    assert set(failed) <= ({"train-fmnist"} if not fmnist_here else set()), failed
    ran = {"jpegs", "tests", "train-device", "train-workers", "bench-eager", "ref-prepare", "ref", "train-fp32"}
    assert ran <= set(report["parts"])
    assert report["tests"]["passed"] == 2 and report["tests"]["failures"] == 0
    for decode in ("device", "workers"):
        run = report["train"][decode]
        assert run["steps"] == 6 and run["decode"] == decode and run["batch_size"] == 8
        assert run["steady_images_per_s"] > 0 and 0 <= run["steady_data_wait"] < 1
        assert [w["step"] for w in run["windows"]] == [2, 4, 6]
        assert [w["step"] for w in run["epoch_start_windows"]] == [4]  # 3 steps an epoch (24 files, batch 8)
    # the fp32 twin of the "workers" run: the dry run is fp32 throughout, so the same seed gives the same losses
    track = report["precision_tracking"]
    assert track["steps"] == 3 and track["max_relative_gap"] == 0.0 and track["last_step"] == 6
    assert report["bench"]["eager"]["images_per_s"] > 0 and report["bench"]["eager"]["mfu_spec"] is None
    if fmnist_here:
        assert report["train"]["fmnist"]["steps"] == 6 and report["train"]["fmnist"]["batch_size"] == 64
    # the paper's code, read from its printout (the stand-in's numbers: steady 0.5 s/it in epoch 1, 1.55 whole)
    assert report["reference"]["steady_s_per_it"] == 0.5 and report["reference"]["epochs_done"] == 2
    assert report["reference"]["steady_images_per_s"] == 8 / 0.5
    assert report["reference"]["whole_epoch_images_per_s"] == pytest.approx(8 / 1.55)
    assert report["machine"]["torch"] == torch.__version__
    assert "paper main_dino.py" in done.stdout and "dinokit device" in done.stdout
    assert not (tmp_path / "out" / "runs" / "device" / "checkpoint.pt").exists()  # big files stay in WORK
    assert seconds < 150, seconds  # about 40 s on a 2-core CPU; generous for a loaded machine


def write_run(run: Path, rows: list[dict], per_epoch: int, batch: int):
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text(yaml.safe_dump({"batch_size": batch, "num_workers": 2, "resolved": {
        "steps_per_epoch": per_epoch, "decode": "device", "device": "cuda", "precision": "bf16"}}))


def test_train_summary_reads_the_runs_own_windows(tmp_path):
    # windows of 10 steps, 25 steps an epoch: epochs start inside the windows ending at 30 and 60 (and 50)
    speeds = [100, 1000, 990, 400, 1010, 500, 450]
    rows = [{"step": 10 * (k + 1), "images_per_s": v, "data_wait": 0.5 if v < 600 else 0.02, "loss": 9.0,
             "elapsed_s": 5.0 + 2.56 * k} for k, v in enumerate(speeds)]
    write_run(tmp_path / "run", rows, per_epoch=25, batch=256)
    s = gpu_report.train_summary(tmp_path / "run")
    assert s["steady_images_per_s"] == 745  # median of the windows after the first (start-up)
    assert s["steady_data_wait"] == pytest.approx((0.02 * 3 + 0.5 * 3) / 6)
    assert [w["step"] for w in s["epoch_start_windows"]] == [30, 60]
    assert s["whole_run_images_per_s"] == pytest.approx(60 * 256 / (2.56 * 6))


def test_pytest_summary_counts_and_names_failures(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_ok2"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_a" name="test_gpu"><skipped message="needs a GPU"/></testcase>'
        '</testsuite></testsuites>')
    s = gpu_report.pytest_summary(tmp_path / "j.xml")
    assert (s["passed"], s["failures"], s["skipped"]) == (2, 1, 1)
    assert s["failed_tests"] == ["tests.test_a::test_bad"] and s["skip_reasons"] == ["needs a GPU"]


def test_bench_reports_mfu_against_the_data_sheet_of_known_gpus():
    cuda = torch.device("cuda")
    for name, bf16 in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40", 181e12)]:
        with mock.patch("torch.cuda.get_device_name", return_value=name):
            found, peaks = bench.spec_peak(cuda)
            assert found == name and peaks["bf16"] == bf16 and peaks["fp32"] < bf16
    with mock.patch("torch.cuda.get_device_name", return_value="Some Future GPU"):
        assert bench.spec_peak(cuda) is None
    assert bench.spec_peak(torch.device("cpu")) is None
    row = {"device": "cuda", "threads": 16, "precision": "bf16", "batch_size": 256, "steps": 10, "warmup": 3,
           "compile": False, "decode": "device", "num_workers": 12, "ms_per_step": dict.fromkeys(bench.PARTS, 1.0),
           "percent": dict.fromkeys(bench.PARTS, 20.0), "ms_per_step_total": 5.0, "images_per_s": 1000.0,
           "warmup_s": 1.0, "data_wait": 0.2, "peak_memory_mib": 1.0, "flops_per_image": 124e9,
           "matmul_peak_flops": {"bf16": 700e12}, "mfu_against": "bf16", "mfu": 124e12 / 700e12,
           "spec_device": "NVIDIA H200", "spec_peak_flops": {"bf16": 989e12}, "mfu_spec": 124e12 / 989e12}
    text = bench.table(row)
    assert "17.7% of the measured matmul" in text and "12.5% of NVIDIA H200's 989 TFLOP/s bf16" in text
