"""`dinokit maskeval`: how well the [CLS] attention masks segment the objects, scored against true masks.

The paper's protocol (its Figure 4 table): each head's last-block [CLS] attention, thresholded to keep the
smallest set of patches holding 60% of the mass (`mass_mask`, as `dinokit attention` draws it), is compared
with the true foreground by the Jaccard index |A and B| / |A or B|. The image is prepared as `dinokit
attention` prepares it (shorter side resized, cropped to whole patches); the patch mask is upsampled to those
pixels (nearest: each patch a solid square) and the true mask is brought to the same pixels (nearest, the
same crop). Any value above 0 in a true mask is foreground (an indexed DAVIS / VOC annotation, a 0/255 PNG).

Reported: the mean over images of each head's index, their mean over heads, the best head (the one with the
highest mean: the paper shows its best head) and, as an upper bound, the mean of each image's best head.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..data.decode import BadImage, decode_image
from ..data.normalize import normalize
from ..data.sources import IMAGE_SUFFIXES
from ..device import pick_device
from .attention import cls_attention, mass_mask, prepare, resized_size, upsample
from .common import add_common_args, load_model, log, report, require_vit


def register(sub):
    p = sub.add_parser("maskeval", help="Jaccard index of each head's 60%%-mass attention mask against true masks")
    add_common_args(p)
    p.add_argument("--images", required=True, help="folder of images (recursive)")
    p.add_argument("--masks", required=True,
                   help="folder of true masks: IMAGES/a/b.jpg is scored against MASKS/a/b.png; any value > 0 is "
                        "foreground")
    p.add_argument("--image-size", type=int, default=480,
                   help="resize the shorter side to this before the model, as `dinokit attention` (0: as it is)")
    p.add_argument("--threshold", type=float, default=0.6, help="attention mass the masks keep (the paper: 0.6)")
    p.set_defaults(func=run)


def jaccard(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Jaccard index (intersection over union) of bool masks `pred` (..., H, W) against `true` (H, W), one
    per leading index; two empty masks agree perfectly (1).

    >>> jaccard(torch.tensor([[True, True], [False, False]]), torch.tensor([[True, False], [True, False]]))
    tensor(0.3333)
    """
    inter = (pred & true).flatten(-2).sum(-1).double()
    union = (pred | true).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).float()


def read_true_mask(path: Path) -> torch.Tensor:
    """A true mask as bool (H, W): foreground wherever the PNG holds a value above 0 (an indexed image's
    index, a grey level, any colour channel; alpha is not foreground)."""
    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"true mask {path} is unreadable: {e}") from None
    if a.ndim == 3:
        a = a[..., :3].max(-1) if a.shape[-1] >= 3 else a[..., 0]  # RGB(A) colours; LA's grey
    return torch.from_numpy(a > 0)


def true_mask_on_pixels(mask: torch.Tensor, image_hw: tuple[int, int], image_size: int,
                        prepared_hw: tuple[int, int]) -> torch.Tensor:
    """The true mask on the prepared image's pixels: resized (nearest) as its image was, cropped alike."""
    if tuple(mask.shape) != tuple(image_hw):
        raise BadImage(f"the true mask is {mask.shape[0]}x{mask.shape[1]}, its image {image_hw[0]}x{image_hw[1]}")
    size = resized_size(*image_hw, image_size)
    if size != tuple(image_hw):
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0] > 0.5
    return mask[:prepared_hw[0], :prepared_hw[1]]


def pairs(images: Path, masks: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """(image, true mask) pairs by relative path and name, and the images that have no mask."""
    if not images.is_dir():
        raise FileNotFoundError(f"--images {images}: no such folder")
    if not masks.is_dir():
        raise FileNotFoundError(f"--masks {masks}: no such folder")
    found, missing = [], []
    for path in sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        mask = masks / path.relative_to(images).with_suffix(".png")
        if mask.is_file():
            found.append((path, mask))
        else:
            missing.append((str(path), f"no true mask {mask}"))
    if not found:
        raise ValueError(f"no image under {images} has a true mask of the same name under {masks} "
                         f"({len(missing)} images, e.g. {missing[0][1] if missing else 'none'})")
    return found, missing


@torch.no_grad()
def score_image(model, image: torch.Tensor, true: torch.Tensor, image_size: int, threshold: float,
                device: torch.device) -> torch.Tensor:
    """Each head's Jaccard index on one image (uint8 (3, H, W)) against its true mask (bool (H, W))."""
    x = prepare(image, image_size, model.patch_size)
    attn = cls_attention(model, normalize(x).to(device)).float().cpu()
    pred = torch.from_numpy(upsample(mass_mask(attn, threshold), model.patch_size))  # heads, H', W'
    return jaccard(pred, true_mask_on_pixels(true, tuple(image.shape[-2:]), image_size, tuple(x.shape[-2:])))


def summarise(per_image: torch.Tensor) -> dict:
    """(images, heads) Jaccard indices -> the means the command reports (in percent)."""
    per_head = per_image.mean(0) * 100
    best = int(per_head.argmax())
    return {"per_head": per_head.tolist(), "mean_over_heads": float(per_head.mean()), "best_head": best,
            "best_head_jaccard": float(per_head[best]),
            "per_image_best": float(per_image.max(1).values.mean() * 100)}


def run(args):
    if not 0 < args.threshold <= 1:
        raise ValueError("--threshold must be in (0, 1]")
    if args.image_size < 0:
        raise ValueError("--image-size must be >= 0")
    found, skipped = pairs(Path(args.images), Path(args.masks))
    for path, reason in skipped:
        log(args, f"skipped {path}: {reason}")
    model = load_model(args.weights, args.which)
    require_vit(model, "attention masks")
    device = pick_device(args.device)
    model = model.to(device)
    scores, names = [], []
    for image_path, mask_path in tqdm(found, desc="maskeval", unit="image", disable=args.quiet, leave=False):
        try:
            true = read_true_mask(mask_path)
            if not true.any():  # a 60%-mass mask is never empty: it would score 0 whatever the model
                raise BadImage("its true mask has no foreground")
            scores.append(score_image(model, decode_image(str(image_path)), true, args.image_size, args.threshold,
                                      device))
            names.append(str(image_path))
        except BadImage as e:
            log(args, f"skipped {image_path}: {e}")
            skipped.append((str(image_path), str(e)))
    if not scores:
        raise ValueError(f"none of the {len(found)} images with a true mask could be scored")
    per_image = torch.stack(scores)
    summary = summarise(per_image)
    out = {"command": "maskeval", "weights": args.weights, "images": args.images, "masks": args.masks,
           "threshold": args.threshold, "image_size": args.image_size, "n_images": len(names), **summary,
           "skipped": [{"image": p, "reason": r} for p, r in skipped],
           "per_image": {n: (s * 100).tolist() for n, s in zip(names, per_image)}}
    lines = [f"Jaccard index of {args.threshold:.0%}-mass [CLS] attention masks, mean over {len(names)} images "
             f"({len(skipped)} skipped):",
             "  per head: " + ", ".join(f"{h}: {j:.1f}" for h, j in enumerate(summary["per_head"])),
             f"  mean over heads {summary['mean_over_heads']:.1f}; best head {summary['best_head']}: "
             f"{summary['best_head_jaccard']:.1f}; each image's best head {summary['per_image_best']:.1f}"]
    report(args, out, lines)
    return 0
