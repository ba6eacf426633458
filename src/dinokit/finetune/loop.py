"""The fine-tuning run: supervised training of a backbone and a new linear head on labelled images, with what a
long run needs around it, taken from DINO training's pieces: the loader (`data.loader`), atomic checkpoints and
their crash hook (`train.checkpoint`), the time budget and signal handling (`train.loop`), metrics and curves
(`train.monitor`) and the schedules (`train.schedules`)."""
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from ..data.loader import any_readable, run_batches, steps_per_epoch
from ..data.sources import open_source
from ..device import pick_device
from ..eval.features import extract_features
from ..eval.knn import topk_accuracy
from ..eval.knn_command import labels_for
from ..models.weights import backbone_arch, load_backbone
from ..train.autotune import all_cores
from ..train.checkpoint import crash_for_tests, load_latest, save_checkpoint
from ..train.config import resolve_precision
from ..train.loop import StopRequested, TimeBudget, seconds_per_step
from ..train.monitor import MetricsLog, SkippedFiles, drop_metrics_after, plot_curves
from ..train.schedules import cosine_schedule, stretch
from .config import FinetuneConfig
from .data import Augment, Mixer, crop_size, image_side, test_transform
from .model import build_classifier, param_groups

REQUIRED = ("model", "optimizer", "dinokit")  # what a fine-tuning checkpoint must hold to resume
PANELS = [("loss", "loss"), ("train_top1", "train top-1 (augmented batches)"), ("lr", "learning rate (head)"),
          ("images_per_s", "images / s"), ("test_top1", "test top-1")]


class FineTuner:
    """The network, its optimiser and learning-rate schedule, and the step that moves them.

    `lr` holds one value per step of the run (warm-up, then cosine); each parameter group takes it times its
    layer's `lr_scale`. Re-planned by a time budget, what is left is stretched as DINO's schedules are."""

    def __init__(self, cfg: FinetuneConfig, device: torch.device, num_classes: int, per_epoch: int, total_steps: int):
        self.cfg, self.device, self.per_epoch = cfg, device, per_epoch
        self.precision = resolve_precision(cfg.precision, device.type)
        self.model = build_classifier(cfg.weights, num_classes, cfg.which, cfg.from_scratch, cfg.drop_path).to(device)
        fused = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay, cfg.layer_decay), lr=0.0,
                                           **fused)
        self.mixer = Mixer(num_classes, cfg.seed, cfg.mixup, cfg.cutmix)
        warmup = min(total_steps, round(total_steps * cfg.warmup_epochs / cfg.epochs))
        self.lr = cosine_schedule(cfg.lr * cfg.batch_size / 256, cfg.min_lr, total_steps, 1, warmup)
        self.total_steps, self.step = total_steps, 0

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, with_stats: bool = False) -> tuple[torch.Tensor, dict]:
        """One AdamW step on a batch of augmented images (normalised, on the device) and their class ids."""
        lr = float(self.lr[self.step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        images, targets = self.mixer(images, labels, self.step)
        self.model.train()
        with self.autocast():
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        crash_for_tests(f"step:{self.step + 1}")  # test hook: a crash after the update, before the step counts
        self.step += 1
        stats = {}
        if with_stats:
            truth = targets if targets.ndim == 1 else targets.argmax(1)  # mixed: the larger share
            stats = {"lr": lr, "train_top1": float((logits.argmax(1) == truth).float().mean()) * 100}
        return loss.detach(), stats

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def replan(self, total_steps: int):
        self.lr = stretch(self.lr, self.step, total_steps)
        self.total_steps = total_steps

    def state(self, classes: list[str], extra: dict) -> dict:
        """The checkpoint: `model` holds the backbone (`backbone.`) and the head (`head.`); `dinokit` the
        architecture, so that `load_backbone` reads it, and everything an exact resume needs."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.step // self.per_epoch,
                "dinokit": {"version": 1, "kind": "finetune", "arch": backbone_arch(self.model.backbone),
                            "config": self.cfg.to_dict(), "classes": list(classes), "step": self.step,
                            "total_steps": self.total_steps, "steps_per_epoch": self.per_epoch,
                            "lr_schedule": torch.from_numpy(self.lr.copy()), "torch_rng": torch.get_rng_state(),
                            **({"cuda_rng": torch.cuda.get_rng_state(self.device)}
                               if self.device.type == "cuda" else {}), **extra}}

    def restore(self, ckpt: dict):
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        meta = ckpt["dinokit"]
        self.step, self.total_steps = int(meta["step"]), int(meta["total_steps"])
        self.lr = meta["lr_schedule"].numpy().astype(np.float64)
        torch.set_rng_state(meta["torch_rng"])
        if "cuda_rng" in meta and self.device.type == "cuda":
            torch.cuda.set_rng_state(meta["cuda_rng"], self.device)


def labelled(spec: str, what: str, classes: list[str] | None = None):
    """A labelled source; with `classes` (the training set's), checked to hold no other class."""
    source = open_source(spec)
    if source.labels is None:
        raise ValueError(f"--{what} {spec}: no labels; fine-tuning needs class sub-folders (or fashion-mnist:*)")
    if classes is not None:
        labels_for(source, [], classes)  # its classes checked before anything trains
    elif len(source.classes) < 2:
        raise ValueError(f"--{what} {spec}: a single class ({source.classes[0]}); a classifier needs two or more")
    return source


def measure_pace(cfg, device, num_classes, per_epoch, source, augment, warmup: int = 2, timed: int = 5) -> float:
    """Seconds per step, data included, on a throwaway fine-tuner; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):  # the probe's draws leave the run's stream as it was
        probe = FineTuner(cfg, device, num_classes, per_epoch, warmup + timed)
        batches = run_batches(cfg, source, augment, device, 0, length=warmup + timed)
        return seconds_per_step(lambda batch: probe.train_step(batch.views[0], labels_of(source, batch.index, device)),
                                batches, device, warmup)


def labels_of(source, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.tensor([source.labels[i] for i in index.tolist()], dtype=torch.long).to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, source, classes: list[str], size: int, device: torch.device, batch_size: int,
             num_workers: int = 0, progress: bool = False) -> dict:
    """Top-1 and top-5 (percent) of the classifier on a labelled source, images at the training crop size."""
    logits, kept, skipped = extract_features(model, source, batch_size, device, feature_fn=lambda m, x: m(x),
                                             transform=test_transform(size, image_side(source)),
                                             num_workers=num_workers, progress=progress)
    top1, top5 = topk_accuracy(logits, labels_for(source, kept, classes), len(classes))
    return {"test_top1": top1, "test_top5": top5, "n_test": len(kept), "test_skipped": len(skipped)}


def resume_point(cfg: FinetuneConfig, run_dir: Path, resume: bool, log) -> tuple[FinetuneConfig, dict | None]:
    """The configuration to run and the checkpoint to start from (None: a fresh run); on resume the run's
    saved configuration wins (only the device and the loader's workers may change)."""
    ckpt = load_latest(run_dir, log, required=REQUIRED) if resume else None
    if resume and ckpt is None:
        log(f"no checkpoint in {run_dir}: starting from scratch")
    if ckpt is None:
        if (run_dir / "checkpoint.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
        return cfg, None
    if ckpt["dinokit"].get("kind") != "finetune":
        raise ValueError(f"{run_dir} holds a DINO training run, not a fine-tuning run: choose another --out")
    saved = FinetuneConfig.from_dict({**ckpt["dinokit"]["config"], "device": cfg.device,
                                      "num_workers": cfg.num_workers})
    changed = [k for k, v in cfg.to_dict().items() if getattr(saved, k) != v]
    if changed:
        log(f"resuming with the run's saved configuration (ignoring changes to: {', '.join(changed)})")
    return saved, ckpt


def finetune(cfg: FinetuneConfig, run_dir: str | Path, resume: bool = False, time_budget: float | None = None,
             max_steps: int | None = None, steps: int | None = None, progress: bool = True) -> dict:
    """Fine-tune `cfg.weights` on `cfg.train` into `run_dir`, then score it on `cfg.test`; returns a summary.
    `time_budget` (seconds, the training's; the test follows) sizes the schedule to fit, `steps` lays it out
    over exactly that many steps, `max_steps` stops early with the schedule laid out for the whole run.

    >>> summary = finetune(FinetuneConfig(weights="runs/x/checkpoint.pt", train="photos/train",
    ...                                   test="photos/test"), "runs/ft", time_budget=300)  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    cfg, ckpt = resume_point(cfg.validate(), run_dir, resume, log)
    train_source = labelled(cfg.train, "train")
    classes = train_source.classes
    test_source = labelled(cfg.test, "test", classes) if cfg.test else None
    device = pick_device(cfg.device)
    torch.set_num_threads(all_cores())  # not what an earlier call left: the sums, and a resume, depend on it
    torch.manual_seed(cfg.seed)
    per_epoch = steps_per_epoch(len(train_source), cfg.batch_size)
    if ckpt is None:  # the training crops' size, from the images and the backbone's resolution
        native = getattr(load_backbone(cfg.weights, cfg.which), "img_size", None)
        size = cfg.image_size or crop_size(image_side(train_source), native)
    else:
        size = int(ckpt["dinokit"]["image_size"])
    augment = Augment(size, cfg.seed, cfg.crop_scale, cfg.randaug_ops, cfg.randaug_magnitude)
    started = time.time()
    budget = TimeBudget(time_budget, started, replan=ckpt is None) if time_budget is not None else None
    if ckpt is not None:
        total_steps = int(ckpt["dinokit"]["total_steps"])
    elif budget is not None:
        sec_per_step = measure_pace(cfg, device, len(classes), per_epoch, train_source, augment)
        total_steps = budget.total_that_fits(0, sec_per_step)
        log(f"time budget {time_budget:.0f}s: {sec_per_step * 1000:.0f} ms/step measured -> {total_steps} steps "
            f"({total_steps / per_epoch:.2f} epochs of {per_epoch} steps)")
    else:
        total_steps = steps if steps is not None else cfg.epochs * per_epoch
    tuner = FineTuner(cfg, device, len(classes), per_epoch, total_steps)
    if ckpt is not None:
        tuner.restore(ckpt)
        log(f"resumed from step {tuner.step} of {tuner.total_steps}")
    del ckpt

    # ---- what the run writes
    run_dir.mkdir(parents=True, exist_ok=True)

    def write_config():
        resolved = {"total_steps": tuner.total_steps, "steps_per_epoch": per_epoch, "device": str(device),
                    "precision": tuner.precision, "image_size": size, "classes": classes}
        (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "resolved": resolved}, sort_keys=False))
    write_config()
    if resume:
        drop_metrics_after(run_dir / "metrics.jsonl", tuner.step)
    metrics_log = MetricsLog(run_dir)
    skipped = SkippedFiles(run_dir, log)
    step_limit = math.inf if max_steps is None else tuner.step + max_steps
    stop_at = min(tuner.total_steps, step_limit)
    bar = tqdm(total=stop_at, initial=tuner.step, desc="finetune", unit="step", disable=not progress,
               dynamic_ncols=True)

    def checkpoint():
        if not all(bool(torch.isfinite(p).all()) for p in tuner.model.parameters()):
            raise FloatingPointError(f"the weights are no longer finite at step {tuner.step}: stopping; the last "
                                     f"good checkpoint in {run_dir} is left as it was. Lower --lr.")
        save_checkpoint(tuner.state(classes, {"image_size": size, "skipped": len(skipped)}), run_dir)
        return tuner.step

    # ---- the loop
    last_loss, window_images, window_start = float("nan"), 0, time.perf_counter()
    saved_at, readable, stopping = tuner.step, False, False
    batches = run_batches(cfg, train_source, augment, device, tuner.step)
    with StopRequested() as stop:
        while tuner.step < stop_at and not stopping:
            batch = next(batches)
            skipped.report(batch.skipped)
            if batch.views is None:  # every image of this batch was unreadable: the step is skipped
                if not readable and not (readable := any_readable(train_source)):
                    raise ValueError(f"no readable image in {cfg.train} (reasons in {skipped.path})")
                tuner.step += 1
            else:
                log_now = (tuner.step + 1) % cfg.log_every == 0 or tuner.step + 1 == stop_at
                loss, stats = tuner.train_step(batch.views[0], labels_of(train_source, batch.index, device), log_now)
                window_images += len(batch.index)
                if device.type == "cpu" or log_now:  # on a GPU, reading the loss would wait for the step
                    last_loss = loss.item()
                    if not math.isfinite(last_loss):
                        raise FloatingPointError(f"the loss is {last_loss} at step {tuner.step}: stopping; the last "
                                                 f"good checkpoint in {run_dir} is left as it was. Lower --lr.")
                if log_now:
                    now = time.perf_counter()
                    stats.update(step=tuner.step, epoch=tuner.step / per_epoch, loss=last_loss,
                                 images_per_s=window_images / (now - window_start), skipped=len(skipped),
                                 elapsed_s=time.time() - started)
                    window_images, window_start = 0, now
                    metrics_log.write(stats)
                    bar.set_postfix(loss=f"{last_loss:.3f}", top1=f"{stats['train_top1']:.0f}%")
            bar.update(1)
            if budget is not None and (total := budget.new_length(tuner.step, tuner.total_steps, log)):
                tuner.replan(total)
                stop_at = bar.total = min(total, step_limit)
                write_config()
            stopping = stop.requested or (budget is not None and budget.past_deadline())
            if tuner.step % cfg.save_every_steps == 0 or tuner.step == stop_at or stopping:
                saved_at = checkpoint()
        if saved_at != tuner.step:  # stopped between save points (a signal): save where it is
            checkpoint()
    bar.close()
    result = {}
    if test_source is not None and not stop.requested:
        result = evaluate(tuner.model, test_source, classes, size, device, 2 * cfg.batch_size, cfg.num_workers,
                          progress)
        metrics_log.write({"step": tuner.step, **result})
    metrics_log.close()
    curves = plot_curves(run_dir, panels=PANELS, title="fine-tuning")
    return {"run_dir": str(run_dir), "weights": cfg.weights, "from_scratch": cfg.from_scratch, "step": tuner.step,
            "total_steps": tuner.total_steps, "finished": tuner.step >= tuner.total_steps,
            "stopped_by_signal": stop.requested, "loss": last_loss, "image_size": size, "classes": len(classes),
            "skipped": len(skipped), "seconds": time.time() - started, **result,
            "curves": str(curves) if curves else None}
