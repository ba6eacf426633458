"""Per-step schedules, as DINO lays them out, and their re-planning when a time budget is re-measured."""
from dataclasses import dataclass

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: float = 0,
                    start_warmup_value: float = 0.0) -> np.ndarray:
    """Linear warm-up from `start_warmup_value` to `base`, then cosine from `base` to `final`: one value per
    iteration (the paper code's `cosine_scheduler`).

    >>> cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=3, warmup_epochs=1).round(2).tolist()
    [0.0, 0.5, 1.0, 1.0, 0.5, 0.0]
    """
    warmup_iters = int(warmup_epochs * iters_per_epoch)
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * iters_per_epoch - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * iters_per_epoch
    return schedule


def warmup_then_constant(start: float, value: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Linear from `start` to `value` over the first `warmup_steps`, then constant (the teacher temperature).

    >>> warmup_then_constant(0.04, 0.07, 4, 6).round(2).tolist()
    [0.04, 0.05, 0.06, 0.07, 0.07, 0.07]
    """
    warmup_steps = min(warmup_steps, total_steps)
    return np.concatenate([np.linspace(start, value, warmup_steps), np.full(total_steps - warmup_steps, value)])


def stretch(values: np.ndarray, start: int, total: int) -> np.ndarray:
    """`values[:start]` as they were, then the rest of the schedule laid out again over `total - start` steps:
    step start + j takes the old schedule's value at the same fraction of what was left (linearly
    interpolated). The value at `start` is kept, and so are the shape and the final value: a re-planned run
    neither jumps nor warms up a second time.

    >>> stretch(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), 2, 7).tolist()
    [0.0, 1.0, 2.0, 2.5, 3.0, 3.5, 4.0]
    """
    if total <= start + 1 or start >= len(values) - 1:  # nothing left to lay out: hold the last value
        kept = values[:min(total, len(values))]
        return np.concatenate([kept, np.full(total - len(kept), values[len(kept) - 1])])
    old = np.arange(start, len(values))
    new = start + (np.arange(total - start)) * (len(values) - 1 - start) / (total - 1 - start)
    return np.concatenate([values[:start], np.interp(new, old, values[start:])])


@dataclass
class Schedules:
    """One value per step of the run for each schedule, and the steps the prototypes stay frozen."""
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    freeze_last_layer_steps: int

    @classmethod
    def build(cls, cfg, total_steps: int, steps_per_epoch: int) -> "Schedules":
        """The paper's schedules for a `Config` over `total_steps`. Warm-ups are given in epochs of the
        configured run; a shorter or longer run (a time budget, --steps) keeps their fraction of it."""
        stretch_factor = total_steps / (cfg.epochs * steps_per_epoch)
        steps = lambda epochs: int(round(epochs * steps_per_epoch * stretch_factor))
        teacher_temp = cfg.teacher_temp if cfg.sharpening else cfg.student_temp
        warmup_temp = cfg.warmup_teacher_temp if cfg.sharpening else cfg.student_temp
        return cls(lr=cosine_schedule(cfg.lr * cfg.batch_size / 256, cfg.min_lr, total_steps, 1,
                                      min(steps(cfg.warmup_epochs), total_steps)),
                   wd=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total_steps, 1),
                   momentum=cosine_schedule(cfg.momentum_teacher, 1.0, total_steps, 1),
                   teacher_temp=warmup_then_constant(warmup_temp, teacher_temp,
                                                     steps(cfg.warmup_teacher_temp_epochs), total_steps),
                   freeze_last_layer_steps=steps(cfg.freeze_last_layer))

    def replan(self, step: int, total_steps: int) -> "Schedules":
        """The same schedules with what remains after `step` laid out over `total_steps - step` steps."""
        old_left, new_left = len(self.lr) - 1 - step, total_steps - 1 - step
        freeze = self.freeze_last_layer_steps
        if freeze > step and old_left > 0:
            freeze = step + round((freeze - step) * new_left / old_left)
        return Schedules(*(stretch(v, step, total_steps) for v in (self.lr, self.wd, self.momentum,
                                                                   self.teacher_temp)), freeze)

    def at(self, step: int) -> tuple[float, float, float, float]:
        """Step `step`'s lr, weight decay, teacher momentum and teacher temperature."""
        return (float(self.lr[step]), float(self.wd[step]), float(self.momentum[step]),
                float(self.teacher_temp[step]))
