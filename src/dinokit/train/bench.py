"""`dinokit bench`: training speed of a configuration, end to end and part by part.

It builds the real `Trainer` and runs the parts of `Trainer.train_step` in the same order, timing each:
data (loader with the geometric half, then the photometric half), teacher forward, student forward + loss +
backward, optimizer step (clipping included) and EMA. It also reports peak memory, FLOPs per image (counted
on one real step) and MFU: the FLOP/s reached, end to end, over a matmul peak measured in the same run.
"""
import json
import resource
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.multicrop import MultiCrop
from .config import resolve, resolve_decode
from ..eval.common import pick_device
from .engine import Trainer, build_data, ema_update_, epoch_batches
from .presets import PRESETS

PARTS = ("data", "teacher", "student", "optimizer", "ema")


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of an n x n matmul in `dtype`, best of repeated runs over about `seconds`."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def batches_forever(source, multicrop: MultiCrop, cfg, device: torch.device, start_epoch: int = 0):
    """(epoch, index, geometric crops) of readable batches, epoch after epoch, as the training loop gets them."""
    epoch = start_epoch
    while True:
        for index, crops, _ in epoch_batches(cfg, source, multicrop, device, epoch):
            if crops is not None:
                yield epoch, index, crops
        epoch += 1


def timed_step(trainer: Trainer, batches, multicrop: MultiCrop) -> tuple[dict, int]:
    """One training step, the same calls as `Trainer.train_step`, with a clock between the parts."""
    device = trainer.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    marks = [time.perf_counter()]

    def mark():
        sync()
        marks.append(time.perf_counter())

    epoch, index, crops = next(batches)
    crops = multicrop.photometric([c.to(device, non_blocking=True) for c in crops], index, epoch)
    mark()
    it = trainer.step
    temp = trainer.set_schedules(it)
    with trainer.autocast():
        teacher_out = trainer.teacher(crops[:2])
    mark()
    with trainer.autocast():
        student_out = trainer.student_ddp(crops)
        loss = trainer.loss(student_out, teacher_out, temp)
    trainer.backward(loss)
    loss.item()  # the training loop reads the loss every step on the CPU
    mark()
    trainer.update_student(it)
    mark()
    ema_update_(trainer.teacher, trainer.student, float(trainer.sched.momentum[it]))
    trainer.step += 1
    mark()
    return {part: marks[i + 1] - marks[i] for i, part in enumerate(PARTS)}, len(index)


def count_flops(trainer: Trainer, batches, multicrop: MultiCrop) -> tuple[int, int]:
    """FLOPs of one real training step (teacher forward, student forward and backward) and its images."""
    epoch, index, crops = next(batches)
    crops = multicrop.photometric([c.to(trainer.device) for c in crops], index, epoch)
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        trainer.train_step(crops)
    return counter.get_total_flops(), len(index)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:  # this process's peak RSS; getrusage's ru_maxrss also keeps the peak of a parent that exec'd us
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def benchmark(cfg, steps: int = 10, warmup: int = 3) -> dict:
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    source, steps_per_epoch, multicrop = build_data(cfg)
    total_steps = cfg.epochs * steps_per_epoch
    trainer = Trainer(cfg, device, steps_per_epoch, total_steps)
    # Time steps after the last layer's freeze: the whole run but its first epoch trains every parameter.
    trainer.step = max(0, min(trainer.sched.freeze_last_layer_steps, total_steps - warmup - steps - 1))
    batches = batches_forever(source, multicrop, cfg, device, trainer.step // steps_per_epoch)

    t = time.perf_counter()
    flops, flop_images = count_flops(trainer, batches, multicrop)  # also the first warm-up step
    for _ in range(max(0, warmup - 1)):  # with cfg.compile, the first of these compiles
        timed_step(trainer, batches, multicrop)
    warmup_s = time.perf_counter() - t

    totals, images = dict.fromkeys(PARTS, 0.0), 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        parts, n = timed_step(trainer, batches, multicrop)
        images += n
        for k, v in parts.items():
            totals[k] += v
    seconds = time.perf_counter() - start
    # CPU time of this process: on a machine shared with other jobs, images per CPU-second divided by the
    # threads used is what this run would reach on idle cores; wall-clock figures shrink with the load.
    cpu_seconds = time.process_time() - cpu_start

    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    if device.type == "cuda":
        peaks["fp16"] = matmul_peak(torch.float16, device)
    # the matmul dtype the trainer's autocast runs (fp16 on GPUs only)
    mfu_against = trainer.precision if trainer.precision in peaks else "bf16"
    images_per_s = images / seconds
    flops_per_image = flops / flop_images
    return {
        "config": cfg.to_dict(), "device": str(device), "precision": trainer.precision,
        "decode": resolve_decode(cfg.decode, device.type), "num_workers": cfg.num_workers,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "compile": cfg.compile,
        "steps": steps, "warmup": warmup, "batch_size": cfg.batch_size, "first_step": trainer.step - steps,
        "images_per_s": images_per_s, "seconds": seconds, "warmup_s": warmup_s,
        "cpu_seconds": cpu_seconds, "images_per_cpu_s": images / cpu_seconds,
        "ms_per_step": {k: 1000 * v / steps for k, v in totals.items()},
        "percent": {k: 100 * v / sum(totals.values()) for k, v in totals.items()},
        "ms_per_step_total": 1000 * seconds / steps,
        "peak_memory_mib": peak_memory_mib(device),
        "flops_per_image": flops_per_image,
        "matmul_peak_flops": peaks, "mfu_against": mfu_against,
        "mfu": flops_per_image * images_per_s / peaks[mfu_against],
    }


def table(r: dict) -> str:
    lines = [f"device {r['device']} ({r['threads']} threads), precision {r['precision']}, batch {r['batch_size']}, "
             f"{r['steps']} steps after {r['warmup']} warm-up" + (", compiled" if r["compile"] else "")
             + f", decode on {r['decode']} ({r['num_workers']} loader workers)",
             f"{'part':<10} {'ms/step':>9} {'%':>6}"]
    for k in PARTS:
        lines.append(f"{k:<10} {r['ms_per_step'][k]:>9.1f} {r['percent'][k]:>6.1f}")
    lines.append(f"{'total':<10} {r['ms_per_step_total']:>9.1f}")
    peaks = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in r["matmul_peak_flops"].items())
    lines += [f"images/s          {r['images_per_s']:.1f}  (warm-up {r['warmup_s']:.1f} s)",
              f"images/CPU-s      {r['images_per_cpu_s']:.1f}",
              f"peak memory       {r['peak_memory_mib']:.0f} MiB",
              f"GFLOP/image       {r['flops_per_image'] / 1e9:.3f}",
              f"matmul GFLOP/s    {peaks}",
              f"MFU ({r['mfu_against']})        {100 * r['mfu']:.1f}%"]
    return "\n".join(lines)


def register(sub):
    p = sub.add_parser("bench", help="images/s of a training configuration, split into its parts; FLOPs, MFU")
    p.add_argument("--preset", choices=sorted(PRESETS), default="bench-cpu", help="named configuration")
    p.add_argument("--config", help="YAML file of config keys")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--data", help="image folder or fashion-mnist:train (default: the config's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first also counts FLOPs)")
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
