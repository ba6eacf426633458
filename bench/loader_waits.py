"""How long the training loop waits for each batch, epoch after epoch: one loader for the whole run (dinokit's)
beside a new loader every epoch (what the paper's code, and dinokit before issue 15, do). With workers that
live across epochs, the first batch of an epoch arrives like any other:

    python bench/make_jpegs.py /tmp/jpegs 256
    python bench/loader_waits.py --data /tmp/jpegs --set batch_size=32 --set num_workers=2 --epochs 3 --compare

`--step-ms` stands for the training step (the loop sleeps that long per batch, so the workers can work ahead
as they do while a GPU computes). Prints a table and, with --json, writes every wait.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from the source tree too

import torch  # noqa: E402

from dinokit.data.loader import build_data, run_batches  # noqa: E402
from dinokit.device import pick_device  # noqa: E402
from dinokit.train.config import resolve, resolve_decode  # noqa: E402


def waits(batches, n: int, step_s: float, sync) -> list[tuple[int, float]]:
    """(epoch, seconds waited) of each of n batches, the loop sleeping step_s after each."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        batch = next(batches)
        sync()
        out.append((batch.epoch, time.perf_counter() - start))
        time.sleep(step_s)
    return out


def summary(rows: list[tuple[int, float]], per_epoch: int) -> dict:
    """The first batch of the run (workers starting), the first of each later epoch, and all the others."""
    firsts = [w for i, (_, w) in enumerate(rows) if i % per_epoch == 0 and i > 0]
    others = [w for i, (_, w) in enumerate(rows) if i % per_epoch != 0]
    return {"first_of_run_s": rows[0][1], "first_of_epoch_s": firsts, "others_median_s": statistics.median(others),
            "others_max_s": max(others), "waits_s": [w for _, w in rows]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--preset", default="paper")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--step-ms", type=float, default=0.0)
    p.add_argument("--compare", action="store_true", help="also a new loader every epoch")
    p.add_argument("--json")
    args = p.parse_args(argv)
    cfg = resolve(args.preset, None, args.sets, data=args.data)
    device = pick_device(cfg.device)
    decode = resolve_decode(cfg.decode, device.type)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    source, per_epoch, multicrop = build_data(cfg)
    n = args.epochs * per_epoch
    result = {"device": str(device), "decode": decode, "num_workers": cfg.num_workers, "batch_size": cfg.batch_size,
              "steps_per_epoch": per_epoch, "step_ms": args.step_ms}
    result["one_loader"] = summary(waits(run_batches(cfg, source, multicrop, device, decode=decode, length=n),
                                         n, args.step_ms / 1000, sync), per_epoch)
    if args.compare:
        rows = []
        for epoch in range(args.epochs):
            batches = run_batches(cfg, source, multicrop, device, first=epoch * per_epoch, decode=decode,
                                  length=per_epoch)
            rows += waits(batches, per_epoch, args.step_ms / 1000, sync)
            del batches  # its workers stop, as a finished epoch's did
        result["loader_per_epoch"] = summary(rows, per_epoch)
    print(f"{cfg.num_workers} workers, batch {cfg.batch_size}, {per_epoch} batches an epoch, decode {decode}, "
          f"step {args.step_ms:.0f} ms")
    print(f"{'':<18} {'first of run':>12} {'first of epochs 2..':>22} {'others: median':>15} {'max':>7}  (ms)")
    for name in ("one_loader", "loader_per_epoch"):
        if name in result:
            r = result[name]
            firsts = " ".join(f"{1000 * w:.0f}" for w in r["first_of_epoch_s"])
            print(f"{name:<18} {1000 * r['first_of_run_s']:>12.0f} {firsts:>22} {1000 * r['others_median_s']:>15.0f} "
                  f"{1000 * r['others_max_s']:>7.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
