"""Process-group set-up for data-parallel training, in one place.

Launched by torchrun (or `dinokit train --nproc N`), every process finds RANK, LOCAL_RANK and WORLD_SIZE in
its environment. A plain `dinokit train` has none of them and runs as one process with no process group.
"""
import os
import subprocess
import sys

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group torchrun set up: NCCL on GPUs, Gloo on CPUs. False when there is none."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def barrier():
    """Wait for every process (Gloo, no device sync). At the end of a run: rank 0 still writes its plots while
    the others are done, and a process that tears its group down under a peer still using it can abort."""
    if dist.is_initialized():
        dist.barrier(group=cpu_group())


def destroy():
    global _cpu_group
    _cpu_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, args: list[str]) -> int:
    """Run `dinokit <args>` in `nproc` processes on this machine through torchrun; its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dinokit", *args]
    return subprocess.call(cmd)


_cpu_group = None


def cpu_group():
    """A Gloo group for the small per-step agreements below: through NCCL each would wait for the GPU."""
    global _cpu_group
    if _cpu_group is None:  # made on first use, which every process reaches together
        _cpu_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _cpu_group


def any_process(flags: list[bool]) -> list[bool]:
    """Each flag, true when it is true on any process (one small all-reduce): the processes must take the
    same path (skip a step, stop) or one would wait forever for the others."""
    if not dist.is_initialized():
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cpu_group())
    return [bool(v) for v in t.tolist()]


def gather(items: list) -> list:
    """Every process's list, concatenated in rank order (picklable items)."""
    if not dist.is_initialized():
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, items, group=cpu_group())
    return [x for part in out for x in part]


def broadcast_int(value: int) -> int:
    """Rank 0's value on every process (one plan for all: the schedule's length)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.broadcast(t, 0, group=cpu_group())
    return int(t)


def mean_over_processes(value: float, stats: dict, device: torch.device) -> tuple[float, dict]:
    """A logged value and a dict of logged numbers, each averaged over the processes (one all-reduce)."""
    if not dist.is_initialized():
        return value, stats
    t = torch.tensor([value, *stats.values()], device=device)
    dist.all_reduce(t)
    value, *rest = (t / dist.get_world_size()).tolist()
    return value, dict(zip(stats, rest))
