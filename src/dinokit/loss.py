"""DINO's cross-view cross-entropy with centering and sharpening, and the optional terms of its successors."""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class DINOLoss(nn.Module):
    """H(teacher, student) over every (global teacher view, other student view) pair.

    Inputs are crop-major: `student_out` is (ncrops * B, K), `teacher_out` is (2 * B, K), the global crops
    first in both. The teacher's distribution is centred (a running mean of its raw outputs is subtracted)
    and sharpened (a low temperature); the center moves only when `update_center` is called, once per step
    after the optimizer, as in the paper's Algorithm 1.

    `centering=False` leaves the center out (the paper's collapse ablation); sharpening is the caller's
    choice of teacher temperature (equal to the student's: none).

    >>> loss_fn = DINOLoss(out_dim=1000, ncrops=4)
    >>> student, teacher = torch.randn(4 * 8, 1000), torch.randn(2 * 8, 1000)
    >>> loss = loss_fn(student, teacher, teacher_temp=0.04)
    >>> loss_fn.update_center(teacher)
    >>> float(loss_fn.center.abs().sum()) > 0
    True
    """

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: bool = True):
        super().__init__()
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The teacher's centred, sharpened distribution (no gradient)."""
        centred = teacher_out.float() - self.center if self.centering else teacher_out.float()
        return F.softmax(centred / teacher_temp, dim=-1).detach()

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        teacher_p = self.teacher_probs(teacher_out, teacher_temp)
        batch = student_logp.shape[0] // self.ncrops
        teacher_p = teacher_p.view(-1, batch, teacher_p.shape[-1])  # teacher views, B, K
        # sum over pairs (iq, v != iq) of -q_iq . log p_v  ==  -sum over v of w_v . log p_v, where w_v sums the
        # teacher views other than v: one product over all crops, no per-pair or stacked copies (4x faster).
        shared = min(len(teacher_p), self.ncrops)  # views seen by both teacher and student
        weights = teacher_p.sum(0).expand(self.ncrops, -1, -1).clone()
        weights[:shared] -= teacher_p[:shared]
        n_terms = len(teacher_p) * self.ncrops - shared
        return -(weights.view_as(student_logp) * student_logp).sum() / (batch * n_terms)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor):
        """center = m * center + (1 - m) * the mean of the teacher's raw outputs over the global batch."""
        update_center_(self.center, teacher_out, self.center_momentum)


@torch.no_grad()
def update_center_(center: torch.Tensor, outputs: torch.Tensor, momentum: float):
    """center = m * center + (1 - m) * mean of the teacher's outputs over the global batch."""
    batch_sum = outputs.float().sum(dim=0, keepdim=True)
    count = torch.full((), float(outputs.shape[0]), device=outputs.device)  # a fill: no host-to-GPU copy
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_sum)
        dist.all_reduce(count)
    center.mul_(momentum).add_(batch_sum / count, alpha=1 - momentum)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: -mean log distance from each L2-normalised feature to its nearest
    neighbour in the batch. It spreads the features over the sphere, against dimensional collapse.

    >>> round(koleo_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item(), 4)  # -log sqrt(2)
    -0.3466
    """
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.T
        similarity.fill_diagonal_(-2.0)
        nearest = similarity.argmax(dim=1)
    return -torch.log((x - x[nearest]).norm(dim=-1) + eps).mean()


class PatchLoss(nn.Module):
    """iBOT's masked-patch term: the student sees a global view with some patches masked and predicts, at
    each masked position, the teacher's centred, sharpened distribution for the unmasked patch. Its own
    running center, over all the teacher's patch outputs, moved by `update_center` like DINOLoss's."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_masked: torch.Tensor, teacher_patches: torch.Tensor, masks: torch.Tensor,
                teacher_temp: float) -> torch.Tensor:
        """student_masked: (M, K) at the M masked positions; teacher_patches: (V, P, K); masks: (V, P)."""
        teacher_p = F.softmax((teacher_patches[masks].float() - self.center) / teacher_temp, dim=-1).detach()
        student_logp = F.log_softmax(student_masked.float() / self.student_temp, dim=-1)
        return -(teacher_p * student_logp).sum(-1).sum() / max(int(masks.sum()), 1)

    @torch.no_grad()
    def update_center(self, teacher_patches: torch.Tensor):
        update_center_(self.center, teacher_patches.detach().flatten(0, 1), self.center_momentum)
