"""Where images come from: a folder (recursive) or a named data set such as `fashion-mnist:train`.

A source is indexable: `source.read(i)` gives a uint8 tensor (3, H, W) or raises `BadImage` with the
reason (`source.read_encoded(i)` the same, but a JPEG's bytes, 1-D, where a device decoder can take them);
`source.labels` holds class ids where the layout has them (class sub-folders), else None.
Labels are for evaluation only: training never reads them.
"""
import gzip
import os
from pathlib import Path
import warnings

import numpy as np
import torch

from .decode import decode_image, read_jpeg

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
FASHION_MNIST_DIR = Path(os.environ.get("DINOKIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


class ArraySource:
    """Images held in memory as one uint8 tensor (N, 3, H, W)."""

    def __init__(self, name: str, images: torch.Tensor, labels: list[int] | None, classes: list[str]):
        self.name, self.images, self.labels, self.classes = name, images, labels, classes
        self.paths = [f"{name}#{i}" for i in range(len(images))]

    def __len__(self):
        return len(self.images)

    def read(self, i: int) -> torch.Tensor:
        return self.images[i]

    read_encoded = read  # decoded already


class FolderSource:
    """Every image file under a folder. Files directly in class sub-folders get that class as label."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} does not exist")
        self.name = str(self.root)
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {self.root}")
        self.paths = [str(p) for p in files]
        top = [p.relative_to(self.root).parts for p in files]
        if all(len(parts) >= 2 for parts in top):
            self.classes = sorted({parts[0] for parts in top})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[parts[0]] for parts in top]
        else:
            self.classes, self.labels = [], None

    def __len__(self):
        return len(self.paths)

    def read(self, i: int) -> torch.Tensor:
        return decode_image(self.paths[i])

    def read_encoded(self, i: int) -> torch.Tensor:
        path = self.paths[i]
        data = read_jpeg(path) if path.lower().endswith((".jpg", ".jpeg")) else None
        return decode_image(path) if data is None else data


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_mnist(split: str) -> ArraySource:
    kind = {"train": "train", "test": "t10k"}.get(split)
    if kind is None:
        raise ValueError(f"fashion-mnist has splits 'train' and 'test', not {split!r}")
    images_path = FASHION_MNIST_DIR / f"{kind}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{kind}-labels-idx1-ubyte.gz"
    if not images_path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {FASHION_MNIST_DIR}. Install it with:\n"
            f"  sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist\n"
            f"or point DINOKIT_FASHION_MNIST at a folder holding the four idx .gz files.")
    labels = _read_idx(labels_path, 8)
    images = torch.from_numpy(_read_idx(images_path, 16).reshape(len(labels), 1, 28, 28).copy())
    return ArraySource(f"fashion-mnist:{split}", images.expand(-1, 3, -1, -1), labels.tolist(),
                       FASHION_MNIST_CLASSES)


def open_source(spec: str) -> ArraySource | FolderSource:
    """`fashion-mnist:train`, `fashion-mnist:test`, or a folder path."""
    if spec.startswith("fashion-mnist:"):
        return fashion_mnist(spec.split(":", 1)[1])
    return FolderSource(spec)


def image_stats(source, sample: int = 256, seed: int = 0) -> dict:
    """What the `auto` preset needs to know about a source: its size, the median short side of its images and
    whether they are grey, from a seeded sample of file headers (in-memory sources: their tensor's shape)."""
    if isinstance(source, ArraySource):
        images = source.images
        grey = bool(images.shape[1] == 1 or torch.equal(images[:64, 0], images[:64, 1]))
        return {"images": len(source), "short_side": int(min(images.shape[-2:])), "grey": grey}
    from PIL import Image
    rng = np.random.default_rng(seed)
    sides, grey = [], 0
    for i in rng.permutation(len(source))[:sample].tolist():
        try:
            with warnings.catch_warnings(), Image.open(source.paths[i]) as im:  # the header only: no decoding
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the decoder judges sizes
                sides.append(min(im.size))
                grey += im.mode in ("L", "LA", "I", "I;16", "F", "1")
        except Exception:  # unreadable files are the loader's to report
            continue
    if not sides:
        raise ValueError(f"no readable image among {min(sample, len(source))} files of {source.name}")
    return {"images": len(source), "short_side": int(np.median(sides)), "grey": grey > len(sides) / 2}
