"""`dinokit bench`: training speed of a configuration, end to end and part by part.

It runs the real training loop (`dinokit train`'s, into a temporary folder) with timing marks in the real
`Trainer.train_step`: data (the time the loop waits for its next batch, augmentation included), teacher
forward, student forward + loss + backward, optimizer (clipping included), EMA and center. It also reports
peak memory, FLOPs per image (counted on one real step) and MFU: the FLOP/s reached over a matmul peak
measured in the same run.
"""
import dataclasses
import json
import resource
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.loader import build_data, run_batches
from ..device import pick_device
from .config import resolve, resolve_decode
from .loop import train
from .presets import PRESETS
from .step import PhaseClock, Trainer

PARTS = ("data", "teacher", "student", "optimizer", "ema")

# Dense (no sparsity) tensor-core peaks in FLOP/s from the vendors' data sheets, by a part of the name
# torch.cuda.get_device_name gives; the first match wins, so the variants come before their family. fp32 is
# the plain (non-TF32) rate, what fp32 matmuls run at unless TF32 is allowed.
SPEC_PEAKS = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51.2e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
)


def spec_peak(device: torch.device) -> tuple[str, dict[str, float]] | None:
    """(name, peaks by dtype) of this GPU's data sheet, when it is in SPEC_PEAKS; None otherwise (CPUs too).

    >>> spec_peak(torch.device("cpu")) is None
    True
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((name, peaks) for part, peaks in SPEC_PEAKS if part in name), None)


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul in `dtype`, best of repeated runs over about `seconds`: 2048 wide on a CPU,
    8192 on a GPU (a small one would leave a GPU's peak far from reached and flatter the MFU). On a CPU the
    size stops doubling from 256 once one product takes a twentieth of `seconds`: a CPU without native bf16
    emulates it at about 1 GFLOP/s, and one 2048-wide product took 13 to 19 s there (BENCHMARKS.md)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once(a, b) -> float:
        t = time.perf_counter()
        a @ b
        sync()
        return time.perf_counter() - t

    n = 8192 if device.type == "cuda" else 256
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    once(a, b)
    while device.type != "cuda" and n < 2048 and once(a, b) < seconds / 20:
        n *= 2
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        once(a, b)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        best = min(best, once(a, b))
    return 2 * n ** 3 / best


def count_flops(cfg, device: torch.device) -> float:
    """FLOPs per image of one real training step (teacher forward, student forward and backward), on a
    throwaway trainer; the global RNG is left as it was."""
    rng_state = torch.get_rng_state()
    source, per_epoch, multicrop = build_data(cfg)
    trainer = Trainer(cfg, device, per_epoch, per_epoch)
    batch = next(b for b in run_batches(cfg, source, multicrop, device, decode=resolve_decode(cfg.decode, device.type),
                                        length=per_epoch) if b.views is not None)
    # torch < 2.6 has no set_stance: there the counting step is eager anyway unless compile is on
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    with eager, FlopCounterMode(display=False) as counter:
        trainer.train_step(batch.views)
    torch.set_rng_state(rng_state)
    return counter.get_total_flops() / len(batch.index)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:  # this process's peak RSS; getrusage's ru_maxrss also keeps the peak of a parent that exec'd us
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def benchmark(cfg, steps: int = 10, warmup: int = 3) -> dict:
    """Time `steps` steps of the real training loop after `warmup` untimed ones."""
    device = pick_device(cfg.device)
    # Every parameter trains (as after the paper's first epoch), every step on the configured views (not a
    # preset's cheaper early ones); no checkpoint or log row inside the timing.
    cfg = dataclasses.replace(cfg, freeze_last_layer=0, early_crops_share=0.0, save_every_steps=10 ** 9,
                              log_every=10 ** 9)
    flops_per_image = count_flops(cfg, device)
    clock = PhaseClock(device)
    with tempfile.TemporaryDirectory(prefix="dinokit-bench-") as run_dir:
        # one step more than timed: the last one logs its statistics, which a plain step does not
        summary = train(cfg, run_dir, max_steps=warmup + steps + 1, progress=False, clock=clock)
    precision = summary["precision"]
    if summary["step"] < warmup + steps + 1:
        raise ValueError(f"the data holds too few readable batches for {warmup + steps + 1} steps")
    timed = clock.steps[warmup:warmup + steps]
    totals = {part: sum(s.get(part, 0.0) for s in timed) for part in PARTS}
    seconds = sum(totals.values())
    warmup_s = sum(sum(s.values()) for s in clock.steps[:warmup])
    images = steps * cfg.batch_size

    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    if device.type == "cuda":
        peaks["fp16"] = matmul_peak(torch.float16, device)
    mfu_against = precision if precision in peaks else "bf16"  # the matmul dtype autocast runs
    images_per_s = images / seconds
    spec = spec_peak(device)
    return {
        "config": cfg.to_dict(), "device": str(device), "precision": precision,
        "decode": resolve_decode(cfg.decode, device.type), "num_workers": cfg.num_workers,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "compile": cfg.compile,
        "steps": steps, "warmup": warmup, "batch_size": cfg.batch_size, "loss": summary["loss"],
        "images_per_s": images_per_s, "seconds": seconds, "warmup_s": warmup_s,
        "ms_per_step": {k: 1000 * v / steps for k, v in totals.items()},
        "percent": {k: 100 * v / seconds for k, v in totals.items()},
        "data_wait": totals["data"] / seconds,
        "ms_per_step_total": 1000 * seconds / steps,
        "peak_memory_mib": peak_memory_mib(device),
        "flops_per_image": flops_per_image,
        "matmul_peak_flops": peaks, "mfu_against": mfu_against,
        "mfu": flops_per_image * images_per_s / peaks[mfu_against],
        # against the data sheet too, where the GPU is known: a measured matmul rarely reaches it
        "spec_device": spec[0] if spec else None, "spec_peak_flops": spec[1] if spec else None,
        "mfu_spec": flops_per_image * images_per_s / spec[1][mfu_against] if spec else None,
    }


def table(r: dict) -> str:
    lines = [f"device {r['device']} ({r['threads']} threads), precision {r['precision']}, batch {r['batch_size']}, "
             f"{r['steps']} steps after {r['warmup']} warm-up" + (", compiled" if r["compile"] else "")
             + f", decode on {r['decode']} ({r['num_workers']} loader workers)",
             f"{'part':<10} {'ms/step':>9} {'%':>6}"]
    for k in PARTS:
        lines.append(f"{k:<10} {r['ms_per_step'][k]:>9.1f} {r['percent'][k]:>6.1f}")
    lines.append(f"{'total':<10} {r['ms_per_step_total']:>9.1f}")
    peaks = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in r["matmul_peak_flops"].items())
    lines += [f"images/s          {r['images_per_s']:.1f}  (warm-up {r['warmup_s']:.1f} s)",
              f"data wait         {100 * r['data_wait']:.1f}% of the loop's time",
              f"peak memory       {r['peak_memory_mib']:.0f} MiB",
              f"GFLOP/image       {r['flops_per_image'] / 1e9:.3f}",
              f"matmul GFLOP/s    {peaks}",
              f"MFU ({r['mfu_against']})        {100 * r['mfu']:.1f}% of the measured matmul"]
    if r.get("mfu_spec") is not None:
        lines.append(f"MFU (data sheet)  {100 * r['mfu_spec']:.1f}% of {r['spec_device']}'s "
                     f"{r['spec_peak_flops'][r['mfu_against']] / 1e12:.0f} TFLOP/s {r['mfu_against']}")
    return "\n".join(lines)


def register(sub):
    p = sub.add_parser("bench", help="images/s of a training configuration, split into its parts; FLOPs, MFU")
    p.add_argument("--preset", choices=sorted(PRESETS), default="bench-cpu", help="named configuration")
    p.add_argument("--config", help="YAML file of config keys")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--data", help="image folder or fashion-mnist:train (default: the config's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--compile", action="store_true", help="the same as --set compile=true")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=run)


def run(args):
    if args.steps <= 0 or args.warmup <= 0:
        raise ValueError("--steps and --warmup must be > 0")
    sets = args.sets + (["compile=true"] if args.compile else [])
    cfg = resolve(args.preset, args.config, sets, data=args.data)
    result = benchmark(cfg, args.steps, args.warmup)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    sys.stdout.flush()
    return 0
