"""The pieces of the training step, each against its definition."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import dinokit
from dinokit.data.multicrop import MultiCrop, gaussian_blur, uniform
from dinokit.train.config import Config, resolve
from dinokit.train.engine import Schedules, Trainer, build_models, clip_gradients_, ema_update_, param_groups
from dinokit.train.monitor import CollapseWatch
from dinokit.train.presets import PRESETS

TINY = dict(arch="vit", patch_size=4, embed_dim=32, depth=2, num_heads=2, out_dim=64, head_hidden_dim=48,
            bottleneck_dim=16, global_crop_size=16, local_crop_size=8, local_crops_number=2, batch_size=8,
            epochs=2, warmup_epochs=1, precision="fp32")


def tiny_config(**kw) -> Config:
    return Config(**{**TINY, **kw}).validate()


@pytest.mark.parametrize("ncrops", [2, 4])
def test_dino_loss_is_the_mean_over_cross_view_pairs(ncrops):
    """The paper's loss: for each teacher global view iq and each student view v != iq, the cross-entropy
    -softmax((t_iq - c) / tt) . log_softmax(s_v / ts), averaged over pairs and batch; two views give 2 pairs."""
    g = torch.Generator().manual_seed(ncrops)
    B, K, tt, ts = 5, 16, 0.04, 0.1
    student, teacher = torch.randn(ncrops * B, K, generator=g), torch.randn(2 * B, K, generator=g)
    loss_fn = dinokit.DINOLoss(K, ncrops, ts, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, K, generator=g))
    center = loss_fn.center.clone()
    q = torch.softmax((teacher - center) / tt, -1).chunk(2)
    logp = torch.log_softmax(student / ts, -1).chunk(ncrops)
    pairs = [-(q[i] * logp[v]).sum(-1).mean() for i in range(2) for v in range(ncrops) if v != i]
    assert len(pairs) == 2 * ncrops - 2
    torch.testing.assert_close(loss_fn(student, teacher, tt), torch.stack(pairs).mean())
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    teacher, student = nn.Linear(3, 4), nn.Linear(3, 4)
    before = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 0.9)
    for t0, t1, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s, rtol=0, atol=1e-7)


def test_clip_is_per_parameter():
    a, b = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(3))
    a.grad = torch.full((10,), 5.0)  # norm 15.8: scaled to 3
    b.grad = torch.tensor([0.1, 0.2, 0.2])  # norm 0.3: untouched
    clip_gradients_([a, b], 3.0)
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(a.grad / a.grad[0], torch.ones(10))  # direction kept
    torch.testing.assert_close(b.grad, torch.tensor([0.1, 0.2, 0.2]))


def test_param_groups_exclude_biases_and_1d():
    student, _ = build_models(tiny_config())
    decay, no_decay = param_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(names[id(p)].endswith(".bias") or p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    # the frozen weight-norm gain (norm_last_layer) is not trained at all
    assert all(names[id(p)] != "head.last_layer.weight_g" for p in decay["params"] + no_decay["params"])


def test_teacher_starts_as_student_and_gets_no_gradient():
    student, teacher = build_models(tiny_config(drop_path_rate=0.1))
    for (n, s), t in zip(student.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(s, t), n
    assert not any(p.requires_grad for p in teacher.parameters())


def test_schedules_equal_reference_layout_without_budget():
    cfg = tiny_config(lr=0.001, epochs=5, warmup_epochs=2, min_lr=1e-6, batch_size=512)
    s = Schedules.build(cfg, total_steps=5 * 7, steps_per_epoch=7, world_batch=512)
    np.testing.assert_array_equal(s.lr, dinokit.cosine_schedule(0.001 * 512 / 256, 1e-6, 5, 7, 2))
    np.testing.assert_array_equal(s.momentum, dinokit.cosine_schedule(cfg.momentum_teacher, 1.0, 5, 7))
    np.testing.assert_array_equal(s.wd, dinokit.cosine_schedule(0.04, 0.4, 5, 7))
    assert s.freeze_last_layer_steps == 7


def test_budgeted_schedules_keep_warmup_fractions():
    cfg = tiny_config(epochs=10, warmup_epochs=2, warmup_teacher_temp_epochs=5, warmup_teacher_temp=0.04,
                      teacher_temp=0.07)
    s = Schedules.build(cfg, total_steps=50, steps_per_epoch=10, world_batch=8)  # half the configured run
    assert len(s.lr) == 50 and s.lr.argmax() == 9  # warm-up: 20% of the run
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[24] == pytest.approx(0.07)
    assert s.freeze_last_layer_steps == 5


def run_steps(cfg, n, freeze_steps=None):
    torch.manual_seed(0)
    trainer = Trainer(cfg, torch.device("cpu"), steps_per_epoch=4, total_steps=8)
    if freeze_steps is not None:
        trainer.sched.freeze_last_layer_steps = freeze_steps
    mc = MultiCrop(cfg.global_crop_size, cfg.local_crop_size, cfg.local_crops_number)
    images = (torch.rand(8, 3, 20, 20) * 255).to(torch.uint8)
    index = torch.arange(8)
    losses = []
    for _ in range(n):
        crops = mc.photometric(mc.geometric(images, index, 0), index, 0)
        losses.append(trainer.train_step(crops)[0].item())
    return trainer, losses


def test_last_layer_frozen_then_trained():
    cfg = tiny_config(norm_last_layer=False)
    torch.manual_seed(0)
    before = build_models(cfg)[0].head.last_layer.weight_v.clone()
    frozen, _ = run_steps(cfg, 3, freeze_steps=10)
    assert torch.equal(frozen.student.head.last_layer.weight_v, before)
    assert not torch.equal(frozen.student.head.mlp[0].weight, build_models(cfg)[0].head.mlp[0].weight)
    free, _ = run_steps(cfg, 3, freeze_steps=0)
    assert not torch.equal(free.student.head.last_layer.weight_v, before)


def test_teacher_follows_student_by_ema():
    trainer, _ = run_steps(tiny_config(), 3)
    diff = [(t - s).abs().max().item() for t, s in zip(trainer.teacher.parameters(), trainer.student.parameters())]
    assert max(diff) > 0  # the teacher lags behind


def test_multicrop_shapes_ranges_and_determinism():
    mc = MultiCrop(global_size=24, local_size=10, local_crops=3, seed=5)
    images = (torch.rand(6, 3, 30, 40) * 255).to(torch.uint8)
    index = torch.arange(100, 106)
    geo = mc.geometric(images, index, epoch=2)
    assert [tuple(g.shape) for g in geo] == [(6, 3, 24, 24)] * 2 + [(6, 3, 10, 10)] * 3
    assert all(g.min() >= 0 and g.max() <= 1 for g in geo)
    out = mc.photometric(geo, index, epoch=2)
    lo = (0 - torch.tensor(mc_mean())) / torch.tensor(mc_std())
    hi = (1 - torch.tensor(mc_mean())) / torch.tensor(mc_std())
    for x in out:
        assert torch.all(x >= lo.view(1, 3, 1, 1) - 1e-5) and torch.all(x <= hi.view(1, 3, 1, 1) + 1e-5)
    # the same sample gets the same crops whatever batch it is in
    again = mc.photometric(mc.geometric(images[3:5], index[3:5], 2), index[3:5], 2)
    for a, b in zip(out, again):
        torch.testing.assert_close(a[3:5], b, rtol=0, atol=1e-6)
    # another epoch, other crops; images of mixed sizes go through the same rule
    other = mc.geometric(images, index, epoch=3)
    assert not torch.equal(other[0], geo[0])
    mixed = mc.geometric([images[0], images[1, :, :20, :30]], index[:2], 2)
    torch.testing.assert_close(mixed[0][0], geo[0][0])


def mc_mean():
    from dinokit.data.multicrop import MEAN
    return MEAN


def mc_std():
    from dinokit.data.multicrop import STD
    return STD


def test_counter_rng_is_uniform_and_keyed():
    u = uniform(0, 0, torch.arange(200_000), 7)
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.std().item() - (1 / 12) ** 0.5) < 0.005
    assert not torch.equal(u[:100], uniform(0, 0, torch.arange(100), 8))
    assert not torch.equal(u[:100], uniform(1, 0, torch.arange(100), 7))
    # many draw ids in one call: the same numbers as one call per id, each with its own range
    ids, low, high = torch.tensor([0, 7, 63, 10 ** 6]), torch.tensor([0, 0.5, -1, 2]), torch.tensor([1, 2, 1, 3])
    grid = uniform(3, 4, torch.arange(50), ids, low, high)
    assert grid.shape == (50, 4)
    for j in range(4):
        assert torch.equal(grid[:, j], uniform(3, 4, torch.arange(50), int(ids[j]), float(low[j]), float(high[j])))


def test_crop_boxes_take_the_first_of_ten_tries_that_fits():
    """torchvision's RandomResizedCrop rule, try by try, against the boxes drawn for all tries at once."""
    import math
    mc = MultiCrop(global_size=24, local_size=10, local_crops=1, global_scale=(0.3, 1.0), local_scale=(0.9, 1.0))
    index = torch.arange(400)
    for c, (h, w) in [(0, (30, 40)), (2, (8, 90))]:  # the thin image: tries often fail, some fall back
        boxes = mc.crop_boxes(1, index, c, h, w)
        scale, n_fallback = mc.crops[c].scale, 0
        for i in range(len(index)):
            d = lambda what, lo=0.0, hi=1.0: float(mc._draw(1, index[i:i + 1], c, what, lo, hi))
            expected = None
            for t in range(10):
                target = torch.tensor(h * w, dtype=torch.float) * d(4 * t, *scale)
                ratio = torch.exp(torch.tensor(d(4 * t + 1, math.log(3 / 4), math.log(4 / 3))))
                bw, bh = torch.round(torch.sqrt(target * ratio)), torch.round(torch.sqrt(target / ratio))
                if 0 < bw <= w and 0 < bh <= h:
                    top = math.floor(d(4 * t + 2) * float(h - bh + 1))
                    left = math.floor(d(4 * t + 3) * float(w - bw + 1))
                    expected = [left, top, left + float(bw), top + float(bh)]
                    break
            if expected is None:
                n_fallback += 1
                bw, bh = min(w, round(h * 4 / 3)), h
                expected = [(w - bw) // 2, 0, (w - bw) // 2 + bw, bh]
            assert boxes[i].tolist() == expected, (c, i)
        assert (n_fallback > 0) == (c == 2)


def test_blur_zero_sigma_is_identity_and_blur_preserves_mean():
    x = torch.rand(2, 3, 16, 16)
    y = gaussian_blur(x, torch.tensor([0.0, 1.5]))
    torch.testing.assert_close(y[0], x[0])
    assert (y[1] - x[1]).abs().max() > 0.01
    assert y[1].mean().item() == pytest.approx(x[1].mean().item(), abs=0.02)


def test_config_refuses_bad_keys_and_values(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        resolve(sets=["learning_rate=0.1"])
    with pytest.raises(ValueError, match="teacher_temp"):
        resolve(sets=["teacher_temp=-1"])
    with pytest.raises(ValueError, match="batch_size must be int"):
        resolve(sets=["batch_size=many"])
    with pytest.raises(ValueError, match="unknown preset"):
        resolve(preset="nope")
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.01\nepochs: 3\n")
    cfg = resolve(preset="fmnist-cpu", file=str(f), sets=["epochs=4"])
    assert cfg.lr == 0.01 and cfg.epochs == 4 and cfg.embed_dim == PRESETS["fmnist-cpu"]["embed_dim"]


def test_collapse_watch_names_each_collapse():
    k = 1000
    watch = CollapseWatch(k, patience=3)
    uniform_m = dict(kl=1e-5, teacher_entropy=0.99 * np.log(k), batch_entropy=np.log(k))
    assert [watch.update(uniform_m) for _ in range(2)] == [None, None]
    assert "uniform" in watch.update(uniform_m)
    one = dict(kl=1e-5, teacher_entropy=0.01, batch_entropy=0.01)
    watch = CollapseWatch(k, patience=3)
    msgs = [watch.update(one) for _ in range(3)]
    assert msgs[-1] and "same prototype" in msgs[-1]
    healthy = dict(kl=0.5, teacher_entropy=2.0, batch_entropy=6.0)
    watch = CollapseWatch(k, patience=3)
    assert all(watch.update(healthy) is None for _ in range(10))


def test_koleo_is_minus_mean_log_nearest_distance_and_spreads_features():
    from dinokit.loss import koleo_loss
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # on the unit circle after normalisation
    # nearest neighbours: 0 -> 1 (sqrt 2), 1 -> 0 (sqrt 2), 2 -> 1 (sqrt 2)
    assert koleo_loss(x).item() == pytest.approx(-np.log(np.sqrt(2)), abs=1e-6)
    torch.manual_seed(0)
    feats = (torch.randn(32, 8) * 0.05 + torch.ones(8)).requires_grad_()  # huddled together
    opt = torch.optim.SGD([feats], lr=0.1)
    before = koleo_loss(feats).item()
    for _ in range(20):
        opt.zero_grad()
        koleo_loss(feats).backward()
        opt.step()
    assert koleo_loss(feats).item() < before - 0.5


def test_koleo_weight_adds_to_the_loss_and_is_logged():
    cfg = tiny_config()
    _, plain = run_steps(cfg, 1)
    trainer, with_koleo = run_steps(tiny_config(koleo_weight=0.5), 1)
    assert with_koleo[0] > plain[0]  # same weights and crops: only the KoLeo term differs (it is positive here)
    mc = MultiCrop(cfg.global_crop_size, cfg.local_crop_size, cfg.local_crops_number)
    images, index = (torch.rand(8, 3, 20, 20) * 255).to(torch.uint8), torch.arange(8)
    loss, stats = trainer.train_step(mc.photometric(mc.geometric(images, index, 0), index, 0), with_stats=True)
    assert stats["koleo"] > 0
    assert loss.item() == pytest.approx(stats["kl"] + stats["teacher_entropy"] + 0.5 * 2 * stats["koleo"], rel=1e-4)


def test_replan_relays_the_schedules_for_a_new_length():
    torch.manual_seed(0)
    cfg = tiny_config(epochs=10, warmup_epochs=1)
    trainer = Trainer(cfg, torch.device("cpu"), steps_per_epoch=4, total_steps=20)
    trainer.replan(30)
    expected = Schedules.build(cfg, 30, 4, cfg.batch_size)
    assert trainer.total_steps == 30 and len(trainer.sched.lr) == 30
    np.testing.assert_array_equal(trainer.sched.lr, expected.lr)
    np.testing.assert_array_equal(trainer.sched.momentum, expected.momentum)


def test_patch_loss_is_cross_entropy_at_masked_positions_with_its_own_center():
    from dinokit.loss import PatchLoss
    torch.manual_seed(0)
    loss = PatchLoss(out_dim=8, student_temp=0.1, center_momentum=0.9)
    loss.center.fill_(0.05)
    teacher = torch.randn(2, 5, 8)
    masks = torch.zeros(2, 5, dtype=torch.bool)
    masks[0, 1] = masks[1, 3] = masks[1, 4] = True
    student = torch.randn(3, 8)
    got = loss(student, teacher, masks, teacher_temp=0.04)
    q = torch.softmax((teacher[masks] - 0.05) / 0.04, -1)
    want = -(q * torch.log_softmax(student / 0.1, -1)).sum(-1).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(loss.center, 0.9 * 0.05 + 0.1 * teacher.reshape(10, 8).mean(0, keepdim=True))


@torch.no_grad()
def test_masked_patches_are_swapped_for_the_mask_token():
    torch.manual_seed(0)
    cfg = tiny_config(patch_loss_weight=1.0)
    student, _ = build_models(cfg)
    student.eval()
    student.mask_token.normal_()
    x = torch.randn(4, 3, 16, 16)
    out, patches = student(x, return_patches=True)  # no mask: every patch's head output
    assert patches.shape == (4, 16, cfg.out_dim) and torch.allclose(out, student(x))
    none = torch.zeros(4, 16, dtype=torch.bool)
    _, masked_out = student(x, masks=none | (torch.arange(16) == 5))  # patch 5 masked in every image
    assert masked_out.shape == (4, cfg.out_dim) and not torch.allclose(masked_out, patches[:, 5])
    tokens = student.backbone.prepare_tokens(x, none | (torch.arange(16) == 5), student.mask_token)
    torch.testing.assert_close(tokens[:, 6] - student.backbone.pos_embed[:, 6], student.mask_token.expand(4, -1))
