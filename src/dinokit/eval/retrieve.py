"""`dinokit retrieve`: image retrieval on the revisited Oxford and Paris benchmarks (Radenović et al., CVPR 2018),
as the paper evaluates it: frozen [CLS] features of thumbnails (optionally averaged over scales 1, 1/sqrt 2,
1/2), cosine similarity, mAP and mP@k on the Easy, Medium and Hard settings, junk images taken out of each
ranking. Like the paper's `eval_image_retrieval.py`, queries are whole images; `--crop-queries` crops them to
their box, as the benchmark's own protocol does.

Data layout, as the benchmark distributes it: a folder (e.g. `roxford5k/`) holding `jpg/NAME.jpg` and
`gnd_roxford5k.pkl`, a pickled dict with `imlist` (database image names), `qimlist` (query names) and `gnd`
(one dict per query: `bbx` the query's box (x1, y1, x2, y2) in pixels, and `easy`, `hard`, `junk` lists of
database indices). The pickle is read without running code from it: see `GroundTruthUnpickler`.
"""
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.decode import decode_image
from ..device import pick_device
from .common import Pixels, add_common_args, load_model, log, report
from .features import MEAN, STD, extract_features

SCALES = (1.0, 2 ** -0.5, 0.5)
# Each setting: which labels count as positives, which are ignored (taken out of the ranking).
SETTINGS = {"easy": (("easy",), ("junk", "hard")),
            "medium": (("easy", "hard"), ("junk",)),
            "hard": (("hard",), ("junk", "easy"))}


# ---- the ground truth, read safely --------------------------------------------------------------------
def _numpy_globals() -> dict:
    """What pickled numpy arrays and scalars need, under the module names numpy 1 and 2 write; pickle
    protocols 0-2 also store their raw bytes as text turned back into bytes by `_codecs.encode` / `bytes`."""
    import _codecs
    core = np._core if hasattr(np, "_core") else np.core
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _codecs.encode,
               ("builtins", "bytes"): bytes, ("__builtin__", "bytes"): bytes}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer  # pickle protocol 5
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a function or class outside the allowed few."""


class GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dicts, lists, tuples, strings, numbers, and numpy arrays.

    Code runs during unpickling only through the globals a pickle names (functions and classes it calls);
    this loader hands out none but numpy's array and scalar rebuilders, `_codecs.encode` and `bytes`. The
    first only make an array of a given dtype from bytes or from objects that come through this same
    loader; the others turn text into bytes. Nothing else can be reached."""

    def find_class(self, module, name):
        allowed = _numpy_globals()
        if (module, name) not in allowed:
            raise RefusedGlobal(f"it would import {module}.{name}")
        return allowed[(module, name)]


def _indices(values, n: int, what: str) -> list[int]:
    out = [int(v) for v in np.asarray(values).ravel()]
    if any(not 0 <= v < n for v in out):
        raise ValueError(f"{what} holds an index outside the database of {n} images")
    return out


def read_ground_truth(path: str | Path) -> dict:
    """{'imlist', 'qimlist', 'gnd'} from a benchmark's gnd_*.pkl, checked and as plain Python lists."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            cfg = GroundTruthUnpickler(f).load()
    except RefusedGlobal as e:
        raise ValueError(f"refused to read {path}: {e}. A ground-truth file holds only lists, dicts, numbers, "
                         "strings and numpy arrays; nothing from it was executed.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise ValueError(f"{path} is not a readable ground-truth pickle (truncated or corrupt?): {e}") from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise ValueError(f"{path} does not hold a dict with imlist, qimlist and gnd")
    imlist, qimlist = [str(s) for s in cfg["imlist"]], [str(s) for s in cfg["qimlist"]]
    if len(cfg["gnd"]) != len(qimlist):
        raise ValueError(f"{path}: {len(cfg['gnd'])} ground-truth entries for {len(qimlist)} queries")
    gnd = []
    for q, g in enumerate(cfg["gnd"]):
        entry = {k: _indices(g.get(k, []), len(imlist), f"{path}: query {q} {k!r}") for k in ("easy", "hard", "junk")}
        box = g.get("bbx")
        entry["bbx"] = [float(v) for v in np.asarray(box).ravel()] if box is not None else None
        if entry["bbx"] is not None and len(entry["bbx"]) != 4:
            raise ValueError(f"{path}: query {q} has a box of {len(entry['bbx'])} numbers, not 4")
        gnd.append(entry)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


# ---- the metric -----------------------------------------------------------------------------------------
def positive_positions(ranking, positives, junk) -> np.ndarray:
    """0-based positions of the positives in `ranking` (database indices, best first) once the junk
    images are taken out of it. As in the benchmark's `compute_map`, an image listed both as a positive and
    as junk stays a positive (only junk ranked before a positive moves it up)."""
    ranking = np.asarray(ranking)
    pos = np.flatnonzero(np.isin(ranking, list(positives)))
    junk_at = np.flatnonzero(np.isin(ranking, list(junk)))
    return pos - np.searchsorted(junk_at, pos, side="left")


def average_precision(positions: np.ndarray, n_positives: int) -> float:
    """The revisited benchmark's AP: the area under the precision-recall curve, each recall step a
    trapezoid between the precision just before the positive at position r (j / r, j positives ahead of
    it) and the precision at it ((j + 1) / (r + 1))."""
    ap = 0.0
    for j, r in enumerate(np.sort(positions)):
        before = 1.0 if r == 0 else j / r
        ap += (before + (j + 1) / (r + 1)) / 2 / n_positives
    return ap


def precision_at(positions: np.ndarray, k: int) -> float:
    """The revisited benchmark's P@k: precision in the top k, with k cut to the last positive's rank
    when every positive comes earlier (so a query with few positives can reach 1)."""
    if len(positions) == 0:
        return 0.0
    ranks = np.asarray(positions) + 1
    k = min(int(ranks.max()), k)
    return float((ranks <= k).sum()) / k


def evaluate(rankings: np.ndarray, gnd: list[dict], ks=(1, 5, 10)) -> dict:
    """mAP and mP@k (fractions) per setting; `rankings[q]` orders the whole database for query q.
    A query without positives in a setting is left out of that setting's means."""
    results = {}
    for setting, (positive_labels, junk_labels) in SETTINGS.items():
        aps, prs = [], []
        for q, g in enumerate(gnd):
            positives = [i for label in positive_labels for i in g[label]]
            if not positives:
                continue
            junk = [i for label in junk_labels for i in g[label]]
            pos = positive_positions(rankings[q], positives, junk)
            aps.append(average_precision(pos, len(positives)))
            prs.append([precision_at(pos, k) for k in ks])
        if not aps:
            results[setting] = {"mAP": float("nan"), **{f"mP@{k}": float("nan") for k in ks}, "queries": 0}
            continue
        results[setting] = {"mAP": float(np.mean(aps)),
                            **{f"mP@{k}": float(v) for k, v in zip(ks, np.mean(prs, axis=0))},
                            "queries": len(aps)}
    return results


# ---- images and features ------------------------------------------------------------------------------
class BenchmarkImages:
    """The benchmark's images in ground-truth order (a source for `extract_features`), each cropped to its
    box when boxes are given (`--crop-queries`)."""

    def __init__(self, name: str, folder: Path, names: list[str], boxes: list | None = None):
        """`boxes`: (x1, y1, x2, y2) per image to crop to, or None (whole images)."""
        self.name, self.boxes = name, boxes
        self.paths = [str(folder / f"{n}.jpg") for n in names]

    def __len__(self):
        return len(self.paths)

    def read(self, i: int) -> torch.Tensor:
        img = decode_image(self.paths[i])
        box = self.boxes[i] if self.boxes else None
        if box is not None:
            h, w = img.shape[-2:]
            x1, y1 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
            x2, y2 = min(w, max(x1 + 1, int(round(box[2])))), min(h, max(y1 + 1, int(round(box[3]))))
            img = img[:, y1:y2, x1:x2]
        return img


def shrink_to(img: torch.Tensor, imsize: int) -> torch.Tensor:
    """uint8 (3, H, W) -> normalised float: the paper's retrieval input, Pillow's thumbnail (both sides at
    most `imsize`, aspect kept, Lanczos filter, never enlarged, no crop)."""
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    pil.thumbnail((imsize, imsize), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div_(255)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def multiscale_cls(model, x: torch.Tensor) -> torch.Tensor:
    """[CLS] averaged over the image at scales 1, 1/sqrt 2 and 1/2 (bilinear)."""
    feats = [model(x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
             for s in SCALES]
    return torch.stack(feats).mean(0)


def cls(model, x: torch.Tensor) -> torch.Tensor:
    return model(x)


class _Transform:
    """A picklable per-image transform (DataLoader workers)."""

    def __init__(self, imsize: int):
        self.imsize = imsize

    def __call__(self, img):
        return shrink_to(img, self.imsize)


def features(model, source, args) -> tuple[torch.Tensor, list[int]]:
    """L2-normalised features of every readable image; unreadable ones are reported and left out."""
    feats, kept, skipped = extract_features(model, source, args.batch_size, pick_device(args.device),
                                            feature_fn=multiscale_cls if args.multiscale else cls,
                                            transform=_Transform(args.imsize), num_workers=args.num_workers,
                                            progress=not args.quiet)
    for i, reason in skipped:
        log(args, f"skipped {source.paths[i]}: {reason}")
    return F.normalize(feats, dim=1), kept


def rank_database(query_feats: torch.Tensor, db_feats: torch.Tensor, db_kept: list[int], n_db: int) -> np.ndarray:
    """Database indices per query, most similar first; unreadable database images come last."""
    sim = torch.full((len(query_feats), n_db), -float("inf"))
    sim[:, db_kept] = query_feats @ db_feats.T
    return torch.argsort(sim, dim=1, descending=True, stable=True).numpy()


# ---- the command ----------------------------------------------------------------------------------------
def register(sub):
    p = sub.add_parser("retrieve", help="image retrieval mAP on revisited Oxford / Paris (Easy, Medium, Hard)")
    add_common_args(p)
    p.add_argument("--data", required=True, help="benchmark folder holding jpg/ and gnd_NAME.pkl (e.g. roxford5k)")
    p.add_argument("--imsize", type=int, default=224, help="longer image side (images are shrunk, never cropped)")
    p.add_argument("--multiscale", action="store_true", help="average [CLS] over scales 1, 1/sqrt 2, 1/2")
    p.add_argument("--crop-queries", action="store_true",
                   help="crop queries to their box (the benchmark's protocol; the paper's script uses whole images)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="mP@k for these k")
    p.set_defaults(func=run)


def find_layout(folder: str) -> tuple[str, Path, Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder")
    gnd_files = sorted(root.glob("gnd_*.pkl"))
    if len(gnd_files) != 1:
        raise ValueError(f"--data {root}: expected one gnd_NAME.pkl ground-truth file, found "
                         f"{len(gnd_files) or 'none'} (the benchmark layout: jpg/ and gnd_roxford5k.pkl)")
    if not (root / "jpg").is_dir():
        raise FileNotFoundError(f"--data {root}: no jpg/ folder of images")
    return gnd_files[0].stem[len("gnd_"):], gnd_files[0], root / "jpg"


def run(args):
    if args.imsize < 1 or any(k < 1 for k in args.k):
        raise ValueError("--imsize and --k must be positive")
    name, gnd_path, images = find_layout(args.data)
    gt = read_ground_truth(gnd_path)  # before the model: a refused file stops everything
    model = load_model(args.weights, args.which)
    if isinstance(model, Pixels):
        raise ValueError("--weights pixels cannot be used for retrieval: its images differ in size")
    database = BenchmarkImages(f"{name}:database", images, gt["imlist"])
    queries = BenchmarkImages(f"{name}:queries", images, gt["qimlist"],
                              [g["bbx"] for g in gt["gnd"]] if args.crop_queries else None)
    db_feats, db_kept = features(model, database, args)
    q_feats, q_kept = features(model, queries, args)
    if len(q_kept) != len(queries):
        raise ValueError(f"{len(queries) - len(q_kept)} query images cannot be read (reasons above)")
    rankings = rank_database(q_feats, db_feats, db_kept, len(database))
    results = evaluate(rankings, gt["gnd"], args.k)
    percent = {s: {m: (v * 100 if m != "queries" else v) for m, v in r.items()} for s, r in results.items()}
    out = {"command": "retrieve", "weights": args.weights, "dataset": name, "data": str(args.data),
           "multiscale": args.multiscale, "crop_queries": args.crop_queries, "imsize": args.imsize,
           "n_database": len(database), "n_queries": len(queries), "skipped": len(database) - len(db_kept),
           "results": percent}
    lines = [f"{name} ({'multi-scale' if args.multiscale else 'single scale'}, {args.imsize} px, "
             f"{'cropped' if args.crop_queries else 'whole'} queries): "
             + "  ".join(f"{s.capitalize()} mAP {r['mAP']:.2f}" for s, r in percent.items())]
    lines += [f"  {s.capitalize()}: " + "  ".join(f"mP@{k} {r[f'mP@{k}']:.2f}" for k in args.k)
              for s, r in percent.items()]
    report(args, out, lines)
    return 0
