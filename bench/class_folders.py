"""Writing a labelled image set as class folders (train/CLASS/NNNN.png, test/CLASS/NNNN.png), for the data
generators of this folder."""
import argparse
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


def write_class_folders(out: str | Path, classes: list[str], draw: Callable[[str, np.random.Generator], Image.Image],
                        train: int, test: int, seed: int = 0) -> Path:
    """`train` and `test` images per class, each `draw(class, rng)`, from one seeded stream; refuses a folder
    that is not empty (nothing a user made is overwritten)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: choose another folder")
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for label in classes:
            folder = out / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                draw(label, rng).save(folder / f"{i:04d}.png")
    return out


def folder_args(description: str, argv=None, size: int | None = None) -> argparse.Namespace:
    """The generators' shared command line: OUT, --train and --test images per class, --seed; with `size`,
    --size (the images' side, `size` by default)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("out")
    p.add_argument("--train", type=int, default=600, help="images per class in train/")
    p.add_argument("--test", type=int, default=100, help="images per class in test/")
    p.add_argument("--seed", type=int, default=0)
    if size:
        p.add_argument("--size", type=int, default=size, help="side of the images in pixels")
    return p.parse_args(argv)
