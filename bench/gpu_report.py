"""The Python half of bench/gpu.sh: read what its parts wrote into one folder, summarise each, print the
side-by-side table and write one JSON file.

    python bench/gpu_report.py collect OUT_DIR --json OUT_DIR/gpu-report.json
    python bench/gpu_report.py prepare-ref REF_DINO COPY   # the paper's code, made to start offline

Files it reads in OUT_DIR (each optional; a part that did not run is reported with its log's last lines):
runs/<name>/metrics.jsonl and config.yaml (dinokit train), bench-<name>.json (dinokit bench), pytest.xml
(JUnit), ref.log (the paper's main_dino.py), waits.json (bench/loader_waits.py), status/<part> (exit codes and
seconds), logs/<part>.log.
"""
import argparse
import json
import re
import shutil
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_summary(run: Path, skip_windows: int = 1) -> dict:
    """A dinokit run's speed from its own metrics.jsonl: images/s and data-wait share per logged window, the
    steady figures (median images/s, mean data wait) over the windows after the first `skip_windows` (start-up),
    the windows in which an epoch starts, and the whole run after start-up."""
    rows = read_rows(run / "metrics.jsonl")
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    per_epoch, batch = resolved["resolved"]["steps_per_epoch"], resolved["batch_size"]
    steady = rows[skip_windows:] or rows
    starts = []
    for before, row in zip(rows, rows[1:]):  # a window holds the steps numbered before["step"] to row["step"] - 1
        if rows.index(row) >= skip_windows and (row["step"] - 1) // per_epoch != (before["step"] - 1) // per_epoch:
            starts.append({"step": row["step"], "images_per_s": row["images_per_s"], "data_wait": row["data_wait"]})
    whole = None
    if len(rows) > skip_windows:
        first, last = rows[skip_windows - 1] if skip_windows else {"step": 0, "elapsed_s": 0.0}, rows[-1]
        whole = (last["step"] - first["step"]) * batch / (last["elapsed_s"] - first["elapsed_s"])
    return {"steps": rows[-1]["step"] if rows else 0, "batch_size": batch, "steps_per_epoch": per_epoch,
            "decode": resolved["resolved"].get("decode"), "device": resolved["resolved"].get("device"),
            "precision": resolved["resolved"].get("precision"), "num_workers": resolved["num_workers"],
            "steady_images_per_s": statistics.median(r["images_per_s"] for r in steady) if steady else None,
            "steady_data_wait": statistics.fmean(r["data_wait"] for r in steady) if steady else None,
            "whole_run_images_per_s": whole, "epoch_start_windows": starts,
            "windows": [{k: r[k] for k in ("step", "images_per_s", "data_wait", "loss")} for r in rows]}


REF_ITER = re.compile(r"Epoch: \[(\d+)/(\d+)\]\s+\[\s*(\d+)/(\d+)\].*?time: ([\d.]+)\s+data: ([\d.]+)")
REF_TOTAL = re.compile(r"Epoch: \[(\d+)/(\d+)\] Total time: \S+ \(([\d.]+) s / it\)")


def ref_summary(log: Path, batch_size: int) -> dict:
    """The paper's main_dino.py from its printout: every 10 iterations a running mean (its last 20) of the
    seconds per iteration and of those spent waiting for data; at each epoch's end its seconds per iteration.
    Steady: the median of the running means after the first 20 iterations of each epoch past the first."""
    text = log.read_text(errors="replace")
    iters = [(int(e), int(i), float(t), float(d)) for e, _, i, _, t, d in REF_ITER.findall(text)]
    totals = {int(e): float(s) for e, _, s in REF_TOTAL.findall(text)}
    later = [(t, d) for e, i, t, d in iters if e >= 1 and i >= 20] or [(t, d) for e, i, t, d in iters if i >= 20]
    steady_s = statistics.median(t for t, _ in later) if later else None
    whole = [s for e, s in totals.items() if e >= 1] or list(totals.values())
    return {"batch_size": batch_size, "epochs_done": len(totals), "s_per_it_by_epoch": totals,
            "steady_s_per_it": steady_s,
            "steady_images_per_s": batch_size / steady_s if steady_s else None,
            "steady_data_share": statistics.median(d / t for t, d in later) if later else None,
            "whole_epoch_images_per_s": batch_size / statistics.fmean(whole) if whole else None,
            "iterations": [{"epoch": e, "it": i, "time": t, "data": d} for e, i, t, d in iters]}


def pytest_summary(junit: Path) -> dict:
    """Counts and the names of failed tests from pytest's JUnit XML."""
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = sorted({(c.find("skipped").get("message") or "") for s in suites for c in s.iter("testcase")
                      if c.find("skipped") is not None})
    return {**count, "passed": count["tests"] - count["failures"] - count["errors"] - count["skipped"],
            "failed_tests": failed, "skip_reasons": skipped}


BENCH_KEYS = ("device", "precision", "compile", "decode", "num_workers", "batch_size", "images_per_s", "data_wait",
              "ms_per_step", "ms_per_step_total", "warmup_s", "flops_per_image", "matmul_peak_flops", "mfu_against",
              "mfu", "spec_device", "spec_peak_flops", "mfu_spec", "peak_memory_mib")


def tail(path: Path, lines: int = 5) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []


def part_status(out: Path, name: str) -> dict:
    """A part's exit code and seconds (written by gpu.sh), and its log's last lines when it failed."""
    f = out / "status" / name
    if not f.is_file():
        return {"ran": False}
    code, seconds = f.read_text().split()[:2]
    status = {"ran": True, "exit_code": int(code), "seconds": float(seconds)}
    if status["exit_code"] != 0:
        status["log_tail"] = tail(out / "logs" / f"{name}.log")
    return status


def loss_tracking(run: dict, reference: dict) -> dict:
    """How far one run's logged loss strays from a reference run's (the same run in fp32), step by step:
    the largest relative gap, and the gap at the last common step."""
    ref = {w["step"]: w["loss"] for w in reference["windows"]}
    gaps = [(w["step"], abs(w["loss"] - ref[w["step"]]) / max(abs(ref[w["step"]]), 1e-12))
            for w in run["windows"] if w["step"] in ref]
    return {"precision": run["precision"], "reference_precision": reference["precision"], "steps": len(gaps),
            "max_relative_gap": max((g for _, g in gaps), default=None),
            "last_step": gaps[-1][0] if gaps else None, "last_relative_gap": gaps[-1][1] if gaps else None}


def collect(out: Path) -> dict:
    report = {"machine": json.loads((out / "machine.json").read_text()) if (out / "machine.json").is_file() else {},
              "parts": {p.name: part_status(out, p.name) for p in sorted((out / "status").glob("*"))}}
    if (out / "pytest.xml").is_file():
        report["tests"] = pytest_summary(out / "pytest.xml")
    report["train"] = {run.name: train_summary(run) for run in sorted((out / "runs").glob("*"))
                       if (run / "metrics.jsonl").is_file() and (run / "config.yaml").is_file()}
    report["bench"] = {f.stem.removeprefix("bench-"): {k: v for k, v in json.loads(f.read_text()).items()
                                                         if k in BENCH_KEYS}
                       for f in sorted(out.glob("bench-*.json"))}
    if (out / "waits.json").is_file():
        report["loader_waits"] = json.loads((out / "waits.json").read_text())
    if "workers" in report["train"] and "fp32" in report["train"]:
        report["precision_tracking"] = loss_tracking(report["train"]["workers"], report["train"]["fp32"])
    if (out / "ref.log").is_file():
        batch = next((r["batch_size"] for r in report["train"].values()), 0)
        report["reference"] = ref_summary(out / "ref.log", batch)
    return report


def side_by_side(report: dict) -> str:
    """End-to-end images/s of each dinokit run and of the paper's code, and the parts' results."""
    fmt = lambda v, spec=".0f": "-" if v is None else format(v, spec)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    lines = [f"{'end to end':<34} {'steady img/s':>12} {'whole run img/s':>16} {'data wait':>10}"]
    for name, t in report.get("train", {}).items():
        if name.startswith("fmnist"):
            continue
        lines.append(f"{'dinokit ' + name:<34} {fmt(t['steady_images_per_s']):>12} "
                     f"{fmt(t['whole_run_images_per_s']):>16} {pct(t['steady_data_wait']):>10}")
        for w in t["epoch_start_windows"]:
            lines.append(f"{'  window with an epoch start':<34} {fmt(w['images_per_s']):>12} {'':>16} "
                         f"{pct(w['data_wait']):>10}  (step {w['step']})")
    ref = report.get("reference")
    if ref:
        lines.append(f"{'paper main_dino.py':<34} {fmt(ref['steady_images_per_s']):>12} "
                     f"{fmt(ref['whole_epoch_images_per_s']):>16} {pct(ref['steady_data_share']):>10}")
        ours = [t["steady_images_per_s"] for n, t in report.get("train", {}).items()
                if not n.startswith("fmnist") and t["steady_images_per_s"]]
        if ours and ref["steady_images_per_s"]:
            lines.append(f"dinokit's best / paper's code, steady: {max(ours) / ref['steady_images_per_s']:.2f}x")
    for name, b in report.get("bench", {}).items():
        spec = f", {100 * b['mfu_spec']:.1f}% of the data sheet" if b.get("mfu_spec") is not None else ""
        lines.append(f"dinokit bench {name:<12} {b['images_per_s']:.0f} img/s, data {100 * b['data_wait']:.1f}%, "
                     f"MFU {100 * b['mfu']:.1f}% of the measured matmul{spec}")
    fm = report.get("train", {}).get("fmnist")
    if fm and fm["steady_images_per_s"]:
        lines.append(f"fmnist-cpu preset: {fm['steady_images_per_s'] / fm['batch_size']:.0f} steps/s at batch "
                     f"{fm['batch_size']}")
    track = report.get("precision_tracking")
    if track and track["steps"]:
        lines.append(f"loss, {track['precision']} against {track['reference_precision']} over {track['steps']} logged "
                     f"steps: largest gap {100 * track['max_relative_gap']:.2f}%, at step {track['last_step']} "
                     f"{100 * track['last_relative_gap']:.2f}%")
    tests = report.get("tests")
    if tests:
        lines.append(f"tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                     f"{tests['skipped']} skipped" + (f" ({', '.join(tests['failed_tests'])})"
                                                      if tests["failed_tests"] else ""))
    for name, status in report.get("parts", {}).items():
        if status.get("exit_code"):
            lines.append(f"part {name} failed (exit {status['exit_code']}): {' | '.join(status.get('log_tail', []))}")
    return "\n".join(lines)


def prepare_ref(src: Path, dst: Path) -> None:
    """A copy of the paper's code that starts offline: its argument parser lists XCiT models from torch.hub,
    which needs the network; the copy drops that term (the run uses vit_small). The checkout is untouched."""
    if not (src / "main_dino.py").is_file():
        raise FileNotFoundError(f"REF_DINO={src} holds no main_dino.py")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git"))
    main = dst / "main_dino.py"
    main.write_text(main.read_text().replace('torchvision_archs + torch.hub.list("facebookresearch/xcit:main")',
                                             "torchvision_archs"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("out", type=Path)
    c.add_argument("--json", type=Path, required=True)
    r = sub.add_parser("prepare-ref")
    r.add_argument("src", type=Path)
    r.add_argument("dst", type=Path)
    args = p.parse_args(argv)
    if args.command == "prepare-ref":
        prepare_ref(args.src, args.dst)
        return 0
    report = collect(args.out)
    args.json.write_text(json.dumps(report, indent=1))
    print(side_by_side(report))
    print(f"report: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
