"""Checkpoints that survive crashes: written atomically, verified on load, the previous one kept.

Layout: the paper code's keys (`student`, `teacher`, `optimizer`, `epoch`, `dino_loss`, `fp16_scaler`) so its
evaluation scripts read our runs, plus `dinokit`: the architecture, the config and the position in the run.
Everything is tensors and plain data: `torch.load(path, weights_only=True)` reads it.
"""
import errno
import os
import signal
import zipfile
from pathlib import Path

import torch

from ..models.weights import UnsafeCheckpointError, safe_load

LATEST, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is left intact."""


def crash_for_tests(point: str, half_written=None):
    """Test hook for the crash-recovery tests: `DINOKIT_TEST_KILL_AT=point` (e.g. "step:5", "write:6",
    "rename:8") kills this process with SIGKILL there, after cutting `half_written` (an open file) to half
    its length: a write interrupted midway. Unset, as always outside tests, it does nothing."""
    if os.environ.get("DINOKIT_TEST_KILL_AT") != point:
        return
    if half_written is not None:
        half_written.truncate(half_written.tell() // 2)
        half_written.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def save_atomic(obj: dict, path: Path, crash_point: str = ""):
    """Write to a temporary file, fsync, then rename over `path`: a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            crash_for_tests(crash_point, half_written=f)
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


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e`: torch.save reports a failed write as a RuntimeError whose context it is."""
    while e is not None and not isinstance(e, OSError):
        e = e.__context__
    return e


def save_checkpoint(obj: dict, run_dir: Path):
    """The new checkpoint becomes `checkpoint.pt`; the one it replaces stays as `checkpoint.prev.pt`."""
    run_dir = Path(run_dir)
    tmp = run_dir / (LATEST + ".new")
    step = obj.get("dinokit", {}).get("step")
    try:
        save_atomic(obj, tmp, crash_point=f"write:{step}")  # fully on disk before anything is moved
    except (OSError, RuntimeError) as e:
        cause = _os_error(e)
        if cause is None:
            raise
        full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = "no space left on the device" if full else (cause.strerror or str(cause))
        raise CheckpointWriteError(cause.errno, f"could not write the checkpoint of step {step} in {run_dir}: "
                                   f"{reason}. The previous checkpoint is kept as it was; "
                                   f"{'free some space, then ' if full else ''}continue with --resume.") from e
    if (run_dir / LATEST).exists():
        os.replace(run_dir / LATEST, run_dir / PREVIOUS)
    crash_for_tests(f"rename:{step}")
    os.replace(tmp, run_dir / LATEST)


def is_complete(obj: dict) -> bool:
    return all(k in obj for k in ("student", "teacher", "optimizer", "dino_loss", "dinokit"))


def verify(path: Path):
    """Check every stored record against the CRC-32 that torch.save's zip format keeps beside it: a flipped
    bit in the tensor data would otherwise load silently."""
    if not zipfile.is_zipfile(path):
        return  # safe_load reports what else it is
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad is not None:
        raise ValueError(f"record {bad} fails its checksum")


def load_latest(run_dir: Path, log=print) -> dict | None:
    """The newest checkpoint of a run that reads back whole; a broken one is reported and passed over.

    None when the run has no checkpoint at all. A file that would run code when unpickled is never passed
    over silently: it stops the resume (someone tampered with the run folder)."""
    run_dir = Path(run_dir)
    broken = []
    for name in (LATEST + ".new", LATEST, PREVIOUS):  # newest first
        path = run_dir / name
        if not path.exists():
            continue
        try:
            verify(path)
            obj = safe_load(path)
            if not is_complete(obj):
                raise ValueError("it lacks some of the training state")
            return obj
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # any unreadable checkpoint: try the older one
            log(f"warning: checkpoint {path} is unusable ({e}); trying an older one")
            broken.append(name)
    if broken:
        raise ValueError(f"no usable checkpoint in {run_dir}: {', '.join(broken)} cannot be read (see the "
                         "warnings above); move them away to start the run again from scratch")
    return None
