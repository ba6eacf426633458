"""Schedules: the paper's layout, budgeted runs, and re-planning."""
import numpy as np
import pytest
import torch

import dinokit
from dinokit.train.config import Config
from dinokit.train.schedules import Schedules
from dinokit.train.step import Trainer
from test_loop import TINY


def tiny_config(**kw) -> Config:
    return Config(**{**TINY, **kw}).validate()


def test_schedules_equal_reference_layout_without_budget():
    cfg = tiny_config(lr=0.001, epochs=5, warmup_epochs=2, min_lr=1e-6, batch_size=512)
    s = Schedules.build(cfg, total_steps=5 * 7, steps_per_epoch=7)
    np.testing.assert_array_equal(s.lr, dinokit.cosine_schedule(0.001 * 512 / 256, 1e-6, 5, 7, 2))
    np.testing.assert_array_equal(s.momentum, dinokit.cosine_schedule(cfg.momentum_teacher, 1.0, 5, 7))
    np.testing.assert_array_equal(s.wd, dinokit.cosine_schedule(0.04, 0.4, 5, 7))
    assert s.freeze_last_layer_steps == 7


def test_budgeted_schedules_keep_warmup_fractions():
    cfg = tiny_config(epochs=10, warmup_epochs=2, warmup_teacher_temp_epochs=5, warmup_teacher_temp=0.04,
                      teacher_temp=0.07)
    s = Schedules.build(cfg, total_steps=50, steps_per_epoch=10)  # half the configured run
    assert len(s.lr) == 50 and s.lr.argmax() == 9  # warm-up: 20% of the run
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[24] == pytest.approx(0.07)
    assert s.freeze_last_layer_steps == 5


def test_replan_keeps_every_schedule_continuous():
    """A re-planned run goes on from where it is: no value jumps by more than one step's normal change, the
    warm-up is not started again, and the run still ends at the schedules' final values."""
    cfg = tiny_config(epochs=10, warmup_epochs=2, warmup_teacher_temp_epochs=3, warmup_teacher_temp=0.04,
                      teacher_temp=0.07, freeze_last_layer=1)
    plan = Schedules.build(cfg, total_steps=200, steps_per_epoch=20)
    for step, total in [(10, 260), (20, 140), (35, 400), (60, 90), (150, 210), (199, 300), (5, 6)]:
        new = plan.replan(step, total)
        for name in ("lr", "wd", "momentum", "teacher_temp"):
            old, values = getattr(plan, name), getattr(new, name)
            assert len(values) == total
            np.testing.assert_array_equal(values[:step + 1], old[:step + 1])  # the past and the present stay
            normal = np.abs(np.diff(old)).max()  # the largest change between two steps of the old plan
            assert np.abs(np.diff(values)).max() <= normal * max(1.0, (199 - step) / max(total - 1 - step, 1)) + 1e-12
            if total > step + 1:  # the same end point (a run cut to this very step ends where it is)
                assert values[-1] == pytest.approx(old[-1])
            if name == "lr" and step >= 40:  # past the warm-up: never rising again
                assert np.all(np.diff(values[step:]) <= 1e-15)
        assert step <= new.freeze_last_layer_steps or plan.freeze_last_layer_steps <= step
    # the trainer re-plans from its own step
    torch.manual_seed(0)
    trainer = Trainer(cfg, torch.device("cpu"), steps_per_epoch=20, total_steps=200)
    trainer.step = 30
    trainer.replan(300)
    assert trainer.total_steps == 300 and len(trainer.sched.lr) == 300
    np.testing.assert_array_equal(trainer.sched.lr, plan.replan(30, 300).lr)
