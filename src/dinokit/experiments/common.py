"""What both experiments share: arms (one configuration each, on top of a common base), a time budget split
evenly between them, the runs themselves through the normal training loop (`dinokit.train.loop.train`), k-NN
checks at the same steps in every arm, and the pieces of the report.

How a budget is split: first the step time of the base configuration is measured (its precision chosen as
`dinokit train` chooses it) and one k-NN check is timed on the initial model (that check is also the k-NN at
initialisation, shared by every arm: each run starts from the same seeded weights). What remains of the
budget, less a reserve for the report, is divided evenly between the arms; from each arm's share come its
checks and a fixed overhead (data, model, checkpoints, curves), and the rest is steps at the measured pace, less
a safety margin. Every arm runs the same number of steps with its schedule laid out over them (`steps=`),
so the curves line up step for step and a run is reproducible with `--steps`. Should a run take longer than
planned (a busier machine), the arms after it get fewer steps, so that the whole still ends on time.
"""
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.loader import build_data
from ..data.sources import open_source
from ..device import pick_device
from ..train import autotune
from ..train.config import Config, apply, parse_sets, resolve, resolve_decode
from ..train.knn_monitor import KnnMonitor
from ..train.loop import measure_step, train
from ..train.monitor import read_metrics
from ..train.step import build_models

REPORT_RESERVE_S = 8.0  # figures, report.md and the JSON summary, after the last run
RUN_OVERHEAD_S = 6.0  # per run, besides its steps and checks: data, models, checkpoints, curves.png
SAFETY = 0.9  # of the steps that fit at the measured pace: the pace varies by ~5% from run to run
MIN_STEPS = 30  # fewer steps than this teach nothing: the budget is refused


@dataclass
class Arm:
    """One run of an experiment: its folder name, its legend, the config keys it changes."""
    name: str
    label: str
    overrides: dict
    student_knn: bool = False  # check the student's k-NN too (knn_top1_student rows)


@dataclass
class Plan:
    """How many steps each arm runs, and what that was decided from."""
    steps: int
    sec_per_step: float
    check_seconds: float  # one k-NN check of one model
    init_knn: float  # k-NN top-1 of the initial weights (every arm's starting point)
    precision: str
    threads: int
    steps_per_epoch: int
    reason: str


class KnnAtSteps(KnnMonitor):
    """The k-NN monitor, checking at the given steps (and at the run's last) instead of every N steps, so
    that every arm of an experiment is checked at the same steps.

    >>> monitor = KnnAtSteps("fashion-mnist:train", "fashion-mnist:test", at=[100, 200])  # doctest: +SKIP
    """

    def __init__(self, train_source: str, test_source: str, at: list[int] = (), **kwargs):
        super().__init__(train_source, test_source, every="1", **kwargs)
        self.at = set(at)

    def due(self, step: int, final: bool = False) -> bool:
        return step != self.last_step and (final or step in self.at)


def base_config(preset: str, sets: list[str], data: str, fixed: dict) -> Config:
    """The preset, the experiment's fixed keys, then the user's --set on top (a user may change anything;
    each arm's own keys come last: the report shows the configuration each arm ran)."""
    cfg = resolve(preset, None, [], data=data)
    return apply(apply(cfg, fixed), parse_sets(sets)).validate()


def write_subset(spec: str, n: int, seed: int, folder: Path) -> str:
    """`n` images of a source (a seeded random choice) as PNG files, in class sub-folders where the source
    has labels: a small training folder, so that a short run sees several epochs. Returns the folder."""
    source = open_source(spec)
    if not 0 < n <= len(source):
        raise ValueError(f"--train-subset must be in 1..{len(source)} for {source.name} (got {n})")
    picked = np.sort(np.random.default_rng(seed).permutation(len(source))[:n])
    for i in picked.tolist():
        label = f"class{source.labels[i]}" if source.labels is not None else "images"
        (folder / label).mkdir(parents=True, exist_ok=True)
        image = source.read(i).permute(1, 2, 0).numpy()
        Image.fromarray(image[..., 0] if (image[..., :1] == image).all() else image).save(
            folder / label / f"{i:06d}.png")
    return str(folder)


def knn_monitor(arm: Arm, knn: tuple[str, str, int], seed: int, at: list[int]) -> KnnAtSteps:
    train_src, test_src, subset = knn
    return KnnAtSteps(train_src, test_src, at=at, subset=subset, student=arm.student_knn, seed=seed)


def make_plan(cfg: Config, arms: list[Arm], budget: float | None, steps: int | None, checks: int,
              knn: tuple[str, str, int], started: float, log) -> tuple[Config, Plan]:
    """The configuration with its precision resolved, and the plan: steps per arm from `steps` or from the
    budget (see the module's docstring)."""
    device = pick_device(cfg.device)
    source, per_epoch, multicrop = build_data(cfg)
    decode = resolve_decode(cfg.decode, device.type)
    measure = partial(measure_step, device=device, per_epoch=per_epoch, source=source, multicrop=multicrop,
                      decode=decode, rank=0, world=1, warmup=3, timed=10)
    cfg, _ = autotune.choose(cfg, device, 1, measure)
    sec_per_step = measure(cfg)
    # one check on the initial weights: its time, and the k-NN every arm starts from
    rng = torch.get_rng_state()
    torch.manual_seed(cfg.seed)
    _, teacher = build_models(cfg)
    monitor = knn_monitor(arms[0], knn, cfg.seed, [])
    t0 = time.perf_counter()
    init_knn = monitor.accuracy(teacher.backbone.to(device), device)
    check_seconds = time.perf_counter() - t0
    torch.set_rng_state(rng)
    common = {"sec_per_step": sec_per_step, "check_seconds": check_seconds, "init_knn": init_knn,
              "precision": cfg.precision, "threads": cfg.threads, "steps_per_epoch": per_epoch}
    log(f"measured: {1000 * sec_per_step:.0f} ms/step ({cfg.precision}, {cfg.threads} threads), "
        f"{check_seconds:.1f} s per k-NN check; k-NN at initialisation {init_knn:.2f}%")
    if steps is not None:
        return cfg, Plan(steps=steps, reason=f"--steps {steps}", **common)
    per_arm = (budget - (time.time() - started) - REPORT_RESERVE_S) / len(arms)
    models_checked = 1 + any(a.student_knn for a in arms)
    fixed = RUN_OVERHEAD_S + (checks + 1) * models_checked * check_seconds
    n = int(SAFETY * (per_arm - fixed) / sec_per_step)
    if n < MIN_STEPS:
        raise ValueError(f"a budget of {budget:.0f}s leaves {max(n, 0)} steps per run at {1000 * sec_per_step:.0f} "
                         f"ms/step ({len(arms)} runs): give at least {minimum_budget(arms, fixed, sec_per_step):.0f}s")
    reason = (f"budget {budget:.0f}s: {per_arm:.0f}s per run, of which {fixed:.0f}s checks and overhead, "
              f"{SAFETY:.0%} of the rest at {1000 * sec_per_step:.0f} ms/step")
    return cfg, Plan(steps=n, reason=reason, **common)


def minimum_budget(arms: list[Arm], fixed: float, sec_per_step: float) -> float:
    return len(arms) * (fixed + MIN_STEPS * sec_per_step / SAFETY) + REPORT_RESERVE_S + 10


def run_arms(cfg: Config, arms: list[Arm], plan: Plan, out: Path, knn: tuple[str, str, int],
             check_steps, budget: float | None, started: float, log, progress: bool = False) -> dict[str, dict]:
    """Each arm through `dinokit.train.loop.train`, one after the other; returns, by arm, its metrics rows,
    steps and seconds. `check_steps(n)` gives the steps of an n-step run at which the k-NN is checked."""
    runs: dict[str, dict] = {}
    for i, arm in enumerate(arms):
        n = plan.steps
        if budget is not None and runs:  # a run that overran: the rest shrink to end on time
            left = (budget - (time.time() - started) - REPORT_RESERVE_S) / (len(arms) - i)
            last = runs[arms[i - 1].name]
            pace = last["seconds"] / last["steps"]
            if n * pace > left:
                n = max(MIN_STEPS, int(SAFETY * left / pace))
                log(f"{arm.name}: shortened to {n} steps to end within the budget (the last run took "
                    f"{last['seconds']:.0f}s)")
        arm_cfg = apply(cfg, arm.overrides).validate()
        log(f"[{i + 1}/{len(arms)}] {arm.label}: {n} steps -> {out / arm.name}")
        t0 = time.time()
        train(arm_cfg, out / arm.name, steps=n, progress=progress,
              monitor=knn_monitor(arm, knn, cfg.seed, check_steps(n)))
        runs[arm.name] = {"rows": read_metrics(out / arm.name), "steps": n, "seconds": time.time() - t0}
    return runs


def refuse_existing(out: Path, arms: list[Arm]):
    """Before any time is spent: an arm's folder that holds a run is not overwritten."""
    for arm in arms:
        if (out / arm.name / "checkpoint.pt").exists():
            raise ValueError(f"{out / arm.name} already holds a run; choose another --out")


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, from the rows that have it."""
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def tail_mean(rows: list[dict], key: str, fraction: float) -> float:
    """The mean of a metric over the last `fraction` of its logged rows: the run's end, less one row's noise."""
    _, values = series(rows, key)
    if not values:
        raise ValueError(f"no {key!r} rows were logged: the runs are too short for the experiment")
    return float(np.mean(values[-max(1, round(fraction * len(values))):]))


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def machine() -> str:
    cores = autotune.all_cores()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{autotune.machine_id().split('|')[0] or platform.machine()}, {cores} cores, {gpu}"


def plan_summary(plan: Plan) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(plan).items()}


def write_outputs(out: Path, name: str, summary: dict, report: str):
    """report.md and the JSON summary in the experiment's folder."""
    (out / "report.md").write_text(report)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")


def command_line(experiment: str, args, steps: int) -> str:
    """The command that runs the same arms again, step for step (`--steps` in place of the budget)."""
    parts = [f"dinokit experiment {experiment} --out {args.out} --steps {steps}"]
    for flag in ("data", "preset", "knn_train", "knn_test", "knn_subset", "train_subset", "checks"):
        if getattr(args, flag, None) is not None:
            parts.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}")
    return " ".join(parts + [f"--set {s}" for s in args.sets])


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, axes, path: Path) -> Path:
    """Both experiments' figures: against the step, gridded, saved small."""
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    pyplot().close(fig)
    return path


@dataclass
class Session:
    """One experiment's command: where it writes, its clock, its budget (None with --steps), its k-NN."""
    out: Path
    started: float
    budget: float | None
    knn: tuple[str, str, int]

    @staticmethod
    def log(msg: str):
        print(msg, file=sys.stderr, flush=True)


def start(args, arms: list[Arm]) -> Session:
    """Checks the common options and that no arm's run would be overwritten, then starts the clock."""
    check_common_args(args)
    refuse_existing(Path(args.out), arms)
    return Session(out=Path(args.out), started=time.time(), budget=None if args.steps is not None else args.budget,
                   knn=(args.knn_train, args.knn_test, args.knn_subset))


def finish(name: str, args, session: Session, plan: Plan, summary: dict, draw, write_report,
           table: str) -> int:
    """The end both experiments share: the summary's setup, the figure (`draw(out)`), report.md
    (`write_report(summary, command, figure_name)`) and the JSON, then the table and the verdict printed."""
    summary.update(budget=session.budget, preset=args.preset, plan=plan_summary(plan),
                   knn=f"{args.knn_subset} images of {args.knn_train} as memory, {args.knn_subset} of "
                       f"{args.knn_test} as queries")
    summary["budget_note"] = f" of a {session.budget:.0f} s budget" if session.budget else ""
    path = draw(session.out)
    summary["seconds"] = round(time.time() - session.started, 1)
    text = write_report(summary, command_line(name, args, plan.steps), path.name)
    write_outputs(session.out, name, summary, text)
    print(table)
    print(f"\nthe paper's result {'held' if summary['held'] else 'did not hold'}: {summary['verdict']}")
    print(f"report: {session.out / 'report.md'}  figure: {path}  summary: {session.out / (name + '.json')}")
    return 0


def add_common_args(p, what: str):
    """The options both experiments take."""
    from ..train.command import parse_duration
    p.add_argument("--out", required=True, help="experiment folder: one run folder per arm, report.md, figures, JSON")
    p.add_argument("--budget", type=parse_duration, default=parse_duration("10m"),
                   help=f"wall-clock time for the whole experiment, split evenly between its {what} (default 10m)")
    p.add_argument("--steps", type=int, help="steps per run instead of a budget (reproduces a report exactly)")
    p.add_argument("--data", default="fashion-mnist:train", help="training images (folder or fashion-mnist:train)")
    p.add_argument("--preset", default="fmnist-cpu", help="the base configuration (default fmnist-cpu)")
    p.add_argument("--knn-train", default="fashion-mnist:train", help="labelled source: the k-NN's memory")
    p.add_argument("--knn-test", default="fashion-mnist:test", help="labelled source: the k-NN's queries")
    p.add_argument("--knn-subset", type=int, default=2000, help="images of each k-NN source a check uses")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of every run (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_common_args(args):
    if args.steps is not None and args.steps < MIN_STEPS:
        raise ValueError(f"--steps must be at least {MIN_STEPS} (got {args.steps})")
    if args.budget <= 0:
        raise ValueError("--budget must be > 0")
    if args.data and not args.data.startswith("fashion-mnist:") and not Path(args.data).is_dir():
        raise FileNotFoundError(f"data folder {args.data} does not exist")
