"""`dinokit attention`: where the [CLS] token of the last block looks, per head, as images.

For each image: one heat map per head, the mask of the patches that hold 60% of that head's attention
mass, and an overlay of the mean attention on the image. The paper's Figure 1 and 3."""
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from tqdm import tqdm

from ..data.decode import BadImage, decode_image
from ..device import pick_device
from .common import add_common_args, check_folder, load_model, log, report, require_vit
from ..data.normalize import normalize

MAX_SIDE_RATIO = 4  # the longer side at most 4 x --image-size: a long thin strip stays a sane size
MAX_PATCHES = 128 * 128  # more (a full-size photo with --image-size 0): skipped, not minutes per image


def register(sub):
    p = sub.add_parser("attention", help="per-head [CLS] self-attention maps and 60%%-mass masks as PNG files")
    add_common_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True,
                   help="output folder: one sub-folder per image, named after it (x, x-2, ... when taken)")
    p.add_argument("--image-size", type=int, default=480,
                   help=f"resize the shorter side to this before the model, the longer one to at most "
                        f"{MAX_SIDE_RATIO} times this (0: keep the image's size); images of more than "
                        f"{MAX_PATCHES} patches are skipped")
    p.add_argument("--threshold", type=float, default=0.6, help="attention mass the masks keep")
    p.add_argument("--force", action="store_true",
                   help="write into an image's sub-folder from an earlier run (default: a fresh name beside it)")
    p.set_defaults(func=run)


def cls_attention(model, x: torch.Tensor) -> torch.Tensor:
    """Last block's attention from [CLS] to every patch: (heads, grid_h, grid_w), each head summing to <= 1."""
    attn = model.get_last_selfattention(x[None], cls_only=True)[0]  # heads, 1, tokens
    gh, gw = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    return attn[:, 0, 1:].reshape(-1, gh, gw)


def mass_mask(attn: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """Per head (first dim), the smallest set of most-attended patches holding `threshold` of its mass."""
    flat = attn.flatten(1)
    flat = flat / flat.sum(dim=1, keepdim=True)
    values, order = flat.sort(dim=1, descending=True)
    before = values.cumsum(dim=1) - values  # mass of the patches ranked above each one
    keep_sorted = before < threshold  # a patch is needed while the mass so far falls short
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return keep.reshape(attn.shape)


def resized_size(h: int, w: int, image_size: int) -> tuple[int, int]:
    """(H, W) with the shorter side brought to `image_size` (0: as it is) and the longer one to at most
    MAX_SIDE_RATIO times that, before the crop to whole patches.

    >>> resized_size(60, 90, 40)
    (40, 60)
    >>> resized_size(20, 600, 480)  # not 480 x 14400
    (64, 1920)
    """
    if not image_size:
        return h, w
    scale = min(image_size / min(h, w), MAX_SIDE_RATIO * image_size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def prepare(img: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> [0, 1] float, resized (`resized_size`), then cropped to whole patches."""
    x = img.float() / 255
    if image_size:
        x = F.interpolate(x[None], size=resized_size(*x.shape[-2:], image_size), mode="bicubic",
                          antialias=True, align_corners=False)[0].clamp(0, 1)
    h, w = x.shape[-2:]
    if h < patch_size or w < patch_size:
        resized = " once resized" if image_size else ""
        raise BadImage(f"smaller than one {patch_size}x{patch_size} patch ({w}x{h} px{resized})")
    return x[:, :h - h % patch_size, :w - w % patch_size]


def heat_map(a: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """2-D values -> uint8 RGB, scaled to the map's own range."""
    a = (a - a.min()) / (a.max() - a.min() or 1.0)
    return (colormaps[cmap](a)[..., :3] * 255).round().astype(np.uint8)


def upsample(grid: torch.Tensor, patch_size: int) -> np.ndarray:
    """Patch grid -> pixel grid, each patch a solid square (what the model saw)."""
    return grid.repeat_interleave(patch_size, -2).repeat_interleave(patch_size, -1).numpy()


def save_maps(x: torch.Tensor, attn: torch.Tensor, masks: torch.Tensor, patch_size: int, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    image = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    files = {"image.png": image}
    for h in range(attn.shape[0]):
        files[f"attn-head{h}.png"] = heat_map(upsample(attn[h], patch_size))
        files[f"mask-head{h}.png"] = upsample(masks[h], patch_size).astype(np.uint8) * 255
    mean = heat_map(upsample(attn.mean(0), patch_size), "inferno").astype(np.float32)
    files["overlay.png"] = (0.5 * image + 0.5 * mean).round().astype(np.uint8)
    for name, a in files.items():
        Image.fromarray(a).save(folder / name)
    return [str(folder / n) for n in files]


def folder_name(stem: str, out: Path, used: set[str], force: bool) -> str:
    """`stem`, else `stem-2`, `stem-3`, ...: never a name used earlier in this run (same names in different
    folders), nor one already in `out` unless `force` lets an earlier run's sub-folder be written into."""
    name, n = stem, 1
    while name in used or (os.path.lexists(out / name) and not (force and (out / name).is_dir())):
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name


@torch.no_grad()
def run(args):
    if not 0 < args.threshold <= 1:
        raise ValueError("--threshold must be in (0, 1]")
    out = Path(args.out)
    check_folder(out)
    model = load_model(args.weights, args.which)
    require_vit(model, "attention maps")
    device = pick_device(args.device)
    model = model.to(device)
    results, skipped, lines, used = [], [], [], set()
    for path in tqdm(args.images, desc="attention", unit="image", disable=args.quiet, leave=False):
        try:
            x = prepare(decode_image(path), args.image_size, model.patch_size)
            h, w = x.shape[-2:]
            if (h // model.patch_size) * (w // model.patch_size) > MAX_PATCHES:
                raise BadImage(f"{w // model.patch_size}x{h // model.patch_size} patches ({w}x{h} px), more than "
                               f"{MAX_PATCHES}: pass a smaller --image-size")
        except BadImage as e:
            log(args, f"skipped {path}: {e}")
            skipped.append({"image": path, "reason": str(e)})
            continue
        attn = cls_attention(model, normalize(x).to(device)).float().cpu()
        masks = mass_mask(attn, args.threshold)
        name = folder_name(Path(path).stem, out, used, args.force)
        files = save_maps(x, attn, masks, model.patch_size, out / name)
        fractions = masks.flatten(1).float().mean(1).tolist()
        results.append({"image": path, "size": list(x.shape[-2:]), "grid": list(attn.shape[-2:]),
                        "mask_fraction": fractions, "files": files})
        lines.append(f"{path}: {len(fractions)} heads, masks cover "
                     f"{', '.join(f'{100 * f:.0f}%' for f in fractions)} of the image -> {out / name}")
    if not results:
        first = skipped[0]
        raise ValueError(f"none of the {len(args.images)} images could be used ({first['image']}: {first['reason']})")
    report(args, {"command": "attention", "weights": args.weights, "out": str(out), "images": results,
                  "skipped": skipped}, lines)
    return 0
