"""`dinokit copydetect`: copy detection as in the paper (Copydays "strong" protocol), and a builder of such a
benchmark from any image set.

Descriptor: [CLS] and GeM-pooled (p = 4) patch tokens of the last block, images resized to 320 x 320;
PCA whitening learned on a separate image set; L2-normalised; cosine search among the originals plus
distractors; mean average precision over the top 20 results of each query.

Layout (Copydays'): DIR/original/*.jpg, DIR/strong/*.jpg, optionally DIR/jpegqual/N/*.jpg, DIR/crops/N/*.jpg.
A "strong" query's positives are the originals whose names share its first 4 characters; in the other blocks
the original of the same file name. `dinokit copydetect-build` writes DIR/whitening and DIR/distractors too.
"""
import io
import math
import random
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps
from tqdm import tqdm

from ..data.decode import BadImage
from ..data.sources import FolderSource, open_source
from .common import add_common_args, cached_features, load_model, log, report, require_vit, weights_id
from .features import cls_gem_features, eval_transform


def register(sub):
    p = sub.add_parser("copydetect", help="copy detection mAP (Copydays protocol: [CLS] + GeM, whitening, distractors)")
    add_common_args(p)
    p.add_argument("--data", required=True, help="Copydays-layout folder (original/, strong/, ...)")
    p.add_argument("--whitening", help="images to learn the PCA whitening on (default DATA/whitening if present)")
    p.add_argument("--distractors", help="images added to the database (default DATA/distractors if present)")
    p.add_argument("--image-size", type=int, default=320, help="images are resized to this square")
    p.add_argument("--gem-p", type=float, default=4.0)
    p.add_argument("--topk", type=int, default=20, help="results per query that the AP looks at")
    p.add_argument("--no-cache", action="store_true")
    p.set_defaults(func=run)

    b = sub.add_parser("copydetect-build", help="build a Copydays-style benchmark by strongly editing held-out images")
    b.add_argument("--images", required=True, help="source of the images (a folder, or fashion-mnist:test)")
    b.add_argument("--out", required=True)
    b.add_argument("--originals", type=int, default=100)
    b.add_argument("--edits", type=int, default=2, help="strong copies of each original")
    b.add_argument("--distractors", type=int, default=200)
    b.add_argument("--whitening", type=int, default=200)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=run_build)


# ---- metric -----------------------------------------------------------------------------------------

def average_precision(ranks: list[int], n_positives: int) -> float:
    """AP of one result list from the 0-based ranks at which positives came, as the area under the
    precision-recall curve by trapezoids (Copydays' evaluation). Positives never retrieved add nothing."""
    ap = 0.0
    for found, rank in enumerate(sorted(ranks)):
        precision_before = 1.0 if rank == 0 else found / rank
        precision_after = (found + 1) / (rank + 1)
        ap += (precision_before + precision_after) / 2 / n_positives
    return ap


def mean_average_precision(retrieved: torch.Tensor, positives: list[set[int]]) -> float:
    """retrieved: (queries, topk) database indices, best first; positives: database indices per query."""
    aps = [average_precision([r for r, j in enumerate(row.tolist()) if j in pos], len(pos))
           for row, pos in zip(retrieved, positives)]
    return float(np.mean(aps)) if aps else math.nan


# ---- whitening --------------------------------------------------------------------------------------

def learn_whitening(feats: torch.Tensor, eps_ratio: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening from a set of features, as the paper's copy detection learns it: (mean, projection),
    applied as (x - mean) @ projection. The eigenvectors (largest eigenvalue first) and the d^-1/2 scaling
    come from the features' second-moment matrix x^T x / n, not from their centred covariance (the
    reference's choice; the mean is only subtracted when applying). Tiny eigenvalues are floored at 1e-5 of
    the largest so that noise directions are not blown up. Each component's sign is arbitrary.

    >>> mean, projection = learn_whitening(torch.randn(500, 8) * torch.arange(1.0, 9.0))
    >>> mean.shape, projection.shape
    (torch.Size([8]), torch.Size([8, 8]))
    """
    x = feats.double()
    mean = x.mean(0)
    cov = x.T @ x / x.shape[0]
    eigvals, eigvecs = torch.linalg.eigh(cov)
    eigvals = eigvals.clamp(min=eigvals.max().item() * eps_ratio)
    order = eigvals.argsort(descending=True)
    projection = eigvecs[:, order] / eigvals[order].sqrt()
    return mean.float(), projection.float()


# ---- command ----------------------------------------------------------------------------------------

def square_transform(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resized to a size x size square whatever the aspect ratio (the reference's choice), with Pillow's
    bicubic filter as the reference's torchvision `Resize` on PIL images does; normalised."""
    pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    return eval_transform(x, crop=size)


def copydays_blocks(root: Path) -> list[str]:
    blocks = ["strong"] if (root / "strong").is_dir() else []
    for group in ("jpegqual", "crops"):
        if (root / group).is_dir():
            blocks += sorted((f"{group}/{p.name}" for p in (root / group).iterdir() if p.is_dir()),
                             key=lambda b: int(b.split("/")[1]) if b.split("/")[1].isdigit() else 0)
    return blocks


def positives_of(query_names: list[str], original_names: list[str], block: str) -> list[set[int]]:
    if block == "strong":
        return [{j for j, o in enumerate(original_names) if o[:4] == q[:4]} for q in query_names]
    index = {o: j for j, o in enumerate(original_names)}
    return [{index[q]} if q in index else set() for q in query_names]


def run(args):
    root = Path(args.data)
    if not (root / "original").is_dir():
        raise FileNotFoundError(f"{root}/original is missing: --data must be in the Copydays layout")
    blocks = copydays_blocks(root)
    if not blocks:
        raise ValueError(f"{root} has no query blocks (strong/, jpegqual/N/, crops/N/)")
    model = load_model(args.weights, args.which)
    require_vit(model, "copy detection")
    wid = None if args.no_cache else weights_id(args.weights, args.which)
    transform = partial(square_transform, size=args.image_size)
    kind = f"cls+gem{args.gem_p:g}@{args.image_size}"

    def features(folder):
        source = FolderSource(folder) if isinstance(folder, Path) else open_source(folder)
        f, kept, _ = cached_features(model, source, args, kind, cls_gem_features(args.gem_p), transform, wid,
                                     use_cache=not args.no_cache)
        return f, [Path(source.paths[i]).name for i in kept]

    originals, original_names = features(root / "original")
    database = [originals]
    distractors = args.distractors or (str(root / "distractors") if (root / "distractors").is_dir() else None)
    if distractors:
        database.append(features(distractors)[0])
    database = torch.cat(database)
    queries = {block: features(root / block) for block in blocks}

    whitening = args.whitening or (str(root / "whitening") if (root / "whitening").is_dir() else None)
    if whitening:
        mean, projection = learn_whitening(features(whitening)[0])
        database = (database - mean) @ projection
        queries = {b: ((q - mean) @ projection, names) for b, (q, names) in queries.items()}
    else:
        log(args, "no whitening set: raw features (the protocol learns a PCA whitening on other images)")
    database = F.normalize(database, dim=1)

    results, lines = {}, []
    for block, (q, names) in queries.items():
        retrieved = (F.normalize(q, dim=1) @ database.T).topk(min(args.topk, len(database)), dim=1).indices
        results[block] = mean_average_precision(retrieved, positives_of(names, original_names, block))
        lines.append(f"{block}: mAP {results[block]:.4f} ({len(names)} queries)")
    lines.append(f"database: {len(originals)} originals + {len(database) - len(originals)} distractors; "
                 f"whitening: {'learned' if whitening else 'none'}")
    report(args, {"command": "copydetect", "weights": args.weights, "data": str(root), "mAP": results,
                  "n_database": len(database), "n_distractors": len(database) - len(originals),
                  "whitened": bool(whitening)}, lines)
    return 0


# ---- benchmark builder --------------------------------------------------------------------------------

def strong_edit(img: Image.Image, rng: random.Random) -> Image.Image:
    """A Copydays-style strong copy: a crop, then three of rotation, blur, colour change, text overlay,
    rescaling; always saved as a low-quality JPEG."""
    w, h = img.size
    keep = rng.uniform(0.5, 0.85)
    cw, ch = max(8, round(w * keep)), max(8, round(h * keep))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((left, top, left + cw, top + ch))
    edits = rng.sample(["rotate", "blur", "colour", "text", "scale"], 3)
    for edit in edits:
        if edit == "rotate":
            img = img.rotate(rng.choice([rng.uniform(-30, 30), 90, 180, 270]), expand=True, fillcolor=(0, 0, 0))
        elif edit == "blur":
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0) * max(img.size) / 200))
        elif edit == "colour":
            img = ImageEnhance.Color(img).enhance(rng.uniform(0.0, 2.0))
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
            if rng.random() < 0.3:
                img = ImageOps.grayscale(img).convert("RGB")
        elif edit == "text":
            draw = ImageDraw.Draw(img)
            for _ in range(rng.randint(1, 3)):
                x, y = rng.randint(0, img.width - 1), rng.randint(0, img.height - 1)
                draw.text((x, y), rng.choice(["COPY", "(c) 2021", "DINO", "sample", "#42"]),
                          fill=tuple(rng.randint(0, 255) for _ in range(3)))
        elif edit == "scale":
            s = rng.uniform(0.5, 1.5)
            img = img.resize((max(8, round(img.width * s)), max(8, round(img.height * s))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(10, 40))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def build_benchmark(source, out: str | Path, originals: int, edits: int, distractors: int, whitening: int,
                    seed: int = 0, progress: bool = True) -> dict[str, int]:
    """Split a source's readable images at random into originals (each with `edits` strong copies as queries),
    distractors and a whitening set, written in the Copydays layout. Returns how many of each."""
    rng = random.Random(seed)
    order = list(range(len(source)))
    rng.shuffle(order)
    out = Path(out)
    plan = [("original", originals), ("distractors", distractors), ("whitening", whitening)]
    counts = {name: 0 for name, _ in plan} | {"strong": 0, "skipped": 0}
    bar = tqdm(total=sum(n for _, n in plan), desc="benchmark", unit="image", disable=not progress, leave=False)
    it = iter(order)
    for name, wanted in plan:
        (out / name).mkdir(parents=True, exist_ok=True)
        while counts[name] < wanted:
            i = next(it, None)
            if i is None:
                raise ValueError(f"{source.name} has too few readable images for {originals} originals, "
                                 f"{distractors} distractors and {whitening} whitening images")
            try:
                img = Image.fromarray(source.read(i).permute(1, 2, 0).numpy())
            except BadImage:
                counts["skipped"] += 1
                continue
            n = counts[name]
            stem = f"{n:04d}00" if name == "original" else f"{n:06d}"
            img.save(out / name / f"{stem}.jpg", quality=95)
            if name == "original":
                (out / "strong").mkdir(exist_ok=True)
                for e in range(edits):
                    strong_edit(img, rng).save(out / "strong" / f"{n:04d}{e + 1:02d}.jpg", quality=95)
                    counts["strong"] += 1
            counts[name] += 1
            bar.update()
    bar.close()
    return counts


def run_build(args):
    if args.originals < 1 or args.edits < 1:
        raise ValueError("--originals and --edits must be at least 1")
    counts = build_benchmark(open_source(args.images), args.out, args.originals, args.edits, args.distractors,
                             args.whitening, args.seed)
    report(args, {"command": "copydetect-build", "out": args.out, **counts},
           [f"{args.out}: {counts['original']} originals, {counts['strong']} strong copies, "
            f"{counts['distractors']} distractors, {counts['whitening']} whitening images "
            f"({counts['skipped']} unreadable skipped)"])
    return 0
