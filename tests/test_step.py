"""The training step's parts, each against its definition, and the step as a whole."""
import pytest
import torch
import torch.nn as nn

from dinokit.data.multicrop import MultiCrop
from dinokit.train.config import Config
from dinokit.train.step import Trainer, build_models, clip_gradients_, ema_update_, param_groups
from test_loop import TINY


def tiny_config(**kw) -> Config:
    return Config(**{**TINY, **kw}).validate()


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


@torch.no_grad()
def test_masked_patches_are_swapped_for_the_mask_token():
    torch.manual_seed(0)
    cfg = tiny_config(patch_loss_weight=1.0)
    student, _ = build_models(cfg)
    student.eval()
    student.mask_token.normal_()
    x = torch.randn(4, 3, 16, 16)
    out, _, patches = student(x, return_patches=True)  # no mask: every patch's head output
    assert patches.shape == (4, 16, cfg.out_dim)
    torch.testing.assert_close(out, student(x).logits)  # the [CLS]-only path: the same to float rounding
    assert student(x).patch_logits is None  # one return type whatever is asked: a field left empty
    none = torch.zeros(4, 16, dtype=torch.bool)
    masked_out = student(x, masks=none | (torch.arange(16) == 5)).patch_logits  # patch 5 masked in every image
    assert masked_out.shape == (4, cfg.out_dim) and not torch.allclose(masked_out, patches[:, 5])
    tokens = student.backbone.prepare_tokens(x, none | (torch.arange(16) == 5), student.mask_token)
    torch.testing.assert_close(tokens[:, 6] - student.backbone.pos_embed[:, 6], student.mask_token.expand(4, -1))


def test_patch_term_with_batchnorm_in_the_head():
    """iBOT's term beside the small recipe's BatchNorm head: the head normalises rows of tokens, whatever the
    patch outputs' shape (the teacher's are views x patches; this once stopped a run at its first step)."""
    trainer, _ = run_steps(tiny_config(patch_loss_weight=1.0, use_bn_in_head=True), 2)
    assert trainer.step == 2 and trainer.patch_loss.center.abs().sum() > 0
    with torch.no_grad():
        x = torch.randn(4, 3, 16, 16)
        patches = trainer.teacher.eval()(x, return_patches=True).patch_logits
        tokens = trainer.teacher.backbone.forward_features(x)[:, 1:]
        torch.testing.assert_close(patches, trainer.teacher.head(tokens.flatten(0, 1)).view(4, 16, -1))


def test_patch_term_with_a_conv_stem_on_crops_not_a_multiple_of_the_patch():
    """A conv stem makes ceil(side / patch) tokens a side: 18-px crops at patch 4 are 5 x 5, and the masks
    must be drawn on that grid (they were drawn on 4 x 4 and stopped the run)."""
    trainer, losses = run_steps(tiny_config(stem="conv", patch_loss_weight=1.0, global_crop_size=18), 2)
    assert trainer.step == 2 and all(torch.isfinite(torch.as_tensor(loss)) for loss in losses)
    assert trainer.patch_masks(torch.zeros(4, 3, 18, 18)).shape == (8, 25)


def test_student_keep_ratio_drops_the_students_tokens_only(monkeypatch):
    """The student's views lose tokens; the teacher still sees every token of the global views."""
    seen = []
    from dinokit.models import vit
    real = vit.keep_random_tokens
    monkeypatch.setattr(vit, "keep_random_tokens", lambda x, r: seen.append((x.shape, r)) or real(x, r))
    trainer, losses = run_steps(tiny_config(student_keep_ratio=0.5), 2)
    assert trainer.step == 2 and all(torch.isfinite(torch.as_tensor(loss)) for loss in losses)
    # per step: the global views (16 px: 16 tokens) and the local views (8 px: 4 tokens); never the teacher
    assert [(tuple(shape[1:2]), r) for shape, r in seen] == [((17,), 0.5), ((5,), 0.5)] * 2
    with pytest.raises(ValueError, match="student_keep_ratio below 1 needs a ViT"):
        tiny_config(arch="resnet18", student_keep_ratio=0.5)
    with pytest.raises(ValueError, match="two ways of masking"):
        tiny_config(student_keep_ratio=0.5, patch_loss_weight=1.0)
    with pytest.raises(ValueError, match=r"student_keep_ratio must be in \(0, 1\]"):
        tiny_config(student_keep_ratio=0.0)


@pytest.mark.parametrize("mode", ["student", "previous_epoch"])
def test_teacher_ablations_copy_the_student(mode):
    """Table 10's teachers: a copy of the student after every step, or after every epoch (4 steps here)."""
    trainer, _ = run_steps(tiny_config(teacher=mode), 3)
    same = lambda: all(torch.equal(t, s) for t, s in zip(trainer.teacher.parameters(), trainer.student.parameters()))
    assert same() == (mode == "student")  # after 3 steps: the previous-epoch teacher is still step 0's student
    mc = MultiCrop(16, 8, 2)
    images, index = (torch.rand(8, 3, 20, 20) * 255).to(torch.uint8), torch.arange(8)
    trainer.train_step(mc.photometric(mc.geometric(images, index, 0), index, 0))  # step 4: the epoch ends
    assert same()
