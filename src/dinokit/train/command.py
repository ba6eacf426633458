"""`dinokit train`."""
import json
import math
import os
import re
import sys
from pathlib import Path

from . import distributed
from .checkpoint import CheckpointWriteError
from .config import auto_values, resolve
from .init import read_init
from .knn_monitor import KnnMonitor
from .loop import check_run_folder, train
from .presets import PRESETS


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '1h30m' -> seconds."""
    m = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or not m or not any(m.groups()):
        raise ValueError(f"cannot read duration {text!r} (examples: 90s, 15m, 1h30m)")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def log_main(message: str):
    """Notes on stderr, once: from rank 0 only when torchrun launched several processes."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


def register(sub):
    p = sub.add_parser("train", help="pretrain a backbone with DINO on a folder of images or a named data set")
    p.add_argument("--data", help="image folder (recursive) or fashion-mnist:train / fashion-mnist:test")
    p.add_argument("--out", required=True, help="run folder: config, metrics, checkpoints, curves")
    p.add_argument("--config", help="YAML file of config keys")
    p.add_argument("--preset", choices=["auto", *sorted(PRESETS)],
                   help="starting configuration (default auto: chosen from the data, the device and --time-budget, "
                        "unless --config is given)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--time-budget", type=parse_duration, help="fit the whole schedule into this long (e.g. 15m)")
    p.add_argument("--steps", type=int,
                   help="lay the schedule out for exactly N steps, warm-ups scaled (a time budget in steps)")
    p.add_argument("--max-steps", type=int,
                   help="stop at step N of the run, counted from its start (resumed or not; the schedule stays laid "
                        "out for the full run): the same command repeated with --resume ends at the same step")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--batch-size", type=int, help="global batch over all processes (config key batch_size)")
    p.add_argument("--init", metavar="WEIGHTS",
                   help="start from pretrained weights (any format --weights takes): student and teacher backbones")
    p.add_argument("--init-head", action="store_true",
                   help="with --init of a full training checkpoint (the paper's or dinokit's): also its heads and center")
    p.add_argument("--monitor-knn", nargs=2, metavar=("TRAIN_SRC", "TEST_SRC"),
                   help="check k-NN top-1 while training on these labelled sources; keeps checkpoint.best.pt")
    p.add_argument("--monitor-every", default="1000", help="steps (500) or time (5m) between k-NN checks")
    p.add_argument("--monitor-subset", type=int, default=2000, help="images of each source a k-NN check uses")
    p.add_argument("--monitor-student", action="store_true", help="check the student's k-NN too")
    p.add_argument("--nproc", type=int, default=1,
                   help="train in N processes on this machine (launches torchrun; one per GPU)")
    p.set_defaults(func=run)


def torchrun_args(args) -> list[str]:
    """The same command for each process that `--nproc` launches."""
    out = ["train", "--out", args.out]
    for flag, value in (("--data", args.data), ("--config", args.config), ("--preset", args.preset),
                        ("--time-budget", args.time_budget), ("--steps", args.steps), ("--max-steps", args.max_steps),
                        ("--batch-size", args.batch_size), ("--init", args.init),
                        ("--monitor-every", args.monitor_every), ("--monitor-subset", args.monitor_subset)):
        if value is not None:
            out += [flag, str(value)]
    if args.monitor_knn:
        out += ["--monitor-knn", *args.monitor_knn]
    for item in args.sets:
        out += ["--set", item]
    return out + [flag for flag, on in (("--resume", args.resume), ("--no-progress", args.no_progress),
                                        ("--init-head", args.init_head), ("--monitor-student", args.monitor_student))
                  if on]


def run(args):
    if args.max_steps is not None and args.max_steps <= 0:
        raise ValueError("--max-steps must be > 0")
    if args.steps is not None and (args.steps <= 0 or args.time_budget is not None):
        raise ValueError("--steps must be > 0, and cannot be given with --time-budget")
    if args.nproc < 1:
        raise ValueError("--nproc must be >= 1")
    if args.init_head and not args.init:
        raise ValueError("--init-head goes with --init WEIGHTS")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError("--time-budget must be more than 0 seconds")
    if args.data and not args.data.startswith("fashion-mnist:") and not Path(args.data).is_dir():
        what = "is a file, not a folder of images" if Path(args.data).exists() else "does not exist"
        raise FileNotFoundError(f"data folder {args.data} {what}")  # before anything is loaded
    check_run_folder(Path(args.out), args.resume)  # before the data is read and the step measured
    preset, reasons = args.preset or (None if args.config else "auto"), None
    if preset == "auto":  # from the data the run will read (a --set or --config data= included)
        base = resolve(None, args.config, args.sets, data=args.data, validate=False)
        preset, reasons = auto_values(base.data, base.device, args.time_budget, log=log_main)
    cfg = resolve(preset, args.config, args.sets, data=args.data, batch_size=args.batch_size)
    init = read_init(args.init, cfg, args.init_head) if args.init else None  # a mismatch stops it here
    monitor = KnnMonitor(*args.monitor_knn, every=args.monitor_every, subset=args.monitor_subset,
                         student=args.monitor_student, seed=cfg.seed) if args.monitor_knn else None
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return distributed.launch(args.nproc, torchrun_args(args))
    distributed.init_from_env()
    try:
        summary = train(cfg, args.out, resume=args.resume, time_budget=args.time_budget,
                        max_steps=args.max_steps, progress=not args.no_progress, steps=args.steps,
                        init=init, monitor=monitor, notes={"auto": reasons} if reasons else None)
        distributed.barrier()  # the processes leave together
    except CheckpointWriteError as e:  # disk full: one clear line, no traceback
        print(f"dinokit train: error: {e.strerror}", file=sys.stderr)
        return 1
    finally:
        distributed.destroy()
    if int(os.environ.get("RANK", "0")) == 0:  # valid JSON: no loss yet (no step trained) is null, not NaN
        print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}))
    return 0
