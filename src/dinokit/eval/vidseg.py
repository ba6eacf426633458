"""`dinokit vidseg`: semi-supervised video object segmentation on DAVIS 2017 by label propagation.

Each frame's last-block patch tokens are its features. The labels of the first frame and of the 7 previous
frames flow to the next frame through the affinity exp(cos / 0.1), restricted to sources within 12 patches
of the target, keeping the 5 strongest sources per target. Scored with DAVIS's J (region similarity, IoU)
and F (contour accuracy), leaving out the first and last frames as the benchmark does.

Frame sizes, preprocessing, propagation, upsampling and the metrics follow the paper's
`eval_video_segmentation.py` and the davis2017-evaluation package (tests/test_protocol_parity.py).
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..data.decode import decode_image
from ..device import pick_device
from .common import add_common_args, load_model, log, report, require_vit
from .davis_synth import save_indexed
from .features import MEAN

# The reference's frame normalisation for this protocol: ImageNet's, but with 0.228 as the red channel's std.
FRAME_STD = (0.228, 0.224, 0.225)


def register(sub):
    p = sub.add_parser("vidseg", help="DAVIS 2017 video object segmentation by label propagation (J and F)")
    add_common_args(p)
    p.add_argument("--davis", required=True, help="DAVIS root: JPEGImages/480p, Annotations/480p, ImageSets/2017")
    p.add_argument("--out", required=True, help="folder for the predicted masks (OUT/VIDEO/00000.png ...)")
    p.add_argument("--split", default="val", help="video list ImageSets/2017/SPLIT.txt (all videos if absent)")
    p.add_argument("--size", type=int, default=480,
                   help="shorter side the frames are resized to, the other side down to a multiple of 64 "
                        "(the paper's rule; 0: as they are, down to whole patches)")
    p.add_argument("--n-last-frames", type=int, default=7)
    p.add_argument("--neighbourhood", type=int, default=12, help="radius in patches (0: no restriction)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.1)
    p.set_defaults(func=run)


# ---- propagation -----------------------------------------------------------------------------------

def neighbourhood_mask(h: int, w: int, radius: int) -> torch.Tensor:
    """(h*w, h*w) bool: target patch i may take labels from source patch j when both row and column are
    within `radius` patches."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return ((rows[:, None] - rows[None]).abs() <= radius) & ((cols[:, None] - cols[None]).abs() <= radius)


def propagate(target: torch.Tensor, sources: list[torch.Tensor], source_labels: list[torch.Tensor],
              topk: int = 5, temperature: float = 0.1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft labels (C, P) of a target frame from context frames.
    target: (P, D) L2-normalised patch features; sources: each (P, D); source_labels: each (C, P)."""
    src = torch.stack(sources)  # n, P, D
    aff = torch.exp(torch.einsum("pd,nqd->npq", target, src) / temperature)  # n, target P, source P
    if mask is not None:
        aff = aff * mask
    aff = aff.permute(1, 0, 2).reshape(target.shape[0], -1)  # target P, n * source P
    kth = aff.topk(min(topk, aff.shape[1]), dim=1).values[:, -1:]
    aff = aff * (aff >= kth)
    aff = aff / aff.sum(dim=1, keepdim=True)
    labels = torch.stack(source_labels).permute(1, 0, 2).reshape(source_labels[0].shape[0], -1)  # C, n * P
    return labels @ aff.T


def frame_size(h: int, w: int, size: int, patch: int) -> tuple[int, int]:
    """The size frames are processed at. The paper's rule: the height becomes `size` unless the frame is
    portrait (then the width does), and the other side scales along, rounded down to a multiple of 64
    (DAVIS's 854 x 480 -> 832 x 480). `size` 0: the frame as it is, down to whole patches.

    >>> frame_size(480, 854, 480, 16), frame_size(854, 480, 480, 16), frame_size(50, 70, 0, 16)
    ((480, 832), (832, 480), (48, 64))
    """
    if not size:
        return max(patch, h - h % patch), max(patch, w - w % patch)
    if h > w:
        return max(64, int(size * h / w) // 64 * 64), size
    return size, max(64, int(size * w / h) // 64 * 64)


def load_frame(path: Path, hw: tuple[int, int]) -> torch.Tensor:
    """A frame resized to `hw` as the reference does it (bilinear without antialiasing, to whole grey
    levels, like OpenCV's resize of 8-bit images), normalised with `FRAME_STD`."""
    x = decode_image(str(path)).float()
    if tuple(x.shape[-2:]) != tuple(hw):
        x = F.interpolate(x[None], size=hw, mode="bilinear", align_corners=False)[0].round_().clamp_(0, 255)
    return (x / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(FRAME_STD).view(3, 1, 1)


def read_labels(path: Path) -> np.ndarray:
    """An indexed annotation's label map (object ids, 0 for the background)."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"{path}: DAVIS annotations are indexed (palette) PNGs, this one is {im.mode}")
        return np.asarray(im).copy()


@torch.no_grad()
def segment_video(model, frames: list[Path], first_labels: np.ndarray, args, device) -> list[np.ndarray]:
    """Predicted label maps (original frame size) for every frame; the first is the given annotation."""
    oh, ow = first_labels.shape
    patch = model.patch_size
    h, w = frame_size(oh, ow, args.size, patch)
    gh, gw = h // patch, w // patch
    num_labels = int(first_labels.max()) + 1
    small = np.asarray(Image.fromarray(first_labels).resize((gw, gh), Image.NEAREST))
    first_soft = F.one_hot(torch.from_numpy(small.astype(np.int64)).flatten(), num_labels).T.float().to(device)
    mask = neighbourhood_mask(gh, gw, args.neighbourhood).to(device) if args.neighbourhood > 0 else None

    def features(path):
        tokens = model.get_intermediate_layers(load_frame(path, (h, w))[None].to(device), 1)[0][0, 1:]
        return F.normalize(tokens.float(), dim=1)

    first_feat = features(frames[0])
    recent: list[tuple[torch.Tensor, torch.Tensor]] = []
    predictions = [first_labels]
    for path in tqdm(frames[1:], desc="frames", unit="frame", disable=args.quiet, leave=False):
        feat = features(path)
        context = [(first_feat, first_soft)] + recent
        soft = propagate(feat, [f for f, _ in context], [s for _, s in context], args.topk, args.temperature, mask)
        recent = (recent + [(feat, soft)])[-args.n_last_frames:] if args.n_last_frames else []
        # Upsample the soft labels to pixels, stretch each to [0, 1] (as the reference), take the best label.
        up = F.interpolate(soft.reshape(1, num_labels, gh, gw), scale_factor=patch, mode="bilinear",
                           align_corners=False, recompute_scale_factor=False)[0]
        lo = up.flatten(1).min(1).values.view(-1, 1, 1)
        hi = up.flatten(1).max(1).values.view(-1, 1, 1)
        up = torch.where(hi > 0, (up - lo) / (hi - lo).clamp_min(1e-12), up)
        labels = up.argmax(0).to(torch.uint8).cpu().numpy()
        predictions.append(np.asarray(Image.fromarray(labels).resize((ow, oh), Image.NEAREST)))
    return predictions


# ---- DAVIS metrics ----------------------------------------------------------------------------------

def region_similarity(pred: np.ndarray, gt: np.ndarray) -> float:
    """J: intersection over union of two binary masks; 1 when both are empty."""
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask: those that differ from their right, lower or lower-right neighbour."""
    m = mask.astype(bool)
    right, below, diag = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    right[:, :-1], below[:-1, :], diag[:-1, :-1] = m[:, 1:], m[1:, :], m[1:, 1:]
    b = (m ^ right) | (m ^ below) | (m ^ diag)
    b[-1, :] = m[-1, :] ^ right[-1, :]  # the last row and column compare within the image only
    b[:, -1] = m[:, -1] ^ below[:, -1]
    b[-1, -1] = False
    return b


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk of `radius` pixels."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None] ** 2) <= radius ** 2).float()[None, None]
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.conv2d(x, disk, padding=radius)[0, 0] > 0).numpy()


def contour_accuracy(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """F: boundary F-measure, a boundary pixel counting as matched within ceil(0.008 x image diagonal)."""
    radius = math.ceil(bound_th * math.hypot(*gt.shape)) if bound_th < 1 else int(bound_th)
    pb, gb = boundary(pred), boundary(gt)
    n_pred, n_gt = pb.sum(), gb.sum()
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    precision = (pb & dilate(gb, radius)).sum() / n_pred
    recall = (gb & dilate(pb, radius)).sum() / n_gt
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


VOID = 255  # DAVIS's label for pixels that are not scored


def score_video(preds: list[np.ndarray], gts: list[np.ndarray]) -> dict[int, tuple[float, float]]:
    """{object id: (J mean, F mean)} over the frames between the first and the last, as davis2017-evaluation
    scores a semi-supervised result: objects 1 to the largest id of the first annotation, void pixels counted
    as background."""
    gts = [np.where(g == VOID, 0, g) for g in gts]
    objects = range(1, int(gts[0].max()) + 1)
    frames = range(1, len(gts) - 1) if len(gts) > 2 else range(1, len(gts))
    out = {}
    for k in objects:
        js = [region_similarity(preds[t] == k, gts[t] == k) for t in frames]
        fs = [contour_accuracy(preds[t] == k, gts[t] == k) for t in frames]
        out[k] = (float(np.mean(js)), float(np.mean(fs)))
    return out


# ---- command ----------------------------------------------------------------------------------------

def video_names(root: Path, split: str) -> list[str]:
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    if listing.is_file():
        return [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return sorted(p.name for p in (root / "JPEGImages" / "480p").iterdir() if p.is_dir())


def run(args):
    root, out = Path(args.davis), Path(args.out)
    if not (root / "JPEGImages" / "480p").is_dir():
        raise FileNotFoundError(f"{root} is not a DAVIS root: JPEGImages/480p is missing")
    model = load_model(args.weights, args.which)
    require_vit(model, "video segmentation")
    device = pick_device(args.device)
    model = model.to(device)
    per_object, videos, lines = [], {}, []
    for name in video_names(root, args.split):
        frames = sorted((root / "JPEGImages" / "480p" / name).glob("*.jpg"))
        ann_dir = root / "Annotations" / "480p" / name
        if not frames or not (ann_dir / f"{frames[0].stem}.png").is_file():
            log(args, f"skipped video {name}: no frames or no first-frame annotation")
            continue
        first = read_labels(ann_dir / f"{frames[0].stem}.png")
        preds = segment_video(model, frames, first, args, device)
        (out / name).mkdir(parents=True, exist_ok=True)
        for path, pred in zip(frames, preds):
            save_indexed(out / name / f"{path.stem}.png", pred)
        gts = [read_labels(ann_dir / f"{p.stem}.png") if (ann_dir / f"{p.stem}.png").is_file() else None
               for p in frames]
        if any(g is None for g in gts):  # e.g. DAVIS test sets: predictions only
            log(args, f"{name}: not every frame is annotated, no score")
            continue
        scores = score_video(preds, gts)
        videos[name] = {str(k): {"J": j, "F": f} for k, (j, f) in scores.items()}
        per_object.extend(scores.values())
        lines.append(f"{name}: " + ", ".join(f"object {k} J {j:.3f} F {f:.3f}" for k, (j, f) in scores.items()))
    if not per_object:
        raise ValueError(f"no annotated video scored under {root}")
    j_mean = float(np.mean([j for j, _ in per_object]))
    f_mean = float(np.mean([f for _, f in per_object]))
    lines.append(f"J&F mean {(j_mean + f_mean) / 2:.3f}  J mean {j_mean:.3f}  F mean {f_mean:.3f} "
                 f"({len(per_object)} objects, {len(videos)} videos)")
    report(args, {"command": "vidseg", "weights": args.weights, "davis": str(root), "out": str(out),
                  "J_mean": j_mean, "F_mean": f_mean, "JF_mean": (j_mean + f_mean) / 2, "videos": videos}, lines)
    return 0
