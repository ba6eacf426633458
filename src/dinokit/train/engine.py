"""DINO training: the paper's Algorithm 1 with multi-crop, schedules and everything a long run needs.

Read `train_step` first: it is the method. The rest builds the models, lays out the schedules, moves
through the data, and keeps the run safe (checkpoints, resume, signals, NaN guard).
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
try:  # torch >= 2.6
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # torch 2.4 and 2.5 (the project supports torch >= 2.4)
    from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed._tensor import DTensor
from tqdm import tqdm

from ..data.loader import EpochBatches, any_readable, epoch_loader, iters_per_epoch, on_device
from ..data.multicrop import MultiCrop
from ..data.sources import open_source
from ..eval.common import pick_device
from ..loss import DINOLoss, PatchLoss, koleo_loss
from ..models.convnets import CONVNETS, convnet
from ..models.heads import DINOHead, MultiCropWrapper
from ..models.vit import VIT_SIZES, VisionTransformer
from ..models.weights import backbone_arch
from . import distributed
from .checkpoint import crash_for_tests, load_latest, save_checkpoint
from .config import Config, apply, resolve_decode, resolve_precision
from .monitor import CollapseWatch, MetricsLog, plot_curves, teacher_stats
from .schedules import cosine_schedule


# ---- models ----------------------------------------------------------------------------------------
def build_backbone(cfg: Config, drop_path_rate: float) -> nn.Module:
    if cfg.arch in VIT_SIZES or cfg.arch == "vit":
        dim, depth, heads = VIT_SIZES.get(cfg.arch, (cfg.embed_dim, cfg.depth, cfg.num_heads))
        return VisionTransformer(img_size=cfg.global_crop_size, patch_size=cfg.patch_size, embed_dim=dim,
                                 depth=depth, num_heads=heads, drop_path_rate=drop_path_rate, stem=cfg.stem)
    return convnet(cfg.arch)


def build_models(cfg: Config):
    """Student (drop path) and teacher (none), same architecture; the teacher starts as the student."""
    student = build_backbone(cfg, cfg.drop_path_rate)
    teacher = build_backbone(cfg, 0.0)
    head = lambda: DINOHead(student.num_features, cfg.out_dim, use_bn=cfg.use_bn_in_head,
                            norm_last_layer=cfg.norm_last_layer, hidden_dim=cfg.head_hidden_dim,
                            bottleneck_dim=cfg.bottleneck_dim)
    masked = cfg.patch_loss_weight > 0
    student, teacher = MultiCropWrapper(student, head(), masked), MultiCropWrapper(teacher, head(), masked)
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


# ---- schedules -------------------------------------------------------------------------------------
@dataclass
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    freeze_last_layer_steps: int

    @classmethod
    def build(cls, cfg: Config, total_steps: int, steps_per_epoch: int, world_batch: int) -> "Schedules":
        # Warm-ups are given in epochs of the configured run; a shorter or longer run (time budget)
        # keeps their fraction of it.
        stretch = total_steps / (cfg.epochs * steps_per_epoch)
        steps = lambda epochs: int(round(epochs * steps_per_epoch * stretch))
        warm_t = min(steps(cfg.warmup_teacher_temp_epochs), total_steps)
        temp = np.concatenate([np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, warm_t),
                               np.full(total_steps - warm_t, cfg.teacher_temp)])
        return cls(lr=cosine_schedule(cfg.lr * world_batch / 256, cfg.min_lr, total_steps, 1,
                                      min(steps(cfg.warmup_epochs), total_steps)),
                   wd=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total_steps, 1),
                   momentum=cosine_schedule(cfg.momentum_teacher, 1.0, total_steps, 1),
                   teacher_temp=temp, freeze_last_layer_steps=steps(cfg.freeze_last_layer))


# ---- the step ----------------------------------------------------------------------------------------
def clip_gradients_(params: list[torch.Tensor], clip: float):
    """Scale each parameter's gradient to norm <= clip, separately (the paper code's rule)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or clip <= 0:
        return
    if isinstance(grads[0], DTensor):  # FSDP: each process holds a shard of each gradient
        grads = [g.to_local() for g in grads]
        squares = torch.stack(torch._foreach_norm(grads)) ** 2
        dist.all_reduce(squares)  # each parameter's whole norm, from its shards'
        norms = squares.sqrt()
    else:
        norms = torch.stack(torch._foreach_norm(grads))
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scale.unbind()))


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP (DTensor) parameter or gradient; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_(model: MultiCropWrapper):
    """FSDP: every parameter is split over the processes; each block, the head and the rest are gathered
    only while they run."""
    for block in getattr(model.backbone, "blocks", []):
        fully_shard(block)
    fully_shard(model.head)
    fully_shard(model)


def optimizer_by_index(state: dict) -> dict:
    """A full optimizer state keyed by parameter names (FSDP's) -> keyed by position, as a plain optimizer
    keys it: a checkpoint then loads with any process count, sharded or not."""
    if not state:  # ranks other than 0 get nothing
        return {}
    names = [n for g in state["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def optimizer_by_name(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """The inverse of optimizer_by_index, for this optimizer and model."""
    name_of = {p: n for n, p in model.named_parameters()}
    names = [name_of[p] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float):
    """teacher = m * teacher + (1 - m) * student, parameter by parameter (the teacher gets no gradient).
    With FSDP both are sharded the same way: each process updates its own shard."""
    t = [local(p) for p in teacher.parameters()]
    s = [local(p.detach()) for p in student.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


class Trainer:
    def __init__(self, cfg: Config, device: torch.device, steps_per_epoch: int, total_steps: int):
        self.cfg, self.device = cfg, device
        self.precision = resolve_precision(cfg.precision, device.type)
        self.student, self.teacher = build_models(cfg)
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
            shard_(self.student)
            shard_(self.teacher)
        elif dist.is_initialized():
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None)
        groups = param_groups(self.student)
        if cfg.optimizer == "adamw":
            # fused kernels on the CPU too: one pass per tensor, 4x faster than foreach there
            fused = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
            self.optimizer = torch.optim.AdamW(groups, lr=0.0, **fused)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9, foreach=True)
        self.loss = DINOLoss(cfg.out_dim, 2 + cfg.local_crops_number, cfg.student_temp,
                             cfg.center_momentum).to(device)
        self.patch_loss = PatchLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum).to(device) \
            if cfg.patch_loss_weight > 0 else None
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" and device.type == "cuda" else None
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        world_batch = cfg.batch_size
        self.sched = Schedules.build(cfg, total_steps, steps_per_epoch, world_batch)
        self.last_layer = list(self.student.head.last_layer.parameters())
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.step = 0

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.float16 if self.precision == "fp16" and self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # The step's parts, separate so that `dinokit bench` can time each one.
    def set_schedules(self, it: int) -> float:
        """Step `it`'s lr and weight decay into the optimizer; returns its teacher temperature."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.sched.lr[it])
            if i == 0:
                group["weight_decay"] = float(self.sched.wd[it])
        return float(self.sched.teacher_temp[it])

    def backward(self, loss: torch.Tensor):
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()

    def update_student(self, it: int):
        clip_gradients_(self.trainable, self.cfg.clip_grad)
        if it < self.sched.freeze_last_layer_steps:  # let the prototypes settle before they move
            for p in self.last_layer:
                p.grad = None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def train_step(self, crops: list[torch.Tensor], with_stats: bool = False) -> tuple[torch.Tensor, dict]:
        it, s = self.step, self.sched
        temp = self.set_schedules(it)

        masks = None
        if self.patch_loss is not None:  # the patches the student will not see, in each global view
            grid = [side // self.cfg.patch_size for side in crops[0].shape[-2:]]
            masks = torch.rand(2 * len(crops[0]), grid[0] * grid[1], device=self.device) < self.cfg.mask_ratio
        with self.autocast():
            teacher_out = self.teacher(crops[:2], return_patches=masks is not None)  # global views only
            if self.fsdp:  # FSDP leaves a root's parameters gathered for the backward; the teacher has none
                self.teacher.reshard()
            student_out = self.student_ddp(crops, return_features=True, masks=masks)  # every view
            if masks is not None:
                (teacher_out, teacher_patches), (student_out, features, student_patches) = teacher_out, student_out
            else:
                student_out, features = student_out
            stats = teacher_stats(teacher_out, self.loss.center, temp) if with_stats else {}
            loss = self.loss(student_out, teacher_out, temp)
            if with_stats:  # the DINO term is the teacher's entropy plus KL(teacher || student)
                stats["kl"] = float(loss.detach()) - stats["teacher_entropy"]
            if masks is not None:  # predict the teacher's view of the patches hidden from the student
                patch = self.patch_loss(student_patches, teacher_patches, masks, temp)
                loss = loss + self.cfg.patch_loss_weight * patch
                if with_stats:
                    stats["patch_loss"] = float(patch.detach())
            if self.cfg.koleo_weight > 0:  # spread each global view's features over the batch
                batch = len(crops[0])
                koleo = sum(koleo_loss(f) for f in features[:2 * batch].split(batch))
                loss = loss + self.cfg.koleo_weight * koleo
                if with_stats:
                    stats["koleo"] = float(koleo.detach()) / 2

        self.backward(loss)
        self.update_student(it)  # clip, freeze the last layer early on, optimizer step
        crash_for_tests(f"step:{it + 1}")  # test hook: a crash midway through a step
        ema_update_(self.teacher, self.student, float(s.momentum[it]))
        self.step += 1
        if with_stats:
            stats.update(lr=float(s.lr[it]), wd=float(s.wd[it]), momentum=float(s.momentum[it]),
                         teacher_temp=temp, center_norm=float(self.loss.center.norm()))
        return loss.detach(), stats

    def replan(self, total_steps: int):
        """Lay the schedules out again for a run of `total_steps` (a time budget re-measured)."""
        self.total_steps = total_steps
        self.sched = Schedules.build(self.cfg, total_steps, self.steps_per_epoch, self.cfg.batch_size)

    # ---- state ----
    def state(self, cfg_dict: dict, extra: dict) -> dict:
        """The checkpoint. With FSDP every process must call it: the full tensors are gathered to rank 0."""
        if self.fsdp:
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            student, teacher = (get_model_state_dict(m, options=full) for m in (self.student, self.teacher))
            optimizer = optimizer_by_index(get_optimizer_state_dict(self.student, self.optimizer, options=full))
        else:
            student, teacher = self.student.state_dict(), self.teacher.state_dict()
            optimizer = self.optimizer.state_dict()
        return {
            "student": student, "teacher": teacher,
            "optimizer": optimizer, "epoch": self.step // self.steps_per_epoch,
            "dino_loss": self.loss.state_dict(),
            **({"patch_loss": self.patch_loss.state_dict()} if self.patch_loss is not None else {}),
            **({"fp16_scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            "dinokit": {"version": 1, "arch": backbone_arch(self.student.backbone), "config": cfg_dict,
                        "step": self.step, "total_steps": self.total_steps,
                        "steps_per_epoch": self.steps_per_epoch, "torch_rng": torch.get_rng_state(),
                        **({"cuda_rng": torch.cuda.get_rng_state()} if self.device.type == "cuda" else {}),
                        **extra},
        }

    def load_state(self, ckpt: dict):
        if self.fsdp:  # every process read the full checkpoint; each keeps its shards
            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.student, ckpt["student"], options=full)
            set_model_state_dict(self.teacher, ckpt["teacher"], options=full)
            # Not strict: parameters that have not moved yet (the prototypes in the first epoch) have no state.
            set_optimizer_state_dict(self.student, self.optimizer,
                                     optimizer_by_name(ckpt["optimizer"], self.optimizer, self.student),
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            self.student.load_state_dict(ckpt["student"])
            self.teacher.load_state_dict(ckpt["teacher"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.loss.load_state_dict(ckpt["dino_loss"])
        if self.patch_loss is not None:
            self.patch_loss.load_state_dict(ckpt["patch_loss"])
        if self.scaler is not None and "fp16_scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["fp16_scaler"])
        meta = ckpt["dinokit"]
        self.step = int(meta["step"])
        torch.set_rng_state(meta["torch_rng"])
        if "cuda_rng" in meta and self.device.type == "cuda":
            torch.cuda.set_rng_state(meta["cuda_rng"])


# ---- the run -----------------------------------------------------------------------------------------
class StopRequested:
    """SIGTERM / SIGINT: finish the step, save, exit cleanly. A second signal exits at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            os._exit(128 + signum)
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint, then stopping "
              "(signal again to exit at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def build_data(cfg: Config):
    """The image source, its steps per epoch at the global batch, and the multi-crop augmentation."""
    source = open_source(cfg.data)
    multicrop = MultiCrop(cfg.global_crop_size, cfg.local_crop_size, cfg.local_crops_number,
                          cfg.global_crops_scale, cfg.local_crops_scale, seed=cfg.seed)
    return source, iters_per_epoch(len(source), cfg.batch_size), multicrop


def epoch_batches(cfg: Config, source, multicrop: MultiCrop, device: torch.device, epoch: int, rank: int = 0,
                  world: int = 1, start_batch: int = 0):
    """An epoch's (index, geometric crops, skipped) batches: decoded and cropped in the loader workers, or
    (decode = device) only read there, then decoded and cropped here on `device`."""
    encoded = resolve_decode(cfg.decode, device.type) == "device"
    loader = epoch_loader(EpochBatches(source, multicrop, cfg.batch_size, epoch, cfg.seed, rank, world, start_batch,
                                       encoded), cfg.num_workers, pin_memory=device.type == "cuda")
    return on_device(loader, source, multicrop, epoch, device) if encoded else loader


def calibrate(cfg: Config, device, steps_per_epoch: int, batches, multicrop: MultiCrop,
              warmup: int = 2, timed: int = 5) -> float:
    """Seconds per step, measured on a throwaway trainer; the global RNG is left as it was."""
    rng_state = torch.get_rng_state()
    probe = Trainer(cfg, device, steps_per_epoch, warmup + timed)
    t0, n = None, 0
    for b, (index, crops, _) in enumerate(batches):
        if b == warmup:
            t0 = time.perf_counter()
        if crops is not None:
            probe.train_step(multicrop.photometric([c.to(device) for c in crops], index, 0))
        if b >= warmup:
            n += 1
        if n == timed:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    torch.set_rng_state(rng_state)
    if t0 is None:
        raise ValueError("too few batches to measure the step time for --time-budget")
    return (time.perf_counter() - t0) / n


def train(cfg: Config, run_dir: str | Path, resume: bool = False, time_budget: float | None = None,
          max_steps: int | None = None, progress: bool = True, steps: int | None = None) -> dict:
    """Train; returns a summary. `time_budget` (seconds) sizes the schedule to fit; `steps` lays it out
    for exactly that many steps (warm-ups scaled alike); `max_steps` stops early with the schedule laid out
    for the whole run."""
    run_dir = Path(run_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    main_process = rank == 0
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if main_process else (lambda msg: None)

    ckpt = load_latest(run_dir, log) if resume else None
    fresh = ckpt is None
    if resume and ckpt is None:
        log(f"no checkpoint in {run_dir}: starting from scratch")
    if ckpt is None and (run_dir / "checkpoint.pt").exists():  # every process stops, not only rank 0
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, "
                              "or choose another --out")
    if ckpt is not None:
        saved = apply(Config(), ckpt["dinokit"]["config"]).validate()  # checked like any config: no surprises
        saved.fsdp = cfg.fsdp  # sharded or replicated may change on resume, like the process count
        saved.decode = cfg.decode  # and where images are decoded (a GPU's decoder rounds a little differently)
        if saved != cfg:
            changed = [k for k in cfg.to_dict() if getattr(saved, k) != getattr(cfg, k)]
            log(f"resuming with the run's saved configuration (ignoring changes to: {', '.join(changed)})")
        cfg = saved

    if cfg.batch_size % world:
        raise ValueError(f"the global batch {cfg.batch_size} does not split evenly over {world} processes")
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    source, steps_per_epoch, multicrop = build_data(cfg)
    total_steps = cfg.epochs * steps_per_epoch if ckpt is None else int(ckpt["dinokit"]["total_steps"])
    if ckpt is None and steps is not None:
        total_steps = steps
    started = time.time()
    reserve = 5.0 + 0.01 * (time_budget or 0)  # a budgeted run's final checkpoint and curves

    def steps_that_fit(sec_per_step: float) -> int:  # rank 0's number on every process: one schedule for all
        return distributed.broadcast_int(
            max(1, int((started + time_budget - reserve - time.time()) / sec_per_step)))
    if ckpt is None and time_budget is not None:
        probe_batches = epoch_batches(cfg, source, multicrop, device, 0, rank, world)
        sec_per_step = calibrate(cfg, device, steps_per_epoch, probe_batches, multicrop)
        total_steps = steps_that_fit(sec_per_step)
        log(f"time budget {time_budget:.0f}s: {sec_per_step * 1000:.0f} ms/step measured -> {total_steps} steps "
            f"({total_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch} steps)")
    trainer = Trainer(cfg, device, steps_per_epoch, total_steps)
    if ckpt is not None:
        trainer.load_state(ckpt)
        log(f"resumed from step {trainer.step} of {trainer.total_steps}")
    del ckpt
    if rank > 0:  # its own drop-path draws (the models are built; rank 0 keeps the one-process stream)
        torch.manual_seed(cfg.seed + 1_000_003 * rank + trainer.step)

    run_dir.mkdir(parents=True, exist_ok=True)

    def write_config():
        if main_process:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(
                {**cfg.to_dict(), "resolved": {"total_steps": trainer.total_steps, "steps_per_epoch": steps_per_epoch,
                                               "world_size": world, "device": str(device),
                                               "precision": trainer.precision,
                                               "decode": resolve_decode(cfg.decode, device.type)}}, sort_keys=False))
    write_config()
    # A fresh budgeted run measures its pace again at 10, 30, 60, 80 and 90% of the way and re-lays the
    # schedule to end on time: a few calibration steps on a machine whose load changes can be off by a third.
    replans = [0.1, 0.3, 0.6, 0.8, 0.9] if time_budget is not None and fresh else []
    pace_from = None  # (step, time) the pace is measured from: after the first steps' warm-up, then each re-plan
    if resume and main_process:
        drop_metrics_after(run_dir / "metrics.jsonl", trainer.step)
    metrics_log = MetricsLog(run_dir, enabled=main_process)
    watch = CollapseWatch(cfg.out_dim)
    skipped_path = run_dir / "skipped.txt"
    reported = set(l.split("\t")[0] for l in skipped_path.read_text().splitlines()) if skipped_path.exists() else set()
    step_limit = math.inf if max_steps is None else trainer.step + max_steps
    stop_at = min(trainer.total_steps, step_limit)
    bar = tqdm(total=stop_at, initial=trainer.step, desc="train", unit="step", disable=not (progress and main_process),
               dynamic_ncols=True)
    last_loss, window_images, window_start = float("nan"), 0, time.perf_counter()

    def diverged(what):
        return FloatingPointError(
            f"{what} at step {trainer.step}: stopping; the last good checkpoint in {run_dir} is left as it "
            "was. Lower lr, raise warmup_epochs, or use precision=fp32.")

    saved_at, readable = trainer.step, False

    def checkpoint():
        nonlocal saved_at
        if not all(bool(torch.isfinite(local(p)).all()) for p in trainer.student.parameters()):
            raise diverged("the student's weights are no longer finite")
        state = trainer.state(cfg.to_dict(), {"skipped": len(reported)})  # every process: FSDP gathers
        if main_process:
            save_checkpoint(state, run_dir)
        del state
        saved_at = trainer.step

    # A budgeted run also stops at its deadline, should the machine turn slower than it measured.
    deadline = started + time_budget - 2.0 if time_budget is not None else math.inf

    def replan_if_due():
        """At each re-plan point: the pace since the last one -> the schedule laid out again to end on time."""
        nonlocal pace_from, replans, stop_at
        if pace_from is None:
            if trainer.step >= 5:
                pace_from = (trainer.step, time.perf_counter())
            return
        if trainer.step < max(replans[0] * trainer.total_steps, pace_from[0] + 20):
            return
        now = time.perf_counter()
        sec_per_step = (now - pace_from[1]) / (trainer.step - pace_from[0])
        total = trainer.step + steps_that_fit(sec_per_step)
        if total != trainer.total_steps:
            log(f"re-planned at step {trainer.step}: {sec_per_step * 1000:.0f} ms/step -> {total} steps "
                f"(was {trainer.total_steps})")
            trainer.replan(total)
            stop_at = bar.total = min(total, step_limit)
            write_config()
        pace_from, replans = (trainer.step, now), replans[1:]

    def stop_agreed() -> bool:  # every process stops at the same step, whichever got the signal
        return distributed.any_process([stop.requested or time.time() > deadline])[0]

    stopping = False
    with StopRequested() as stop:
        while trainer.step < stop_at and not stopping:
            epoch, start_batch = divmod(trainer.step, steps_per_epoch)
            batches = epoch_batches(cfg, source, multicrop, device, epoch, rank, world, start_batch)
            for index, crops, skipped in batches:
                # A batch unreadable on one process is skipped by all; rank 0 reports every process's skips.
                missing, some_skipped = distributed.any_process([crops is None, bool(skipped)])
                if some_skipped and world > 1:
                    skipped = distributed.gather(skipped)
                for path, reason in skipped:
                    if path not in reported and main_process:
                        reported.add(path)
                        with open(skipped_path, "a") as f:
                            f.write(f"{path}\t{reason}\n")
                        log(f"skipped {path}: {reason}")
                if missing:  # every image of this batch was unreadable
                    if not readable and not (readable := any_readable(source)):
                        raise ValueError(f"no readable image in {cfg.data}: every one of its {len(source)} files "
                                         f"was skipped (reasons in {skipped_path})")
                    trainer.step += 1
                    bar.update(1)
                    stopping = stop_agreed()
                    if trainer.step >= stop_at or stopping:
                        break
                    continue
                crops = multicrop.photometric([c.to(device, non_blocking=True) for c in crops], index, epoch)
                log_now = (trainer.step + 1) % cfg.log_every == 0 or trainer.step + 1 == stop_at
                loss, stats = trainer.train_step(crops, with_stats=log_now)
                window_images += len(index) * world
                if device.type == "cpu" or log_now:
                    last_loss = loss.item()
                    if not math.isfinite(last_loss):
                        raise diverged(f"the loss is {last_loss}")
                if log_now:
                    if dist.is_initialized():  # every logged number is the mean over processes
                        vals = torch.tensor([last_loss, *stats.values()], device=device)
                        dist.all_reduce(vals)
                        last_loss, *rest = (vals / world).tolist()
                        stats = dict(zip(stats, rest))
                    now = time.perf_counter()
                    stats.update(step=trainer.step, epoch=trainer.step / steps_per_epoch, loss=last_loss,
                                 images_per_s=window_images / (now - window_start), skipped=len(reported),
                                 elapsed_s=time.time() - started)
                    window_images, window_start = 0, now
                    metrics_log.write(stats)
                    warning = watch.update(stats)
                    if warning:
                        log(warning)
                    bar.set_postfix(loss=f"{last_loss:.3f}", ips=f"{stats['images_per_s']:.0f}")
                bar.update(1)
                if replans:
                    replan_if_due()
                stopping = stop_agreed()
                if trainer.step % cfg.save_every_steps == 0 or trainer.step == stop_at or stopping:
                    checkpoint()
                    if cfg.keep_every_epochs and trainer.step % (cfg.keep_every_epochs * steps_per_epoch) == 0 \
                            and main_process:
                        save_checkpoint_copy(run_dir, trainer.step // steps_per_epoch)
                if trainer.step >= stop_at or stopping:
                    break
        if saved_at != trainer.step:  # stopped between steps (a signal, a skipped batch): save where it is
            checkpoint()
    if trainer.step < stop_at and time.time() > deadline:
        log(f"time budget reached at step {trainer.step} of {trainer.total_steps}: the machine ran slower than "
            "measured at the start; --resume continues the schedule")
    bar.close()
    metrics_log.close()
    curves = plot_curves(run_dir) if main_process else None
    summary = {"run_dir": str(run_dir), "step": trainer.step, "total_steps": trainer.total_steps,
               "finished": trainer.step >= trainer.total_steps, "stopped_by_signal": stop.requested,
               "loss": last_loss, "skipped": len(reported), "seconds": time.time() - started,
               "curves": str(curves) if curves else None}
    return summary


def drop_metrics_after(path: Path, step: int):
    """On resume, forget the rows of steps after the checkpoint (a crash leaves them, and they run again)
    and a half-written last line."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()

    def keep(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False
    kept = [line for line in lines if keep(line)]
    if len(kept) < len(lines):
        path.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
        os.replace(path.with_suffix(".tmp"), path)


def save_checkpoint_copy(run_dir: Path, epoch: int):
    import shutil
    kept = run_dir / f"checkpoint{epoch:04d}.pt"
    shutil.copyfile(run_dir / "checkpoint.pt", kept.with_name(kept.name + ".tmp"))
    os.replace(kept.with_name(kept.name + ".tmp"), kept)  # never a half copy under the final name
