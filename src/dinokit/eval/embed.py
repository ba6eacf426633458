"""`dinokit embed`: the features of every image of a source, saved with the list of files they belong to."""
import json
from pathlib import Path

import numpy as np
import torch

from ..data.sources import open_source
from .common import (PIXELS, add_common_args, atomic_write, cached_features, check_outputs, load_model, log, report,
                     require_vit, save_safetensors, transform_for)
from .features import cls_features, gem_features, patch_tokens

KINDS = ("cls", "patch", "gem")


def register(sub):
    p = sub.add_parser("embed", help="features of every image in a source, to .safetensors or .npy")
    add_common_args(p)
    p.add_argument("--data", required=True, help="fashion-mnist:train|test or a folder of images")
    p.add_argument("--out", required=True, help="FILE.safetensors or FILE.npy; FILE.txt lists the images")
    p.add_argument("--kind", default="cls", choices=KINDS,
                   help="cls: final [CLS]; patch: all patch tokens (N, patches, D); gem: GeM-pooled patch tokens")
    p.add_argument("--gem-p", type=float, default=4.0, help="GeM exponent (--kind gem)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--force", action="store_true", help="overwrite --out and its FILE.txt when they exist")
    p.set_defaults(func=run)


def feature_fn(kind: str, gem_p: float):
    return {"cls": cls_features, "patch": patch_tokens, "gem": gem_features(gem_p)}[kind]


def run(args):
    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"--out {out}: use a .safetensors or .npy file name")
    list_file = out.with_suffix(".txt")
    check_outputs([out, list_file], args.force, args.weights)
    source = open_source(args.data)
    model = load_model(args.weights, args.which)
    if args.kind != "cls":
        require_vit(model, f"--kind {args.kind}")
    kind = args.kind if args.kind != "gem" else f"gem{args.gem_p:g}"
    feats, kept, skipped = cached_features(model, source, args, kind, feature_fn(args.kind, args.gem_p),
                                           transform_for(model), use_cache=not args.no_cache)
    paths = [source.paths[i] for i in kept]
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"weights": args.weights, "which": args.which if args.weights != PIXELS else "", "source": source.name,
            "kind": kind}
    if out.suffix == ".safetensors":
        save_safetensors({"features": feats.contiguous(), "index": torch.tensor(kept, dtype=torch.int64)}, out,
                         metadata={k: str(v) for k, v in meta.items()} | {"paths": json.dumps(paths)})
    else:
        with atomic_write(out) as tmp:
            np.save(tmp, feats.numpy())
    with atomic_write(list_file) as tmp:
        tmp.write_text("".join(p + "\n" for p in paths))
    log(args, f"{len(kept)} images embedded, {len(skipped)} skipped")
    report(args, {"command": "embed", **meta, "out": str(out), "files": str(list_file), "shape": list(feats.shape),
                  "skipped": len(skipped)},
           [f"{tuple(feats.shape)} {kind} features of {source.name} -> {out} (rows follow {list_file})"])
    return 0
