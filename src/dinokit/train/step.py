"""One DINO training step, the paper's Algorithm 1 with multi-crop, and the `Trainer` that holds its state.

Read `Trainer.train_step` first: it is the method. Everything else here builds what it needs.
"""
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..loss import DINOLoss, PatchLoss, koleo_loss
from ..models.convnets import CONVNETS
from ..models.heads import DINOHead, MultiCropOutput, MultiCropWrapper
from ..models.weights import build_backbone
from . import fsdp
from .checkpoint import crash_for_tests
from .config import Config, resolve_precision
from .init import InitWeights, apply_init
from .monitor import teacher_stats
from .schedules import Schedules


def build_models(cfg: Config) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with drop path) and teacher (none), backbone + head, same architecture; the teacher starts as
    a copy of the student and never gets gradients."""
    arch = cfg.backbone_arch()
    backbones = build_backbone(arch, cfg.drop_path_rate), build_backbone(arch, 0.0)
    student, teacher = (MultiCropWrapper(b, DINOHead(b.num_features, cfg.out_dim, use_bn=cfg.use_bn_in_head,
                                                     norm_last_layer=cfg.norm_last_layer,
                                                     hidden_dim=cfg.head_hidden_dim,
                                                     bottleneck_dim=cfg.bottleneck_dim),
                                         mask_token=cfg.patch_loss_weight > 0) for b in backbones)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weight matrices only: biases and all 1-D parameters (norms, gains) get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients_(params: list[torch.Tensor], clip: float):
    """Scale each parameter's gradient to norm <= clip, separately (the paper code's rule)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or clip <= 0:
        return
    scale = (clip / (fsdp.norms(grads) + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_([fsdp.local(g) for g in grads], list(scale.unbind()))


def early_views(views: list[torch.Tensor], sides: list[int]) -> list[torch.Tensor]:
    """Views resized to the early sides, [global, local] (progressive resizing: the first steps see
    smaller images, as FixRes-style training does, and the run ends at the evaluation's size).

    >>> views = [torch.rand(2, 3, 20, 20)] * 2 + [torch.rand(2, 3, 12, 12)]
    >>> [tuple(v.shape[-2:]) for v in early_views(views, [16, 8])]
    [(16, 16), (16, 16), (8, 8)]
    """
    out = []
    for v in views:
        side = int(sides[0] if v.shape[-1] == views[0].shape[-1] else sides[1])
        out.append(v if v.shape[-1] == side else
                   F.interpolate(v, size=(side, side), mode="bilinear", antialias=True, align_corners=False))
    return out


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float):
    """teacher = m * teacher + (1 - m) * student, parameter by parameter. With FSDP both are sharded the
    same way: each process updates its own shard.

    >>> teacher, student = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> ema_update_(teacher, student, 0.0)  # momentum 0: a copy
    >>> torch.equal(teacher.weight, student.weight)
    True
    """
    t = [fsdp.local(p) for p in teacher.parameters()]
    s = [fsdp.local(p.detach()) for p in student.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


class NoClock:
    """The step's timing marks, off (what training uses)."""

    def mark(self, phase: str):
        pass


class PhaseClock:
    """The step's timing marks, on (`dinokit bench`): each step's seconds per phase, the device synchronised
    at each mark so that a phase's time is its own, not the queue's. The training loop marks "data" when a
    batch has arrived: it opens a step's record."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.steps: list[dict[str, float]] = []
        self.last = time.perf_counter()

    def mark(self, phase: str):
        self.sync()
        now = time.perf_counter()
        if phase == "data" or not self.steps:
            self.steps.append({})
        self.steps[-1][phase] = self.steps[-1].get(phase, 0.0) + now - self.last
        self.last = now


class Trainer:
    """Student, teacher, optimizer, loss and schedules of a run, and the step that moves them.

    >>> cfg = Config(arch="vit", patch_size=4, embed_dim=32, depth=1, num_heads=2, out_dim=64, global_crop_size=16,
    ...              local_crops_number=0, batch_size=4, epochs=1, precision="fp32").validate()
    >>> trainer = Trainer(cfg, torch.device("cpu"), steps_per_epoch=10, total_steps=10)
    >>> loss, stats = trainer.train_step([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], with_stats=True)
    >>> trainer.step, sorted(stats)[:3]
    (1, ['batch_entropy', 'center_norm', 'kl'])
    """

    def __init__(self, cfg: Config, device: torch.device, steps_per_epoch: int, total_steps: int,
                 init: InitWeights | None = None):
        self.cfg, self.device = cfg, device
        self.precision = resolve_precision(cfg.precision, device.type)
        self.student, self.teacher = build_models(cfg)
        if init is not None:  # pretrained weights, before the models are moved, compiled or sharded
            apply_init(self.student, self.teacher, init)
        # channels-last convolutions run faster on GPUs (tensor cores); ViTs have no convolution that matters
        layout = torch.channels_last if device.type == "cuda" and cfg.arch in CONVNETS else torch.preserve_format
        self.student.to(device, memory_format=layout)
        self.teacher.to(device, memory_format=layout)
        if cfg.compile:  # in place, so state-dict keys stay the same; Inductor caches the code for later runs
            self.student.compile()
            self.teacher.compile()
        self.student_ddp = self.student
        self.fsdp = cfg.fsdp and dist.is_initialized()
        if self.fsdp:  # the teacher is sharded exactly like the student, so the EMA goes shard by shard
            fsdp.shard_(self.student)
            fsdp.shard_(self.teacher)
        elif dist.is_initialized():
            if device.type == "cuda" and any(isinstance(m, nn.BatchNorm1d) for m in self.student.modules()):
                # as the paper's code: BatchNorm in the head normalises over the global batch, in both models
                self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
                self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None)
        groups = param_groups(self.student)
        if cfg.optimizer == "adamw":
            # fused kernels on the CPU too: one pass per tensor, 4x faster than foreach there
            fused = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
            self.optimizer = torch.optim.AdamW(groups, lr=0.0, **fused)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9, foreach=True)
        self.dino_loss = DINOLoss(cfg.out_dim, 2 + cfg.local_crops_number, cfg.student_temp, cfg.center_momentum,
                                  centering=cfg.centering).to(device)
        self.patch_loss = PatchLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum).to(device) \
            if cfg.patch_loss_weight > 0 else None
        self.weights = {"patch": cfg.patch_loss_weight, "koleo": cfg.koleo_weight}  # of the optional terms
        if init is not None and init.center is not None:
            self.dino_loss.center.copy_(init.center)
        if init is not None and init.optimizer is not None and not self.fsdp:
            self.optimizer.load_state_dict(init.optimizer)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" and device.type == "cuda" else None
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.sched = Schedules.build(cfg, total_steps, steps_per_epoch)
        self.last_layer = list(self.student.head.last_layer.parameters())
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.clock = NoClock()
        self.early_share = cfg.early_crops_share  # a step-time probe sets 0 or 1
        self.step = 0

    def train_step(self, views: list[torch.Tensor], with_stats: bool = False) -> tuple[torch.Tensor, dict]:
        """One step on a batch's augmented views (the two global views first); returns the loss (a device
        tensor: reading it waits for the device) and, with `with_stats`, the numbers a log row shows."""
        it = self.step
        # schedules: this step's learning rate, weight decay, teacher momentum and temperature
        lr, wd, momentum, temp = self.sched.at(it)
        self.optimizer.param_groups[0]["weight_decay"] = wd
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if it < self.early_steps:  # the run's first steps on smaller views: cheaper, and as good early on
            views = early_views(views, self.cfg.early_crops)
        masks = self.patch_masks(views[0]) if self.patch_loss is not None else None
        with self.autocast():
            # teacher on the global views
            teacher = self.teacher(views[:2], return_patches=masks is not None)
            if self.fsdp:  # FSDP leaves a root's parameters gathered for the backward; the teacher has none
                self.teacher.reshard()
            self.clock.mark("teacher")
            # student on every view (with `student_keep_ratio`, on a random share of each view's patches)
            student = self.student_ddp(views, masks=masks, keep_ratio=self.cfg.student_keep_ratio)
            # loss: DINO's cross-view cross-entropy, plus the optional terms that are on
            terms = self.loss_terms(student, teacher, masks, temp, len(views[0]))
            loss = terms["dino"]
            for name, term in list(terms.items())[1:]:
                loss = loss + self.weights[name] * term
        stats = self.stats(terms, teacher, temp) if with_stats else {}
        # backward
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.clock.mark("student")
        # clip each parameter's gradient; the prototypes stay frozen at first, while the rest settles
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip_gradients_(self.trainable, self.cfg.clip_grad)
        if it < self.sched.freeze_last_layer_steps:
            for p in self.last_layer:
                p.grad = None
        # optimizer step on the student
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.clock.mark("optimizer")
        crash_for_tests(f"step:{it + 1}")  # test hook: a crash midway through a step
        # EMA: the teacher follows the student
        self.update_teacher(momentum)
        # center: a running mean of the teacher's outputs, for the next step's centering
        self.dino_loss.update_center(teacher.logits)
        if self.patch_loss is not None:
            self.patch_loss.update_center(teacher.patch_logits)
        self.clock.mark("ema")
        self.step += 1
        if with_stats:
            stats.update(lr=lr, wd=wd, momentum=momentum, teacher_temp=temp,
                         center_norm=float(self.dino_loss.center.norm()))
        return loss.detach(), stats

    def update_teacher(self, momentum: float):
        """The paper's EMA, or one of its ablations (Table 10): a copy of the student at every step, or at the
        end of every epoch (the previous epoch's student)."""
        if self.cfg.teacher == "ema":
            ema_update_(self.teacher, self.student, momentum)
        elif self.cfg.teacher == "student" or (self.step + 1) % self.steps_per_epoch == 0:
            ema_update_(self.teacher, self.student, 0.0)

    def loss_terms(self, student: MultiCropOutput, teacher: MultiCropOutput, masks: torch.Tensor | None,
                   temp: float, batch: int) -> dict[str, torch.Tensor]:
        """The loss's terms by name: DINO's first, then those of its successors that are switched on."""
        terms = {"dino": self.dino_loss(student.logits, teacher.logits, temp)}
        if masks is not None:  # iBOT: predict the teacher's view of the patches hidden from the student
            terms["patch"] = self.patch_loss(student.patch_logits, teacher.patch_logits, masks, temp)
        if self.weights["koleo"] > 0:  # KoLeo: spread each global view's features over the batch
            terms["koleo"] = sum(koleo_loss(f) for f in student.features[:2 * batch].split(batch))
        return terms

    @torch.no_grad()
    def stats(self, terms: dict, teacher: MultiCropOutput, temp: float) -> dict:
        """What a log row shows of the loss. The DINO term is the teacher's entropy plus KL(teacher || student)."""
        stats = teacher_stats(self.dino_loss.teacher_probs(teacher.logits, temp))
        stats["kl"] = float(terms["dino"]) - stats["teacher_entropy"]
        if "patch" in terms:
            stats["patch_loss"] = float(terms["patch"])
        if "koleo" in terms:
            stats["koleo"] = float(terms["koleo"]) / 2  # per global view
        return stats

    def patch_masks(self, global_view: torch.Tensor) -> torch.Tensor:
        """The patches the student will not see, in each of the two global views (bool, 2B x patches)."""
        grid = self.student.backbone.grid(*global_view.shape[-2:])  # a conv stem rounds a side up
        return torch.rand(2 * len(global_view), grid[0] * grid[1], device=self.device) < self.cfg.mask_ratio

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.float16 if self.precision == "fp16" and self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def replan(self, total_steps: int):
        """What remains of every schedule laid out again over a new run length (a time budget re-measured)."""
        self.sched = self.sched.replan(self.step, total_steps)
        self.total_steps = total_steps

    @property
    def early_steps(self) -> int:
        """Steps trained on `early_crops`: the configured share of the run, as long as the run is now."""
        return round(self.early_share * self.total_steps)
