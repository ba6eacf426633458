"""Per-iteration schedules, as DINO lays them out."""
import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: int = 0,
                    start_warmup_value: float = 0.0) -> np.ndarray:
    """Linear warm-up from `start_warmup_value` to `base`, then cosine from `base` to `final`."""
    warmup_iters = int(warmup_epochs * iters_per_epoch)
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * iters_per_epoch - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * iters_per_epoch
    return schedule


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up, then constant."""
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs),
                           np.ones(max(epochs - warmup_epochs, 0)) * temp))
