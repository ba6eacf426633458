"""`dinokit info`: what a weight file holds, or what a named architecture is."""
import torch

from . import vit
from .weights import load_backbone


def register(sub):
    p = sub.add_parser("info", help="build a model (or load weights) and show its size and a forward pass")
    p.add_argument("--weights", help="any weight file load_backbone reads")
    p.add_argument("--arch", default="vit_small", choices=sorted(vit.VIT_SIZES))
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.set_defaults(func=run)


def run(args):
    if args.weights:
        model = load_backbone(args.weights)
        desc = f"{args.weights}: {getattr(model, 'arch', lambda: {'name': type(model).__name__})()}"
    else:
        model = getattr(vit, args.arch)(patch_size=args.patch_size).eval()
        desc = f"{args.arch}/{args.patch_size} (random weights)"
    n = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out = model(torch.randn(1, 3, args.image_size, args.image_size))
    print(f"{desc}\nparameters: {n / 1e6:.2f}M\nforward 1x3x{args.image_size}x{args.image_size} -> "
          f"{tuple(out.shape)}, mean {out.mean():.4f}, std {out.std():.4f}")
