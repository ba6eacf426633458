"""DINO's loss, its center, and the optional terms of its successors, each against its definition."""
import numpy as np
import pytest
import torch

import dinokit
from dinokit.loss import PatchLoss, koleo_loss


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
    torch.testing.assert_close(loss_fn.center, center)  # the loss reads the center and leaves it
    loss_fn.update_center(teacher)  # the step moves it, explicitly, after the optimizer
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))


@pytest.mark.parametrize("ncrops, block_bytes", [(2, 1 << 20), (4, 4 * 16 * 2), (5, 4 * 16 * 3)])
def test_dino_loss_gradient_by_blocks_is_autograds(ncrops, block_bytes, monkeypatch):
    """The loss works a few batch rows at a time (cache-sized blocks) and computes its own gradient: the same
    value and gradient as autograd through the plain formula, whole batch or in blocks of 2 or 3 rows."""
    monkeypatch.setattr(dinokit.loss, "BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(ncrops)
    B, K, tt, ts = 7, 16, 0.05, 0.1
    student = torch.randn(ncrops * B, K, generator=g, dtype=torch.float64)
    teacher, center = torch.randn(2 * B, K, generator=g, dtype=torch.float64), torch.randn(1, K, dtype=torch.float64)
    q = torch.softmax((teacher - center) / tt, -1).chunk(2)

    def plain(s):
        logp = torch.log_softmax(s / ts, -1).chunk(ncrops)
        return torch.stack([-(q[i] * logp[v]).sum(-1).mean() for i in range(2) for v in range(ncrops) if v != i]).mean()

    ours = lambda s: dinokit.loss.CrossViewEntropy.apply(s, teacher, center, ts, tt, ncrops)
    student.requires_grad_()
    torch.testing.assert_close(ours(student), plain(student))
    torch.testing.assert_close(torch.autograd.grad(3 * ours(student), student)[0],
                               torch.autograd.grad(3 * plain(student), student)[0])
    assert torch.autograd.gradcheck(ours, (student,))


def test_centering_off_leaves_the_teacher_uncentred():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4 * 3, 8, generator=g), torch.randn(2 * 3, 8, generator=g)
    on, off = dinokit.DINOLoss(8, 4), dinokit.DINOLoss(8, 4, centering=False)
    center = torch.randn(1, 8, generator=g)  # not constant: a constant shift would not change a softmax
    for loss_fn in (on, off):
        loss_fn.center.copy_(center)
    torch.testing.assert_close(off.teacher_probs(teacher, 0.04), torch.softmax(teacher / 0.04, -1))
    torch.testing.assert_close(on.teacher_probs(teacher, 0.04), torch.softmax((teacher - center) / 0.04, -1))
    assert not torch.allclose(on(student, teacher, 0.04), off(student, teacher, 0.04))


def test_koleo_is_minus_mean_log_nearest_distance_and_spreads_features():
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


def test_patch_loss_is_cross_entropy_at_masked_positions_with_its_own_center():
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
    loss.update_center(teacher)
    torch.testing.assert_close(loss.center, 0.9 * 0.05 + 0.1 * teacher.reshape(10, 8).mean(0, keepdim=True))


def test_dino_loss_on_bf16_logits_is_the_fp32_loss_rounded():
    """Autocast hands the loss bf16 logits: it computes each block in fp32 and returns the gradient in bf16,
    without fp32 copies of the whole logits. The value is the fp32 loss of the same numbers, and the gradient
    is the fp32 gradient rounded to bf16, bit for bit."""
    g = torch.Generator().manual_seed(0)
    ncrops, B, K = 4, 6, 4096
    student = (torch.randn(ncrops * B, K, generator=g) * 2).bfloat16()
    teacher = (torch.randn(2 * B, K, generator=g) * 2).bfloat16()
    loss_fn = dinokit.DINOLoss(K, ncrops)
    loss_fn.center.copy_(torch.randn(1, K, generator=g) * 0.1)
    low, high = student.clone().requires_grad_(), student.float().requires_grad_()
    loss_low, loss_high = loss_fn(low, teacher, 0.04), loss_fn(high, teacher.float(), 0.04)
    assert loss_low.dtype == torch.float32
    torch.testing.assert_close(loss_low, loss_high, rtol=0, atol=0)
    loss_low.backward()
    loss_high.backward()
    assert low.grad.dtype == torch.bfloat16
    assert torch.equal(low.grad, high.grad.bfloat16())
