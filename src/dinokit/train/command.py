"""`dinokit train`."""
import json
import os
import re
import sys
from pathlib import Path

from . import distributed
from .checkpoint import CheckpointWriteError
from .config import resolve
from .engine import train
from .presets import PRESETS


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '1h30m' -> seconds."""
    m = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or not m or not any(m.groups()):
        raise ValueError(f"cannot read duration {text!r} (examples: 90s, 15m, 1h30m)")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def register(sub):
    p = sub.add_parser("train", help="pretrain a backbone with DINO on a folder of images or a named data set")
    p.add_argument("--data", help="image folder (recursive) or fashion-mnist:train / fashion-mnist:test")
    p.add_argument("--out", required=True, help="run folder: config, metrics, checkpoints, curves")
    p.add_argument("--config", help="YAML file of config keys")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named starting configuration")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--time-budget", type=parse_duration, help="fit the whole schedule into this long (e.g. 15m)")
    p.add_argument("--steps", type=int,
                   help="lay the schedule out for exactly N steps, warm-ups scaled (a time budget in steps)")
    p.add_argument("--max-steps", type=int, help="stop after N steps (the schedule stays laid out for the full run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--batch-size", type=int, help="global batch over all processes (config key batch_size)")
    p.add_argument("--nproc", type=int, default=1,
                   help="train in N processes on this machine (launches torchrun; one per GPU)")
    p.set_defaults(func=run)


def torchrun_args(args) -> list[str]:
    """The same command for each process that `--nproc` launches."""
    out = ["train", "--out", args.out]
    for flag, value in (("--data", args.data), ("--config", args.config), ("--preset", args.preset),
                        ("--time-budget", args.time_budget), ("--steps", args.steps), ("--max-steps", args.max_steps),
                        ("--batch-size", args.batch_size)):
        if value is not None:
            out += [flag, str(value)]
    for item in args.sets:
        out += ["--set", item]
    return out + [flag for flag, on in (("--resume", args.resume), ("--no-progress", args.no_progress)) if on]


def run(args):
    cfg = resolve(args.preset, args.config, args.sets, data=args.data, batch_size=args.batch_size)
    if args.max_steps is not None and args.max_steps <= 0:
        raise ValueError("--max-steps must be > 0")
    if args.steps is not None and (args.steps <= 0 or args.time_budget is not None):
        raise ValueError("--steps must be > 0, and cannot be given with --time-budget")
    if args.data and not args.data.startswith("fashion-mnist:") and not Path(args.data).is_dir():
        raise FileNotFoundError(f"data folder {args.data} does not exist")  # before anything is loaded
    if args.nproc < 1:
        raise ValueError("--nproc must be >= 1")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return distributed.launch(args.nproc, torchrun_args(args))
    distributed.init_from_env()
    try:
        summary = train(cfg, args.out, resume=args.resume, time_budget=args.time_budget,
                        max_steps=args.max_steps, progress=not args.no_progress, steps=args.steps)
    except CheckpointWriteError as e:  # disk full: one clear line, no traceback
        print(f"dinokit train: error: {e.strerror}", file=sys.stderr)
        return 1
    finally:
        distributed.destroy()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0
