"""`precision: auto` on a CPU: precision and thread count chosen by measurement, not by CPU flags.

A flag such as `avx512_bf16` says that bf16 can run, not that it runs faster: on one CPU with the flag, bf16
matmuls ran at half the fp32 rate; on another, a width-96 ViT ran 1.4x slower in bf16 though its matmuls were
twice as fast (casts and small ops dominate). So the first run of a configuration on a machine times a few
real training steps in each candidate (fp32 and bf16; all cores and one), keeps the fastest, and caches it
per (machine, configuration shape), so later runs start at once and resume with the same numerics.
An explicit `precision` (and `threads`) always wins. On GPUs, `auto` is bf16 (fp16 where bf16 is not native).
"""
import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

# What a step's cost depends on; the rest of a configuration (lr, seed, schedules, data path) does not change it.
SHAPE_KEYS = ("arch", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "stem", "out_dim",
              "head_hidden_dim", "bottleneck_dim", "use_bn_in_head", "global_crop_size", "local_crop_size",
              "local_crops_number", "koleo_weight", "patch_loss_weight", "mask_ratio", "student_keep_ratio",
              "optimizer", "batch_size", "compile", "num_workers", "decode", "fsdp")


# How steps are timed. Choices cached by an older way are stale and measured again: since revision 2 a timing that
# other processes disturbed is taken again and not cached, and revision 1's cache can hold a choice made on one.
TIMING_REVISION = 2


def cache_file() -> Path:
    return Path(os.environ.get("DINOKIT_TUNE_CACHE", Path.home() / ".cache" / "dinokit" / "autotune.json"))


def machine_id() -> str:
    """The CPU model, its flags and core count, torch's version, dinokit's and the way of timing: what the
    measurement depends on (a new dinokit can change which precision is faster, as explicit bf16 attention did)."""
    from .. import __version__  # here, not at the top: the package imports this module while it loads
    model, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = (f"{model}|{hashlib.sha256(flags.encode()).hexdigest()[:12]}|{cores}|torch {torch.__version__}"
            f"|dinokit {__version__}|timing {TIMING_REVISION}")
    return text


def shape_key(cfg, world: int) -> str:
    return json.dumps({k: getattr(cfg, k) for k in SHAPE_KEYS} | {"world": world}, sort_keys=True)


def all_cores() -> int:
    """The cores this process may use. A run's default thread count: never whatever an earlier call in the same
    process left in `torch.set_num_threads`, so that a run's arithmetic (and its resume) does not depend on it."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def candidates(cfg) -> list[tuple[str, int]]:
    """(precision, threads) pairs to time: fp32 and bf16 with every core, and fp32 on one core."""
    cores = all_cores()
    threads = [cfg.threads] if cfg.threads > 0 else sorted({cores, 1}, reverse=True)
    return [(p, t) for t in threads for p in ("fp32", "bf16") if t == threads[0] or p == "fp32"]


MIN_METERED = 0.1  # seconds: the shortest interval whose CPU time /proc can tell


def cpu_sample() -> tuple[float, float, float] | None:
    """(CPU seconds the whole machine has been busy, all cores and steal from other virtual machines included;
    CPU seconds of this process and its children such as loader workers; wall seconds) now, from /proc. None
    without /proc."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            values = [float(v) for v in f.readline().split()[1:9]]  # user .. steal (guest time is in user)
        busy = sum(values) - values[3] - values[4]  # all but idle and iowait
        own = sum(process_ticks(pid) for pid in [os.getpid(), *children()])
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return busy / ticks, own / ticks, time.perf_counter()


def children() -> list[int]:
    """This process's children (loader workers), where the kernel lists them."""
    pids = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            pass
    return pids


def process_ticks(pid: int) -> float:
    """CPU clock ticks a process has used (all its threads); 0 for one that has just exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return float(fields[11]) + float(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


def others_since(sample: tuple[float, float, float] | None) -> float:
    """Cores' worth of CPU time other processes (and other virtual machines) used since `sample`."""
    now = cpu_sample()
    if sample is None or now is None or now[2] - sample[2] < MIN_METERED:
        return 0.0  # too short for the kernel's clock ticks (10 ms) to say
    return max(0.0, ((now[0] - sample[0]) - (now[1] - sample[1])) / (now[2] - sample[2]))


def others_load(seconds: float = 0.3) -> float:
    """Cores' worth of CPU time other processes use now, over `seconds` (the 1-minute load average would
    still count a job that ended a minute ago); the load average where there is no /proc."""
    sample = cpu_sample()
    if sample is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(seconds)
    return others_since(sample)


# Cores other processes (or other virtual machines, as steal time) may use while a candidate is timed: more, and
# the timing is taken again, RETRIES times at most, and a choice made on such timings is not cached. With every
# core in use, one taken away slows the whole step (the threads wait for each other at every operation).
DISTURBED = 0.5
RETRIES = 1


def measured_quietly(measure, cfg, give_up: float | None) -> tuple[float, float]:
    """(seconds per step, cores other processes used while it was timed): timed again while they took more
    than DISTURBED cores; the quieter timing is kept."""
    kept = (math.inf, math.inf)
    for _ in range(1 + RETRIES):
        sample = cpu_sample()
        seconds = measure(cfg, give_up=give_up)
        others = others_since(sample)
        if others <= DISTURBED:
            return seconds, others
        kept = min(kept, (others, seconds))
    return kept[1], kept[0]


def read_cache(machine: str, shape: str) -> dict | None:
    try:
        return json.loads(cache_file().read_text()).get(machine, {}).get(shape)
    except (OSError, ValueError, AttributeError):
        return None  # no cache, or an unreadable one: measure again


def write_cache(machine: str, shape: str, entry: dict):
    path = cache_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data.setdefault(machine, {})[shape] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measured again next time, nothing lost


LOST_AT = 10.0  # a candidate's step this many times the best one's: it has lost, and is timed no further
SHORT_BUDGET = 120.0  # seconds: a run this short is not spent on measuring its precision


def choose(cfg, device: torch.device, world: int, measure, rounds: int = 2,
           time_budget: float | None = None) -> tuple[object, dict]:
    """The configuration with `precision` (and `threads`) resolved, and what was decided and why.
    `measure(cfg, give_up=None) -> seconds per step` times real training steps of a configuration (see
    `loop.seconds_per_step` for `give_up`). Under a time budget shorter than SHORT_BUDGET, with nothing
    cached, it does not measure (that could take the whole budget)."""
    if cfg.precision != "auto":
        threads = cfg.threads or all_cores()
        torch.set_num_threads(threads)
        return dataclasses.replace(cfg, threads=threads), {"precision": cfg.precision, "threads": threads,
                                                           "reason": "given"}
    if device.type != "cpu":  # bf16 where the GPU has it natively (Ampere and later), else fp16 with a scaler
        native = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        precision = "bf16" if native else ("fp16" if device.type == "cuda" else "fp32")
        return dataclasses.replace(cfg, precision=precision, threads=cfg.threads or all_cores()), \
            {"precision": precision, "reason": f"{device.type}: {precision} autocast"}
    machine, shape = machine_id(), shape_key(cfg, world)
    entry = read_cache(machine, shape)
    if entry is None and time_budget is not None and time_budget < SHORT_BUDGET:
        entry = {"precision": "fp32", "threads": cfg.threads or all_cores(),
                 "reason": f"not measured: a time budget under {SHORT_BUDGET:.0f} s has no room for it (fp32 on "
                           "every core: bf16 was faster on some CPUs, up to 2x slower or emulated on others)"}
    elif entry is None:
        load = others_load()  # before we add our own
        timings: dict[str, float] = {}
        lost: set[str] = set()
        disturbed = 0.0  # the most other processes took from a timing that was kept
        for _ in range(rounds):  # interleaved, best of each: a passing load spoils one round, not a candidate
            for precision, threads in candidates(cfg):
                key = f"{precision}/{threads}"
                if key in lost:
                    continue
                # a step LOST_AT times the best so far ends a candidate's timing (emulated bf16: a minute a step);
                # alone only: ranks that stopped at different steps would leave the others in a collective
                give_up = LOST_AT * min(timings.values()) if timings and world == 1 else None
                torch.set_num_threads(threads)
                candidate = dataclasses.replace(cfg, precision=precision, threads=threads)
                if world == 1:
                    t, others = measured_quietly(measure, candidate, give_up)
                    disturbed = max(disturbed, others)
                else:  # the other ranks are other processes, and a timing taken again would miss their collectives
                    t = measure(candidate, give_up=give_up)
                if give_up is not None and t > give_up:
                    lost.add(key)
                timings[key] = min(t, timings.get(key, t))
        best = min(timings, key=timings.get)
        entry = {"precision": best.split("/")[0], "threads": int(best.split("/")[1]),
                 "ms_per_step": {k: round(1000 * v, 2) for k, v in timings.items()}}
        load = max(load, disturbed)
        # with several ranks on one machine, the others are busy too: only a load beyond half the cores counts
        busy = load > (DISTURBED if world == 1 else 0.5 * all_cores())
        if not busy:  # a busy machine's choice is right for this run, not for a quiet machine's later ones
            write_cache(machine, shape, entry)
        entry = {**entry, "sec_per_step": timings[best],
                 "reason": f"measured now, the machine busy (other processes used {load:.1f} cores): not cached" if busy
                 else f"measured on this machine (cached in {cache_file()})"}
    else:
        entry = {**entry, "reason": f"measured earlier on this machine ({cache_file()})"}
    if world > 1:  # every process runs what rank 0 chose, whatever its own clock said
        from .distributed import broadcast_int
        entry["precision"] = ("fp32", "bf16")[broadcast_int(int(entry["precision"] == "bf16"))]
        entry["threads"] = broadcast_int(entry["threads"])
    torch.set_num_threads(entry["threads"])
    return dataclasses.replace(cfg, precision=entry["precision"], threads=entry["threads"]), entry


def describe(entry: dict) -> str:
    """One line on what was chosen and why."""
    if "ms_per_step" not in entry:
        return f"precision {entry['precision']} ({entry['reason']})"
    timings = ", ".join(f"{k.replace('/', ' x ')} threads {v:.0f} ms" for k, v in entry["ms_per_step"].items())
    return (f"precision {entry['precision']} on {entry['threads']} thread(s), the fastest per step "
            f"({timings}); {entry['reason']}")
