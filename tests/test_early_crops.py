"""Progressive resizing (`early_crops`): the first share of a run's steps on smaller views, and a time budget
that counts their lower cost."""
import time

import pytest
import torch

from dinokit.train.config import Config
from dinokit.train.loop import TimeBudget
from dinokit.train.step import Trainer
from test_loop import TINY


def test_the_first_share_of_steps_trains_on_the_early_sides_and_follows_a_replan():
    cfg = Config(**{**TINY, "local_crops_number": 1, "early_crops": [8, 4], "early_crops_share": 0.5}).validate()
    torch.manual_seed(0)
    trainer = Trainer(cfg, torch.device("cpu"), steps_per_epoch=4, total_steps=4)
    seen = []
    trainer.student.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    size = cfg.global_crop_size
    views = [torch.randn(4, 3, size, size)] * 2 + [torch.randn(4, 3, cfg.local_crop_size, cfg.local_crop_size)]
    for _ in range(4):
        trainer.train_step(views)
    assert seen == [8, 4] * 2 + [size, cfg.local_crop_size] * 2  # globals then locals, one call per size
    trainer.replan(12)  # a time budget re-measured: half of the longer run is early again
    assert trainer.early_steps == 6
    trainer.train_step(views)
    assert seen[-2:] == [8, 4]


@pytest.mark.parametrize("bad", [[16], [16, 0], [16.5, 8], "16"])
def test_bad_early_crops_are_refused(bad):
    with pytest.raises(ValueError, match="early_crops"):
        Config(**{**TINY, "early_crops": bad, "early_crops_share": 0.5}).validate()
    with pytest.raises(ValueError, match="early_crops_share"):
        Config(**{**TINY, "early_crops": [8, 4], "early_crops_share": 1.0}).validate()


@pytest.mark.parametrize("share, cost, step", [(0.0, 1.0, 0), (0.5, 0.6, 0), (0.4, 0.7, 100), (0.3, 0.5, 900)])
def test_time_budget_lays_out_a_run_whose_cheaper_early_steps_fill_the_time(share, cost, step):
    budget = TimeBudget(1000.0, time.time())
    budget.early_share, budget.early_cost = share, cost
    sec_per_step = 0.5
    full = int((budget.end - time.time()) / sec_per_step)  # full-size steps that fit in what is left
    total = budget.total_that_fits(step, sec_per_step)
    assert budget.full_steps(step, total, total) == pytest.approx(full, abs=1)
    assert total >= step + full  # cheaper steps: never fewer than at full size
    if share * total <= step:  # past the early steps: full-size steps only
        assert total == step + full
