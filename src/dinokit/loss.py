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
        return sharpened(teacher_out.float().detach(), self.center if self.centering else 0.0, teacher_temp)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        center = self.center.clone() if self.centering else torch.zeros_like(self.center)  # the step moves it later
        return CrossViewEntropy.apply(student_out, teacher_out.detach(), center, self.student_temp, teacher_temp,
                                      self.ncrops)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor):
        """center = m * center + (1 - m) * the mean of the teacher's raw outputs over the global batch."""
        update_center_(self.center, teacher_out, self.center_momentum)


def sharpened(teacher_out: torch.Tensor, center: torch.Tensor | float, teacher_temp: float) -> torch.Tensor:
    """The teacher's distribution: softmax((t - center) / teacher_temp)."""
    return F.softmax((teacher_out - center) / teacher_temp, dim=-1)


# Bytes of logits a block of the loss works on: each op's temporaries stay in the CPU's L2 cache and are reused,
# where whole tensors (100 MB at the paper's K) are fresh memory at every op. On a GPU, one block.
BLOCK_BYTES = 1 << 20


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.element_size() < 4 else x


class CrossViewEntropy(torch.autograd.Function):
    """DINO's loss and its gradient, a few batch rows at a time.

    For student view v and image b: w = the sum of the teacher's centred, sharpened distributions of b's
    global views other than v; the loss is the mean over pairs of -w . log_softmax(s / Ts), and its gradient
    (|w| softmax(s / Ts) - w) / Ts, |w| the number of those views. By blocks of rows, each op touches only what
    fits in the cache, and the backward recomputes the softmaxes instead of keeping (views x B, K) tensors:
    the paper's K-way loss in 0.4 of the time on a CPU (BENCHMARKS.md). Logits may come in bf16 or fp16 (from
    autocast): each block is computed in fp32, and the gradient is returned in the logits' own dtype, without
    fp32 copies of the whole (views x B, K) tensors.
    """

    @staticmethod
    def blocks(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, student_temp: float,
               teacher_temp: float, ncrops: int):
        """For each block of batch rows and each student view: the rows, w, log_softmax(s / Ts)'s input."""
        K = student_out.shape[-1]
        batch = student_out.shape[0] // ncrops
        teacher, student = teacher_out.view(-1, batch, K), student_out.view(ncrops, batch, K)
        rows = batch if student_out.is_cuda else max(1, BLOCK_BYTES // (max(4, student_out.element_size()) * K))
        for b in range(0, batch, rows):
            q = sharpened(at_least_fp32(teacher[:, b:b + rows]), center, teacher_temp)
            total = q.sum(0)
            for v in range(ncrops):
                w = total - q[v] if v < len(q) else total
                yield v, slice(b, b + rows), w, at_least_fp32(student[v, b:b + rows]) / student_temp

    @staticmethod
    def forward(ctx, student_out, teacher_out, center, student_temp, teacher_temp, ncrops):
        args = (student_out, teacher_out, center, student_temp, teacher_temp, ncrops)
        ctx.save_for_backward(student_out, teacher_out, center)
        ctx.temps = student_temp, teacher_temp, ncrops
        batch = student_out.shape[0] // ncrops
        n_teacher = teacher_out.shape[0] // batch
        ctx.n = batch * (n_teacher * ncrops - min(n_teacher, ncrops))  # terms: images x (teacher, other view) pairs
        with torch.autocast(student_out.device.type, enabled=False):  # each block in fp32
            dots = [torch.dot(w.flatten(), F.log_softmax(z, dim=-1).flatten())
                    for _, _, w, z in CrossViewEntropy.blocks(*args)]
        return -torch.stack(dots).sum() / ctx.n

    @staticmethod
    def backward(ctx, grad):
        student_out, teacher_out, center = ctx.saved_tensors
        student_temp, teacher_temp, ncrops = ctx.temps
        K = student_out.shape[-1]
        out = torch.empty_like(student_out).view(ncrops, -1, K)
        in_place = out.element_size() >= 4  # else each block in fp32, then rounded into the logits' dtype
        scale = grad / (ctx.n * student_temp)
        for v, rows, w, z in CrossViewEntropy.blocks(student_out, teacher_out, center, *ctx.temps):
            block = torch.mul(F.softmax(z, dim=-1), w.sum(-1, keepdim=True), out=out[v, rows] if in_place else None)
            block.sub_(w).mul_(scale)
            if not in_place:
                out[v, rows] = block
        return out.view_as(student_out), None, None, None, None, None


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
