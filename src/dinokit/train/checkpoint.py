"""Checkpoints that survive crashes: written atomically, verified on load, the previous one kept.

Layout: the paper code's keys (`student`, `teacher`, `optimizer`, `epoch`, `dino_loss`, `fp16_scaler`) so its
evaluation scripts read our runs, plus `dinokit`: the architecture, the config and the position in the run.
Everything is tensors and plain data: `torch.load(path, weights_only=True)` reads it.
"""
import os
from pathlib import Path

import torch

from ..models.weights import safe_load

LATEST, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"


def save_atomic(obj: dict, path: Path):
    """Write to a temporary file, fsync, then rename over `path`: a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(obj: dict, run_dir: Path):
    """The new checkpoint becomes `checkpoint.pt`; the one it replaces stays as `checkpoint.prev.pt`."""
    run_dir = Path(run_dir)
    tmp = run_dir / (LATEST + ".new")
    save_atomic(obj, tmp)  # fully on disk before anything is moved
    if (run_dir / LATEST).exists():
        os.replace(run_dir / LATEST, run_dir / PREVIOUS)
    os.replace(tmp, run_dir / LATEST)


def is_complete(obj: dict) -> bool:
    return all(k in obj for k in ("student", "teacher", "optimizer", "dino_loss", "dinokit"))


def load_latest(run_dir: Path, log=print) -> dict | None:
    """The newest checkpoint of a run that reads back whole; a broken one is reported and passed over."""
    run_dir = Path(run_dir)
    for name in (LATEST + ".new", LATEST, PREVIOUS):  # newest first
        path = run_dir / name
        if not path.exists():
            continue
        try:
            obj = safe_load(path)
            if not is_complete(obj):
                raise ValueError("it lacks some of the training state")
            return obj
        except Exception as e:  # any unreadable checkpoint: try the older one
            log(f"warning: checkpoint {path} is unusable ({e}); trying an older one")
    return None
