"""Checkpoints that survive crashes: written atomically, verified on load, the previous one kept.

Layout: the paper code's keys (`student`, `teacher`, `optimizer`, `epoch`, `dino_loss`, `fp16_scaler`) so its
evaluation scripts read our runs, plus `dinokit`: the architecture, the config and the position in the run.
Everything is tensors and plain data: `torch.load(path, weights_only=True)` reads it.
"""
import errno
import os
import shutil
import signal
import zipfile
from pathlib import Path

import torch

from ..models.weights import UnsafeCheckpointError, backbone_arch, safe_load

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


def save_atomic(obj: dict | Path, path: Path, crash_point: str = ""):
    """Write `obj` (a checkpoint, or the path of a file to copy) to a temporary file, fsync, then rename over
    `path`: a crash leaves the old file or the new one, never a half-written one under the final name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(obj, Path):
                with open(obj, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 24)
            else:
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


def keep_copy(run_dir: Path, epoch: int):
    """checkpointNNNN.pt: a durable copy of the latest checkpoint, kept when later ones replace it."""
    save_atomic(Path(run_dir) / LATEST, Path(run_dir) / f"checkpoint{epoch:04d}.pt")


def training_state(trainer, config: dict, extra: dict) -> dict:
    """A trainer's checkpoint: the paper code's keys, plus what an exact resume needs under `dinokit`. With
    FSDP every process must call it: the full tensors are gathered to rank 0."""
    if trainer.fsdp:
        from .fsdp import full_state
        student, teacher, optimizer = full_state(trainer.student, trainer.teacher, trainer.optimizer)
    else:
        student, teacher = trainer.student.state_dict(), trainer.teacher.state_dict()
        optimizer = trainer.optimizer.state_dict()
    device = trainer.device
    return {
        "student": student, "teacher": teacher, "optimizer": optimizer,
        "epoch": trainer.step // trainer.steps_per_epoch, "dino_loss": trainer.dino_loss.state_dict(),
        **({"patch_loss": trainer.patch_loss.state_dict()} if trainer.patch_loss is not None else {}),
        **({"fp16_scaler": trainer.scaler.state_dict()} if trainer.scaler is not None else {}),
        "dinokit": {"version": 1, "arch": backbone_arch(trainer.student.backbone), "config": config,
                    "step": trainer.step, "total_steps": trainer.total_steps,
                    "steps_per_epoch": trainer.steps_per_epoch, "torch_rng": torch.get_rng_state(),
                    **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                    **extra},
    }


def restore_training_state(trainer, ckpt: dict):
    """The inverse of `training_state`: the trainer continues exactly where the checkpoint was taken."""
    if trainer.fsdp:
        from .fsdp import load_full_state
        load_full_state(trainer.student, trainer.teacher, trainer.optimizer, ckpt)
    else:
        trainer.student.load_state_dict(ckpt["student"])
        trainer.teacher.load_state_dict(ckpt["teacher"])
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.dino_loss.load_state_dict(ckpt["dino_loss"])
    if trainer.patch_loss is not None:
        trainer.patch_loss.load_state_dict(ckpt["patch_loss"])
    if trainer.scaler is not None and "fp16_scaler" in ckpt:
        trainer.scaler.load_state_dict(ckpt["fp16_scaler"])
    meta = ckpt["dinokit"]
    trainer.step = int(meta["step"])
    torch.set_rng_state(meta["torch_rng"])
    if "cuda_rng" in meta and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(meta["cuda_rng"], trainer.device)


DINO_KEYS = ("student", "teacher", "optimizer", "dino_loss", "dinokit")  # a DINO run's resumable state


def is_complete(obj: dict, required: tuple[str, ...] = DINO_KEYS) -> bool:
    """Whether a checkpoint holds every key a resume needs (`required`: a DINO run's, unless told)."""
    return all(k in obj for k in required)


def verify(path: Path):
    """Check every stored record against the CRC-32 that torch.save's zip format keeps beside it: a flipped
    bit in the tensor data would otherwise load silently."""
    if not zipfile.is_zipfile(path):
        return  # safe_load reports what else it is
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad is not None:
        raise ValueError(f"record {bad} fails its checksum")


def load_latest(run_dir: Path, log=print, required: tuple[str, ...] = DINO_KEYS) -> dict | None:
    """The newest checkpoint of a run that reads back whole and holds the `required` keys; a broken one is
    reported and passed over.

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
            if not is_complete(obj, required):
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
