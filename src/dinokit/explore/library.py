"""The images the page may show, and the map of an index.

`DataImages` hands out the images of `--data` by reference: a path relative to the folder for a folder
(anything resolving outside it, through `..`, an absolute path or a symbolic link, is refused), or the
source's own name for a named data set (`fashion-mnist:test#12`). `IndexMap` projects an index's embeddings
to 2-D and names each point's class folder when the images have one."""
import os
import re
from pathlib import Path

import torch

from ..data.decode import decode_image
from ..data.sources import IMAGE_SUFFIXES, FolderSource, open_source

ARRAY_ITEM = re.compile(r"^[\w.-]+:\w+#\d+$")  # how an in-memory source names its images
PROJECTIONS = ("pca", "umap", "tsne")


class Refused(Exception):
    """A request for something the server must not show (outside --data); str(e) is the reason."""


class DataImages:
    """The images of `--data` (a folder or a named source), read only through `ref`s.

    >>> images = DataImages("photos/")
    >>> images.read(images.refs[0]).shape   # uint8 (3, H, W)
    """

    def __init__(self, spec: str):
        self.spec = spec
        self.source = open_source(spec)
        self.is_folder = isinstance(self.source, FolderSource)
        if self.is_folder:
            self.root = self.source.root.resolve()
            # refs as listed; `resolve` still refuses one that is a link pointing out of the folder
            self.refs = [Path(p).relative_to(self.source.root).as_posix() for p in self.source.paths]
        else:
            self.refs = list(self.source.paths)
        self._position = {r: i for i, r in enumerate(self.refs)}

    def __len__(self) -> int:
        return len(self.refs)

    def class_of(self, ref: str) -> str | None:
        i = self._position.get(ref)
        if i is None or self.source.labels is None:
            return None
        return self.source.classes[self.source.labels[i]]

    def resolve(self, ref: str) -> Path:
        """The file a folder ref names, refused unless it is an image file inside the folder."""
        if not ref or "\0" in ref:
            raise Refused("empty or invalid image reference")
        path = (self.root / ref).resolve()  # follows links: a link out of the folder resolves outside it
        if not path.is_relative_to(self.root):
            raise Refused(f"{ref!r} is outside --data")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise Refused(f"{ref!r} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if not path.is_file():
            raise FileNotFoundError(f"no image {ref!r} under --data")
        return path

    def read(self, ref: str) -> torch.Tensor:
        """uint8 (3, H, W); BadImage when the file cannot be decoded."""
        if self.is_folder:
            return decode_image(str(self.resolve(ref)))
        i = self._position.get(ref)
        if i is None:
            raise FileNotFoundError(f"no image {ref!r} in {self.spec}")
        return self.source.read(i)

    def ref_for(self, path: str) -> str | None:
        """The ref of an image an index names by its path, or None when it is not under --data."""
        if not self.is_folder:
            return path if path in self._position else None
        if ARRAY_ITEM.match(path):
            return None
        for full, root in ((Path(os.path.abspath(path)), Path(os.path.abspath(self.source.root))),
                           (Path(path).resolve(), self.root)):
            if full.is_relative_to(root):
                return full.relative_to(root).as_posix()
        return None


def folder_classes(paths: list[str]) -> list[str] | None:
    """Each path's class folder (its first folder below the folder all paths share), or None when the
    images are not laid out in class folders (some sit directly in the shared folder)."""
    if len(paths) < 2 or any(ARRAY_ITEM.match(p) for p in paths):
        return None
    root = os.path.commonpath([os.path.abspath(p) for p in paths])
    parts = [Path(os.path.relpath(os.path.abspath(p), root)).parts for p in paths]
    if any(len(p) < 2 for p in parts):
        return None
    return [p[0] for p in parts]


def available_projections() -> list[str]:
    found = ["pca"]
    for name, module in (("umap", "umap"), ("tsne", "sklearn.manifold")):
        try:
            __import__(module)
            found.append(name)
        except ImportError:
            pass
    return found


def check_projection(method: str):
    """A clear error now, not when the map is first drawn, for a projection that cannot be made here."""
    if method not in PROJECTIONS:
        raise ValueError(f"--projection must be one of {', '.join(PROJECTIONS)}, not {method!r}")
    if method not in available_projections():
        package = {"umap": "umap-learn", "tsne": "scikit-learn"}[method]
        raise ValueError(f"--projection {method} needs the package {package} (pip install {package})")


def project(features: torch.Tensor, method: str = "pca") -> torch.Tensor:
    """(N, D) -> (N, 2). PCA (torch, exact, signs fixed) always; UMAP and t-SNE when their packages are
    installed (`umap-learn`, `scikit-learn`), seeded."""
    check_projection(method)
    x = features.double()
    if len(x) < 3 or method == "pca":
        centred = x - x.mean(0, keepdim=True)
        _, vecs = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues: the last two lead
        coords = centred @ vecs[:, -2:].flip(1)
        flip = torch.where(coords.max(0).values.abs() >= coords.min(0).values.abs(), 1.0, -1.0)
        coords = coords * flip.to(coords.dtype)
        if coords.shape[1] < 2:
            coords = torch.cat([coords, torch.zeros(len(x), 2 - coords.shape[1], dtype=coords.dtype)], 1)
        return coords.float()
    if method == "umap":
        import umap
        return torch.from_numpy(umap.UMAP(n_components=2, random_state=0).fit_transform(x.numpy())).float()
    from sklearn.manifold import TSNE
    perplexity = min(30.0, max(1.0, (len(x) - 1) / 3))
    return torch.from_numpy(TSNE(2, perplexity=perplexity, random_state=0).fit_transform(x.numpy())).float()


class IndexMap:
    """An index's points on a plane, with their paths, refs under --data (for thumbnails) and classes."""

    def __init__(self, paths: list[str], features: torch.Tensor, data: DataImages | None, method: str = "pca"):
        self.method = method
        self.coords = project(features, method)
        self.paths = paths
        self.refs = [data.ref_for(p) if data else None for p in paths]
        classes = [data.class_of(r) if data and r else None for r in self.refs]
        if any(c is None for c in classes):
            classes = folder_classes(paths) or [None] * len(paths)
        self.classes = classes

    def as_json(self) -> dict:
        names = sorted({c for c in self.classes if c is not None})
        number = {c: i for i, c in enumerate(names)}
        return {"method": self.method, "count": len(self.paths), "classes": names,
                "points": [{"x": round(x, 5), "y": round(y, 5), "path": p, "ref": r,
                            "class": number.get(c, -1)}
                           for (x, y), p, r, c in zip(self.coords.tolist(), self.paths, self.refs, self.classes)]}
