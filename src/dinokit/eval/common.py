"""What every evaluation command shares: its standard options, the backbone behind `--weights` (or the
`pixels` baseline), the device, cached features, and the `--json` result line."""
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..device import pick_device
from ..models.weights import load_backbone
from .features import eval_transform, extract_features

PIXELS = "pixels"


class Pixels(nn.Module):
    """The `--weights pixels` baseline: an image's pixels in [0, 1], flattened, as its feature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    @staticmethod
    def drop_repeated_channels(*feature_sets: torch.Tensor) -> list[torch.Tensor]:
        """Grey images come as three equal channels. One of them has exactly the same cosine similarities
        (dot products and squared norms all scale by 3) at a third of the k-NN cost."""
        def grey(f):
            d = f.shape[1] // 3
            return (f.shape[1] % 3 == 0 and torch.equal(f[:, :d], f[:, d:2 * d])
                    and torch.equal(f[:, :d], f[:, 2 * d:]))
        if all(grey(f) for f in feature_sets):
            return [f[:, :f.shape[1] // 3].contiguous() for f in feature_sets]
        return list(feature_sets)


def add_common_args(p):
    p.add_argument("--weights", required=True,
                   help=f"weight file or folder load_backbone reads (ours, official, timm, HF), or '{PIXELS}'")
    p.add_argument("--which", default="teacher", choices=("teacher", "student"),
                   help="network to take from a training checkpoint (the paper evaluates the teacher)")
    p.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1, mps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object, last on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load_model(weights: str, which: str = "teacher") -> nn.Module:
    """The frozen backbone a `--weights` value names, in eval mode."""
    if weights == PIXELS:
        return Pixels().eval()
    if not Path(weights).exists():
        raise FileNotFoundError(f"--weights {weights}: no such file or folder (or use '{PIXELS}')")
    model = load_backbone(weights, which=which)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def require_vit(model: nn.Module, what: str):
    if not hasattr(model, "get_last_selfattention"):
        raise ValueError(f"{what} needs a ViT backbone (patch tokens and attention); got {type(model).__name__}")


def transform_for(model: nn.Module, resize: int = 256, crop: int = 224):
    """The evaluation transform; the pixel baseline takes the same geometry without mean/std. A ViT's
    training resolution (`img_size`: its global crops) caps the size of small images."""
    # a partial, not a closure: DataLoader workers may need to pickle it
    return partial(eval_transform, resize=resize, crop=crop, normalize=not isinstance(model, Pixels),
                   native=getattr(model, "img_size", None))


# ---- feature cache ---------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("DINOKIT_CACHE", Path.home() / ".cache" / "dinokit" / "features"))


def weights_id(weights: str, which: str) -> str:
    """Content hash of the weight file(s): a retrained file at the same path gets a new identity."""
    if weights == PIXELS:
        return PIXELS
    path = Path(weights)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256(which.encode())
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:24]


def source_id(source) -> str:
    """Identity of a source's content: in-memory images by their bytes, folders by file names, sizes, times."""
    h = hashlib.sha256(f"{type(source).__name__}:{source.name}:{len(source)}".encode())
    if hasattr(source, "images"):
        h.update(source.images.contiguous().numpy().tobytes())
    else:
        for p in source.paths:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def cached_features(model: nn.Module, source, args, kind: str, feature_fn, transform,
                    weights_key: str | None = None, use_cache: bool = True):
    """`extract_features` through a cache keyed on (weights content, source content, feature kind).
    Returns (features, kept indices, skipped (index, reason) pairs)."""
    key = None
    if use_cache:
        wid = weights_key or weights_id(args.weights, getattr(args, "which", "teacher"))
        geometry = sorted(getattr(transform, "keywords", {}).items())  # features at another size are others
        key = hashlib.sha256(f"{wid}|{source_id(source)}|{kind}|{geometry}".encode()).hexdigest()[:32]
        path = cache_dir() / f"{key}.safetensors"
        if path.is_file():
            try:
                t = load_file(str(path))
                skipped = json.loads(Path(str(path) + ".skipped.json").read_text())
                log(args, f"features of {source.name} ({kind}) from cache {path}")
                return t["features"], t["kept"].tolist(), [tuple(s) for s in skipped]
            except Exception as e:  # a damaged cache entry is recomputed, never fatal
                log(args, f"ignoring unreadable cache entry {path}: {e}")
    feats, kept, skipped = extract_features(model, source, args.batch_size, pick_device(args.device),
                                            feature_fn=feature_fn, transform=transform,
                                            num_workers=args.num_workers, progress=not args.quiet)
    for i, reason in skipped:
        log(args, f"skipped {source.paths[i]}: {reason}")
    if key is not None:
        path = cache_dir() / f"{key}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": feats.contiguous(), "kept": torch.tensor(kept, dtype=torch.int64)}, str(tmp),
                  metadata={"source": source.name, "kind": kind})
        Path(str(path) + ".skipped.json").write_text(json.dumps(skipped))
        os.replace(tmp, path)  # atomic: a killed run leaves no half-written entry
    return feats, kept, skipped


# ---- output ---------------------------------------------------------------------------------------

def check_folder(folder: str | Path):
    """A clear error, before any work, when `folder` or the nearest of its parents that exists is a file."""
    for p in (Path(folder), *Path(folder).parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{p} is a file, not a folder")
            return


def check_outputs(outputs, force: bool, weights: str | None = None):
    """Refuse, before any work, to write over a file that exists (unless `force`), or over the weights being
    read (even with `force`: they are the input)."""
    for out in map(Path, outputs):
        check_folder(out.parent)
        if weights not in (None, PIXELS) and is_part_of(out, Path(weights)):
            raise ValueError(f"writing {out} would overwrite the --weights being read ({weights})")
        if out.is_dir():
            raise ValueError(f"{out} is a folder: name a file")
        if os.path.lexists(out) and not force:
            raise ValueError(f"{out} exists: pass --force to overwrite it")


def is_part_of(out: Path, weights: Path) -> bool:
    """Whether writing `out` would change the weights: the same file (links included) or one in their folder."""
    if not weights.exists():
        return False
    if out.exists() and os.path.samefile(out, weights):
        return True
    return weights.is_dir() and weights.resolve() in out.resolve().parents


@contextmanager
def atomic_write(path: str | Path):
    """A temporary path beside `path` to write to; it replaces `path` only once written in full, so that a
    failure midway leaves what was there before, not half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # same suffix: np.save keeps it
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None):
    """`safetensors.torch.save_file`, written atomically and with the umask's file mode (save_file's are 0600)."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(safetensors.torch.save(tensors, metadata))


def log(args, message: str):
    """Progress and notes go to stderr, so that stdout holds results only."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def report(args, results: dict, lines: list[str]):
    """Human-readable lines, then (with --json) the results as the last stdout line."""
    for line in lines:
        print(line)
    if args.json:
        print(json.dumps(results))
    sys.stdout.flush()
