"""`dinokit index` and `dinokit search`: embed a folder once, then find the images nearest to query images.

Features are the backbone's L2-normalised [CLS] (pooled, for a ResNet) features, taken as the k-NN evaluation
takes them; similarity is their cosine. An index is a safetensors file: the (N, D) features, plus the image
paths and the weights that made them in its metadata.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.decode import decode_image
from ..data.sources import open_source
from ..models.weights import load_backbone
from .common import atomic_write, check_outputs, save_safetensors, transform_for
from .features import extract_features

FAISS_MIN_SIZE = 100_000  # below this, one matrix product in torch is as fast as faiss


class ImageFiles:
    """Query images given as paths: a source for `extract_features`."""

    def __init__(self, paths):
        self.paths = [str(p) for p in paths]
        self.name, self.labels = "query images", None

    def __len__(self):
        return len(self.paths)

    def read(self, i: int) -> torch.Tensor:
        return decode_image(self.paths[i])


def embed(model, source, batch_size: int = 64, device: str = "cpu", progress: bool = False):
    """L2-normalised features of the readable images of `source`, their paths, and the skipped (path, reason).
    Images are prepared as the k-NN evaluation prepares them (small ones at the ViT's training resolution)."""
    feats, kept, skipped = extract_features(model, source, batch_size=batch_size, device=device, progress=progress,
                                            transform=transform_for(model))
    return F.normalize(feats, dim=1), [source.paths[i] for i in kept], [(source.paths[i], r) for i, r in skipped]


def save_index(path: str | Path, features: torch.Tensor, paths: list[str], weights: dict):
    save_safetensors({"features": features.contiguous()}, path,
                     metadata={"paths": json.dumps(paths), "weights": json.dumps(weights)})


def load_index(path: str | Path) -> tuple[torch.Tensor, list[str], dict]:
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no index at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            features = f.get_tensor("features")
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"{path} is not a dinokit index: {e}") from None
    if "paths" not in meta:
        raise ValueError(f"{path} is not a dinokit index (no image paths in its metadata)")
    return features, json.loads(meta["paths"]), json.loads(meta.get("weights", "{}"))


def nearest(features: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by cosine (features are normalised): similarities and indices, each (Q, k)."""
    k = min(k, len(features))
    if len(features) >= FAISS_MIN_SIZE:
        try:
            import faiss
        except ImportError:
            faiss = None
        if faiss is not None:  # exact too (flat inner product), only faster on large indexes
            index = faiss.IndexFlatIP(features.shape[1])
            index.add(features.float().numpy())
            sims, idx = index.search(queries.float().numpy(), k)
            return torch.from_numpy(sims), torch.from_numpy(idx).long()
    return (queries @ features.T).topk(k, dim=1)


def contact_sheet(path: str | Path, results: list[dict], thumb: int = 128):
    """One row per query: the query image, then its results titled with their similarity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + max(len(r["results"]) for r in results)
    fig, axes = plt.subplots(len(results), cols, figsize=(cols * thumb / 64, len(results) * thumb / 64),
                             squeeze=False)
    for row, r in zip(axes, results):
        shown = [(r["query"], "query")] + [(m["path"], f"{m['similarity']:.3f}") for m in r["results"]]
        for ax in row:
            ax.axis("off")
        for ax, (image, title) in zip(row, shown):
            ax.imshow(decode_image(image).permute(1, 2, 0).numpy())
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=64, format="png")
    plt.close(fig)


def register(sub):
    p = sub.add_parser("index", help="embed every image of a folder once, for `dinokit search`")
    p.add_argument("--weights", required=True, help="any weight file load_backbone reads")
    p.add_argument("--which", default="teacher", choices=("teacher", "student"))
    p.add_argument("--num-heads", type=int, help="ViT heads, where the weights cannot tell (non-standard width)")
    p.add_argument("--data", required=True, help="a folder of images (searched recursively) or a named source")
    p.add_argument("--out", required=True, help="the index file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_index)

    p = sub.add_parser("search", help="the indexed images nearest to each query image")
    p.add_argument("--index", required=True, help="a file written by `dinokit index`")
    p.add_argument("images", nargs="+", help="query image files")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--weights", help="the model's weights, if they moved since indexing (default: as recorded)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--sheet", help="also draw the results into this PNG contact sheet")
    p.add_argument("--force", action="store_true", help="overwrite the --sheet PNG when it exists")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_search)


def run_index(args):
    check_outputs([args.out], args.force, args.weights)
    model = load_backbone(args.weights, which=args.which, num_heads=args.num_heads)
    features, paths, skipped = embed(model, open_source(args.data), args.batch_size, args.device, progress=True)
    weights = {"path": str(Path(args.weights).resolve()), "which": args.which, "num_heads": args.num_heads}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_index(args.out, features, paths, weights)
    print(f"indexed {len(paths)} images of {args.data} into {args.out} ({features.shape[1]}-d features)")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")


def search(index_path, images, k: int = 10, batch_size: int = 64, device: str = "cpu",
           weights_path: str | None = None) -> list[dict]:
    """For each readable query image: its k nearest indexed images, [{"query", "results": [{"path",
    "similarity"}]}], with the model the index was made with."""
    features, paths, weights = load_index(index_path)
    model = load_backbone(weights_path or weights["path"], which=weights.get("which", "teacher"),
                          num_heads=weights.get("num_heads"))
    queries, query_paths, skipped = embed(model, ImageFiles(images), batch_size, device)
    for path, reason in skipped:
        print(f"skipped query {path}: {reason}", file=sys.stderr)
    sims, idx = nearest(features, queries, k)
    return [{"query": q, "results": [{"path": paths[j], "similarity": round(s, 6)}
                                     for s, j in zip(sims[i].tolist(), idx[i].tolist())]}
            for i, q in enumerate(query_paths)]


def run_search(args):
    if args.sheet:
        check_outputs([args.sheet], args.force, args.index)  # before the search, not after it
    results = search(args.index, args.images, args.k, args.batch_size, args.device, args.weights)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["query"])
            for rank, m in enumerate(r["results"], 1):
                print(f"  {rank:3d}  {m['similarity']:.4f}  {m['path']}")
    if args.sheet:
        contact_sheet(args.sheet, results)
        print(f"contact sheet: {args.sheet}", file=sys.stderr)  # stdout stays pure JSON with --json
