"""`dinokit finetune`: supervised fine-tuning of a backbone with a new linear head (docs/finetune.md)."""
import sys
from pathlib import Path

from ..eval.common import report
from ..train.checkpoint import CheckpointWriteError
from ..train.command import parse_duration
from .config import LAYER_DECAY, FinetuneConfig
from .loop import finetune


def register(sub):
    p = sub.add_parser("finetune", help="fine-tune a backbone with a new linear head on labelled images")
    p.add_argument("--weights", required=True,
                   help="backbone: any file load_backbone reads (a dinokit run, official, timm, HF, safetensors)")
    p.add_argument("--which", default="teacher", choices=("teacher", "student"),
                   help="network to take from a DINO training checkpoint")
    p.add_argument("--from-scratch", action="store_true",
                   help="the same architecture from random weights (the comparison); layer decay off unless given")
    p.add_argument("--train", required=True, help="labelled source: a folder of class folders, or fashion-mnist:train")
    p.add_argument("--test", help="labelled source scored at the end (top-1, top-5)")
    p.add_argument("--out", required=True, help="run folder: config, metrics, checkpoints, curves")
    p.add_argument("--time-budget", type=parse_duration, help="fit the whole schedule into this long (e.g. 5m)")
    p.add_argument("--steps", type=int, help="lay the schedule out for exactly N steps")
    p.add_argument("--max-steps", type=int, help="stop after N steps (the schedule stays laid out for the full run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object, last on stdout")
    defaults = FinetuneConfig()
    for name, kind, text in (
            ("epochs", int, "length of the run"), ("batch-size", int, "images per step"),
            ("lr", float, "peak learning rate at batch 256 (scaled linearly with the batch)"),
            ("min-lr", float, "learning rate at the end of the cosine"),
            ("warmup-epochs", float, "epochs of linear warm-up"), ("weight-decay", float, "AdamW's"),
            ("drop-path", float, "a ViT's stochastic depth"), ("label-smoothing", float, "of the targets"),
            ("randaug-ops", int, "RandAugment's operations per image (0: off)"),
            ("randaug-magnitude", int, "RandAugment's strength, 0-30"),
            ("mixup", float, "MixUp's alpha (DeiT: 0.8; 0: off)"), ("cutmix", float, "CutMix's alpha (DeiT: 1.0; 0: off)"),
            ("image-size", int, "side of the training crops (0: the size evaluation gives the images)"),
            ("seed", int, "data order, augmentation, the head's initialisation"),
            ("num-workers", int, "loader processes"), ("log-every", int, "steps between metrics rows"),
            ("save-every-steps", int, "steps between checkpoints")):
        key = name.replace("-", "_")
        p.add_argument(f"--{name}", type=kind, default=getattr(defaults, key), help=f"{text} (default {getattr(defaults, key)})")
    p.add_argument("--layer-decay", type=float,
                   help=f"block i of n learns at lr * decay ** (n + 1 - i) (default {LAYER_DECAY}; 1 with --from-scratch)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=defaults.crop_scale, metavar=("LOW", "HIGH"),
                   help=f"RandomResizedCrop's area range (default {' '.join(map(str, defaults.crop_scale))})")
    p.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.set_defaults(func=run)


def config_from_args(args) -> FinetuneConfig:
    layer_decay = args.layer_decay if args.layer_decay is not None else (1.0 if args.from_scratch else LAYER_DECAY)
    keys = ("epochs", "batch_size", "lr", "min_lr", "warmup_epochs", "weight_decay", "drop_path", "label_smoothing",
            "randaug_ops", "randaug_magnitude", "mixup", "cutmix", "image_size", "seed", "num_workers", "log_every",
            "save_every_steps", "which", "from_scratch", "device", "precision")
    return FinetuneConfig(weights=args.weights, train=args.train, test=args.test or "", layer_decay=layer_decay,
                          crop_scale=list(args.crop_scale), **{k: getattr(args, k) for k in keys}).validate()


def run(args):
    cfg = config_from_args(args)
    if args.max_steps is not None and args.max_steps <= 0:
        raise ValueError("--max-steps must be > 0")
    if args.steps is not None and (args.steps <= 0 or args.time_budget is not None):
        raise ValueError("--steps must be > 0, and cannot be given with --time-budget")
    if not Path(args.weights).exists():
        raise FileNotFoundError(f"--weights {args.weights}: no such file or folder")
    try:
        summary = finetune(cfg, args.out, resume=args.resume, time_budget=args.time_budget, max_steps=args.max_steps,
                           steps=args.steps, progress=not args.no_progress)
    except CheckpointWriteError as e:  # disk full: one clear line, no traceback
        print(f"dinokit finetune: error: {e.strerror}", file=sys.stderr)
        return 1
    except FileExistsError as e:  # a run in --out already: a user error like the others
        print(f"dinokit finetune: error: {e}", file=sys.stderr)
        return 2
    lines = [f"{'from scratch' if cfg.from_scratch else 'fine-tuned'}: step {summary['step']} of "
             f"{summary['total_steps']} in {summary['seconds']:.0f}s -> {summary['run_dir']}"]
    if "test_top1" in summary:
        lines.append(f"test top-1 {summary['test_top1']:.2f}%  top-5 {summary['test_top5']:.2f}%  "
                     f"({summary['n_test']} images, {summary['test_skipped']} skipped)")
    report(args, {"command": "finetune", **summary}, lines)
    return 0
