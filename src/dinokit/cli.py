"""The `dinokit` command. Each subcommand lives next to what it runs and registers itself here."""
import argparse
import importlib
import sys

from .device import reuse_freed_host_memory

# Modules with `register(subparsers)`, which adds a parser whose `func(args)` runs the command.
COMMANDS = [
    "dinokit.demo",
    "dinokit.train.command",
    "dinokit.train.bench",
    "dinokit.finetune.command",
    "dinokit.models.command",
    "dinokit.models.export",
    "dinokit.eval.search",
    "dinokit.eval.knn_command",
    "dinokit.eval.attention",
    "dinokit.eval.maskeval",
    "dinokit.eval.embed",
    "dinokit.eval.linear",
    "dinokit.eval.vidseg",
    "dinokit.eval.davis_synth",
    "dinokit.eval.copydetect",
    "dinokit.eval.retrieve",
    "dinokit.explore.command",
    "dinokit.experiments",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinokit", description="DINO self-supervised training and evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    reuse_freed_host_memory()  # every command: large tensors made and freed over and over (device.py)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError) as e:
        print(f"dinokit {args.command}: error: {e}", file=sys.stderr)  # user errors: one clear line, no traceback
        return 2
    except FloatingPointError as e:  # a run that diverged: what happened and what to try, no traceback
        print(f"dinokit {args.command}: error: {e}", file=sys.stderr)
        return 1
