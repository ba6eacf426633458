"""The training run: data in, `Trainer.train_step` over and over, and everything a long run needs around it
(its length, a time budget, metrics, checkpoints, resume, signals, the NaN guard)."""
import math
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from ..data.loader import any_readable, build_data, run_batches
from ..device import pick_device, reuse_freed_host_memory
from . import autotune, distributed
from .checkpoint import keep_copy, load_latest, restore_training_state, save_atomic, save_checkpoint, training_state
from .config import Config, apply, resolve_decode
from .fsdp import local
from .init import InitWeights, describe
from .knn_monitor import KnnMonitor
from .monitor import (DINO_PANELS, KNN_PANELS, CollapseWatch, MetricsLog, SkippedFiles, drop_metrics_after,
                      plot_curves, read_metrics)
from .step import NoClock, Trainer


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


class TimeBudget:
    """A run that must end within `seconds` of `started`. It is laid out over the steps that fit at the pace
    measured before it starts, then measured again at 10, 30, 60, 80 and 90% of the way (a few calibration
    steps on a machine whose load changes can be off by a third) and re-laid to end on time; whatever
    happens, it stops at the deadline."""

    POINTS = (0.1, 0.3, 0.6, 0.8, 0.9)

    def __init__(self, seconds: float, started: float, replan: bool = True):
        self.end = started + seconds - (5.0 + 0.01 * seconds)  # room for the final checkpoint and curves
        self.deadline = started + seconds - 2.0
        self.points = list(self.POINTS) if replan else []
        self.pace_from: tuple[int, float] | None = None  # (step, time) the pace is measured from
        self.sec_per_step = math.nan  # the last pace measured, per full-size step
        self.early_share, self.early_cost = 0.0, 1.0  # early_crops: the share of steps, their cost relative

    def full_steps(self, first: int, stop: int, total: int) -> float:
        """Steps first..stop-1 of a run of `total`, counted in full-size steps (an early one costs less)."""
        early = max(0, min(stop, round(self.early_share * total)) - first)
        return stop - first - early * (1 - self.early_cost)

    def total_that_fits(self, step: int, sec_per_step: float) -> int:
        """The run's length such that its steps from `step` on end on time, at `sec_per_step` per full-size
        step; its early share of steps at their own cost. Rank 0's number on every process."""
        full = max(1, int((self.end - time.time()) / sec_per_step))
        f, r = self.early_share, self.early_cost
        total = (full + r * step) / (1 - f + f * r)  # full = r (f total - step) + (1 - f) total
        return distributed.broadcast_int(max(step + 1, int(total)) if f * total > step else step + full)

    def replan(self, step: int, total: int) -> int | None:
        """At a re-plan point, the run's new length from the pace since the last one; else None."""
        if not self.points:
            return None
        if self.pace_from is None:  # the pace counts after the first steps' warm-up
            if step >= 5:
                self.pace_from = (step, time.perf_counter())
            return None
        if step < max(self.points[0] * total, self.pace_from[0] + 20):
            return None
        now = time.perf_counter()
        self.sec_per_step = (now - self.pace_from[1]) / self.full_steps(self.pace_from[0], step, total)
        self.pace_from, self.points = (step, now), self.points[1:]
        return self.total_that_fits(step, self.sec_per_step)

    def new_length(self, step: int, total: int, log) -> int | None:
        """`replan`'s new length of the run when it differs from `total`, logged; else None."""
        new = self.replan(step, total)
        if new is None or new == total:
            return None
        log(f"re-planned at step {step}: {self.sec_per_step * 1000:.0f} ms/step -> {new} steps (was {total})")
        return new

    def past_deadline(self) -> bool:
        return time.time() > self.deadline


def measure_step(cfg: Config, device: torch.device, per_epoch: int, source, multicrop, decode: str,
                 rank: int, world: int, warmup: int = 2, timed: int = 5, early: bool = False,
                 give_up: float | None = None) -> float:
    """Seconds per step, data included, measured on a throwaway trainer; the global RNG is left as it was.
    Full-size steps, or with `early` the steps on `early_crops`. `give_up`: see `seconds_per_step`."""
    with torch.random.fork_rng(devices=[]):  # the probe's draws leave the run's stream as it was
        probe = Trainer(cfg, device, per_epoch, warmup + timed)
        probe.early_share = float(early)
        batches = run_batches(cfg, source, multicrop, device, 0, rank, world, decode, length=warmup + timed)
        return seconds_per_step(lambda batch: probe.train_step(batch.views), batches, device, warmup, give_up)


def seconds_per_step(run_step, batches, device: torch.device, warmup: int = 2,
                     give_up: float | None = None) -> float:
    """Seconds per step, data included: `run_step(batch)` over `batches`, the first `warmup` untimed (a
    batch of unreadable images counts as a step, as in the run). Any loop's time budget sizes its run by it.
    With `give_up`, a step after the first (which may compile kernels) slower than that ends the measurement:
    its time is returned (a candidate that slow has lost; emulated bf16 can take a minute a step).

    >>> from types import SimpleNamespace
    >>> seconds_per_step(lambda batch: None, [SimpleNamespace(views=[0])] * 4, torch.device("cpu")) >= 0
    True
    """
    t0, n, last = None, 0, time.perf_counter()
    for b, batch in enumerate(batches):
        if b == warmup:
            t0 = time.perf_counter()
        if batch.views is not None:
            run_step(batch)
        n += b >= warmup
        if give_up is not None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if b > 0 and now - last > give_up:
                return now - last
            last = now
    if device.type == "cuda":
        torch.cuda.synchronize()
    if t0 is None or n == 0:
        raise ValueError("too few batches to measure the step time for --time-budget")
    return (time.perf_counter() - t0) / n


def check_run_folder(run_dir: Path, resume: bool):
    """Refuse an --out that would overwrite what a user made: a file, a run without --resume, or a folder of
    other files. With --resume, a folder where a run started and saved no checkpoint yet is started again."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--out {run_dir} is a file, not a folder: choose another --out")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if (run_dir / "checkpoint.pt").exists():
        if not resume:
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
        return
    if not started_run(run_dir):
        raise FileExistsError(f"{run_dir} is not empty and holds no dinokit run: its files could be overwritten; "
                              "choose a new or empty --out folder")
    if not resume:
        raise FileExistsError(f"{run_dir} holds a run that saved no checkpoint yet; pass --resume to start it again, "
                              "or choose another --out")


def started_run(run_dir: Path) -> bool:
    """Whether a dinokit run wrote this folder's config.yaml (it carries the run's `resolved` block)."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and isinstance(saved.get("resolved"), dict) and "total_steps" in saved["resolved"]


def resume_point(cfg: Config, run_dir: Path, resume: bool, log) -> tuple[Config, dict | None]:
    """The configuration to run and the checkpoint to start from (None: a fresh run). On resume the run's
    saved configuration wins, checked like any other; only where it runs may change."""
    check_run_folder(run_dir, resume)  # every process stops, not only rank 0
    distributed.barrier()  # and every process has looked before rank 0 writes anything there
    ckpt = load_latest(run_dir, log) if resume else None
    if resume and ckpt is None:
        log(f"no checkpoint in {run_dir}: starting from scratch")
    if ckpt is None:
        return cfg, None
    saved = apply(Config(), ckpt["dinokit"]["config"]).validate()  # checked like any config: no surprises
    saved.fsdp = cfg.fsdp  # sharded or replicated may change on resume, like the process count
    saved.decode = cfg.decode  # and where images are decoded (a GPU's decoder rounds a little differently)
    auto = {"precision": "auto", "threads": 0}  # resolved when the run started: kept, not a change
    changed = [k for k in cfg.to_dict() if getattr(saved, k) != getattr(cfg, k) and auto.get(k, ...) != getattr(cfg, k)]
    if changed:
        log(f"resuming with the run's saved configuration (ignoring changes to: {', '.join(changed)})")
    return saved, ckpt


def train(cfg: Config, run_dir: str | Path, resume: bool = False, time_budget: float | None = None,
          max_steps: int | None = None, progress: bool = True, steps: int | None = None, clock=None,
          init: InitWeights | None = None, monitor: KnnMonitor | None = None, notes: dict | None = None) -> dict:
    """Train with DINO into `run_dir`; returns a summary. `time_budget` (seconds) sizes the schedule to fit;
    `steps` lays it out for exactly that many steps (warm-ups scaled alike); `max_steps` is the run's total:
    it stops at that step (counted from the run's start, resumed or not), with the schedule laid out for the
    whole run, so the same command repeated with `resume` ends at the same step. `init` (`read_init`'s) starts
    a fresh run from pretrained weights (see train/init.py). `monitor` checks k-NN
    accuracy while training. `clock` (a `PhaseClock`) times the step's phases. `notes` go into config.yaml
    (the reasons of `--preset auto`).

    >>> summary = train(Config(data="photos/"), "runs/x", time_budget=900)  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    main_process = rank == 0
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if main_process else (lambda msg: None)
    cfg, ckpt = resume_point(cfg, run_dir, resume, log)
    if cfg.batch_size % world:
        raise ValueError(f"the global batch {cfg.batch_size} does not split evenly over {world} processes")
    if init is not None and ckpt is not None:
        log(f"resuming: the weights of --init {init.path} are not taken again (the run's checkpoint holds its own)")
        init = None
    if init is not None and cfg.fsdp and dist.is_initialized():
        init.optimizer = None  # sharded, the optimizer state starts fresh

    # ---- the run's length, and what it trains
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    reuse_freed_host_memory()
    decode = resolve_decode(cfg.decode, device.type)
    source, per_epoch, multicrop = build_data(cfg)
    started = time.time()
    measure = partial(measure_step, device=device, per_epoch=per_epoch, source=source, multicrop=multicrop,
                      decode=decode, rank=rank, world=world)
    cfg, tuned = autotune.choose(cfg, device, world, measure, time_budget=time_budget)  # precision auto: measured (a resumed run's is set)
    if tuned["reason"] != "given":
        log(autotune.describe(tuned))
    budget = TimeBudget(time_budget, started, replan=ckpt is None) if time_budget is not None else None
    sec_per_step = tuned.get("sec_per_step")  # measured (precision auto): it sizes the loader's prefetch too
    if ckpt is not None:
        total_steps = int(ckpt["dinokit"]["total_steps"])
    elif budget is not None:
        sec_per_step = sec_per_step or measure(cfg)
        if cfg.early_crops_share > 0:
            budget.early_share = cfg.early_crops_share
            budget.early_cost = measure(cfg, early=True) / sec_per_step
        total_steps = budget.total_that_fits(0, sec_per_step)
        log(f"time budget {time_budget:.0f}s: {sec_per_step * 1000:.0f} ms/step measured -> {total_steps} steps "
            f"({total_steps / per_epoch:.2f} epochs of {per_epoch} steps)"
            + (f", the first {cfg.early_crops_share:.0%} on {'/'.join(str(int(v)) for v in cfg.early_crops)} px at "
               f"{budget.early_cost:.2f} of the cost" if cfg.early_crops_share > 0 else ""))
    else:
        total_steps = steps if steps is not None else cfg.epochs * per_epoch
    trainer = Trainer(cfg, device, per_epoch, total_steps, init=init)
    trainer.clock = clock or NoClock()
    if init is not None:
        log(describe(init))
    if ckpt is not None:
        restore_training_state(trainer, ckpt)
        log(f"resumed from step {trainer.step} of {trainer.total_steps}")
    del ckpt
    if rank > 0:  # its own drop-path draws (the models are built; rank 0 keeps the one-process stream)
        torch.manual_seed(cfg.seed + 1_000_003 * rank + trainer.step)

    # ---- what the run writes
    run_dir.mkdir(parents=True, exist_ok=True)

    def write_config():
        if main_process:
            resolved = {"total_steps": trainer.total_steps, "steps_per_epoch": per_epoch, "world_size": world,
                        "device": str(device), "precision": trainer.precision, "threads": cfg.threads,
                        "decode": decode, "precision_choice": {k: v for k, v in tuned.items() if k != "sec_per_step"},
                        **({"init": init.path, "init_head": init.student_head is not None} if init else {}),
                        **({"monitor_knn": [monitor.train_spec, monitor.test_spec]} if monitor else {}),
                        **(notes or {})}
            (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "resolved": resolved},
                                                                sort_keys=False))
    write_config()
    if resume and main_process:
        drop_metrics_after(run_dir / "metrics.jsonl", trainer.step)
    if monitor is not None:
        monitor.resume(read_metrics(run_dir))
    metrics_log = MetricsLog(run_dir, enabled=main_process)
    watch = CollapseWatch(cfg.out_dim)
    skipped = SkippedFiles(run_dir, log, enabled=main_process)
    step_limit = math.inf if max_steps is None else max_steps
    stop_at = min(trainer.total_steps, step_limit)
    bar = tqdm(total=stop_at, initial=trainer.step, desc="train", unit="step", disable=not (progress and main_process),
               dynamic_ncols=True)

    def diverged(what: str) -> FloatingPointError:
        kept = (f"the last good checkpoint in {run_dir} is left as it was" if (run_dir / "checkpoint.pt").exists()
                else "no checkpoint was saved before it")
        return FloatingPointError(f"{what} at step {trainer.step}: stopping; {kept}. Lower lr, raise warmup_epochs, "
                                  "or use precision=fp32.")

    def checkpoint():
        if not all(bool(torch.isfinite(local(p)).all()) for p in trainer.student.parameters()):
            raise diverged("the student's weights are no longer finite")
        state = training_state(trainer, cfg.to_dict(), {"skipped": len(skipped)})  # every process: FSDP gathers
        if main_process:
            save_checkpoint(state, run_dir)
            if cfg.keep_every_epochs and trainer.step % (cfg.keep_every_epochs * per_epoch) == 0:
                keep_copy(run_dir, trainer.step // per_epoch)
        return trainer.step

    def check_knn():
        row = monitor.check(trainer)
        log(f"k-NN at step {trainer.step}: top-1 {row['knn_top1']:.2f}%"
            + (f" (student {row['knn_top1_student']:.2f}%)" if "knn_top1_student" in row else "")
            + f", {row['knn_seconds']:.1f} s")
        metrics_log.write({"step": trainer.step, "epoch": trainer.step / per_epoch, **row})
        if warning := watch.update_knn(row["knn_top1"]):
            log(warning)
        if monitor.is_best(row):
            state = training_state(trainer, cfg.to_dict(), {"skipped": len(skipped), **row})
            if main_process:
                save_atomic(state, run_dir / "checkpoint.best.pt")

    # ---- the loop
    last_loss, window_images, window_wait, window_start = float("nan"), 0, 0.0, time.perf_counter()
    saved_at, readable, stopping = trainer.step, False, False
    batches = run_batches(cfg, source, multicrop, device, trainer.step, rank, world, decode, sec_per_step=sec_per_step)
    with StopRequested() as stop:
        while trainer.step < stop_at and not stopping:
            waited = time.perf_counter()
            batch = next(batches)
            window_wait += time.perf_counter() - waited
            trainer.clock.mark("data")
            # A batch unreadable on one process is skipped by all; rank 0 reports every process's skips.
            missing, some_skipped = distributed.any_process([batch.views is None, bool(batch.skipped)])
            skipped.report(distributed.gather(batch.skipped) if some_skipped and world > 1 else batch.skipped)
            if missing:  # every image of this batch was unreadable: the step is skipped
                if not readable and not (readable := any_readable(source)):
                    raise ValueError(f"no readable image in {cfg.data}: every one of its {len(source)} files "
                                     f"was skipped (reasons in {skipped.path})")
                trainer.step += 1
            else:
                log_now = (trainer.step + 1) % cfg.log_every == 0 or trainer.step + 1 == stop_at
                loss, stats = trainer.train_step(batch.views, with_stats=log_now)
                window_images += len(batch.index) * world
                if device.type == "cpu" or log_now:  # on a GPU, reading the loss would wait for the step
                    last_loss = loss.item()
                    if not math.isfinite(last_loss):
                        raise diverged(f"the loss is {last_loss}")
                if log_now:
                    last_loss, stats = distributed.mean_over_processes(last_loss, stats, device)
                    now = time.perf_counter()
                    stats.update(step=trainer.step, epoch=trainer.step / per_epoch, loss=last_loss,
                                 images_per_s=window_images / (now - window_start),
                                 data_wait=window_wait / (now - window_start), skipped=len(skipped),
                                 elapsed_s=time.time() - started)
                    window_images, window_wait, window_start = 0, 0.0, now
                    metrics_log.write(stats)
                    if warning := watch.update(stats):
                        log(warning)
                    bar.set_postfix(loss=f"{last_loss:.3f}", ips=f"{stats['images_per_s']:.0f}")
            bar.update(1)
            if budget is not None and (total := budget.new_length(trainer.step, trainer.total_steps, log)):
                trainer.replan(total)
                stop_at = bar.total = min(total, step_limit)
                write_config()
            stopping = distributed.any_process([stop.requested or (budget is not None and budget.past_deadline())])[0]
            if trainer.step % cfg.save_every_steps == 0 or trainer.step == stop_at or stopping:
                saved_at = checkpoint()
            if monitor is not None and monitor.due(trainer.step, final=trainer.step == stop_at):
                check_knn()
        if saved_at != trainer.step:  # stopped between save points (a signal): save where it is
            checkpoint()
    if trainer.step < stop_at and budget is not None and budget.past_deadline():
        log(f"time budget reached at step {trainer.step} of {trainer.total_steps}: the machine ran slower than "
            "measured at the start; --resume continues the schedule")
    bar.close()
    metrics_log.close()
    panels = DINO_PANELS + (KNN_PANELS[:1 + (monitor is not None and monitor.student)] if monitor else [])
    curves = plot_curves(run_dir, panels=panels) if main_process else None
    return {"run_dir": str(run_dir), "step": trainer.step, "total_steps": trainer.total_steps,
            "finished": trainer.step >= trainer.total_steps, "stopped_by_signal": stop.requested,
            "loss": last_loss, "skipped": len(skipped), "seconds": time.time() - started,
            "precision": trainer.precision,
            "curves": str(curves) if curves else None}
