"""Frozen-backbone features of every image in a source, the way DINO's evaluations take them."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.decode import BadImage
from ..data.normalize import MEAN, STD  # noqa: F401 (MEAN, STD: imported from here by other eval modules)
from ..data.normalize import normalize as imagenet_normalize
from ..models.vit import PatchEmbed


def eval_transform(img: torch.Tensor, resize: int = 256, crop: int = 224, normalize: bool = True,
                   native: int | None = None) -> torch.Tensor:
    """uint8 (3, H, W) -> normalised float. Large images: resize shorter side + centre crop (the paper's
    protocol). Images no larger than the crop are used whole: as they are (e.g. 28 x 28 Fashion-MNIST), or
    brought down to `native`, the model's training resolution, when they are larger than it (the paper's
    protocol likewise evaluates at the resolution it trained at). `normalize=False` stops at [0, 1] pixels
    (the pixel baseline)."""
    x = img.float().div_(255)
    if min(x.shape[-2:]) > crop:
        x = resize_centre_crop(x, resize, crop)
    elif native and min(x.shape[-2:]) > native:  # the whole image: shorter side to `native`, centre square
        x = resize_centre_crop(x, native, native)
    return imagenet_normalize(x) if normalize else x


def resize_centre_crop(x: torch.Tensor, short_side: int, crop: int) -> torch.Tensor:
    """[0, 1] float (3, H, W): the shorter side resized to `short_side` (bicubic, antialiased), then the
    centre crop x crop."""
    h, w = x.shape[-2:]
    scale = short_side / min(h, w)
    size = (max(crop, round(h * scale)), max(crop, round(w * scale)))
    x = F.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    return x[:, top:top + crop, left:left + crop].clamp_(0, 1)


class _EvalImages(Dataset):
    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        try:
            return i, self.transform(self.source.read(i)), ""
        except BadImage as e:
            return i, None, str(e)


def _collate(items):
    return items  # images may differ in size: grouped by shape in the loop


def cls_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def smallest_side(model: nn.Module) -> int:
    """The shortest image side `model` takes: a patchify (the paper's ViT stem) needs one whole patch. Conv
    stems and torchvision's ResNets pad (1 x 1 works); the pixel baseline takes anything."""
    return max((m.patch_size for m in model.modules() if isinstance(m, PatchEmbed)), default=1)


@torch.no_grad()
def extract_features(model: nn.Module, source, batch_size: int = 256, device: str | torch.device = "cpu",
                     feature_fn=cls_features, transform=eval_transform, num_workers: int = 0,
                     progress: bool = True) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Features of every readable image: (N_ok, D) float32, the indices they belong to, and the skipped
    (index, reason) pairs: unreadable images, and those smaller than the model takes. `feature_fn(model,
    batch)` picks what to take (default: [CLS])."""
    model = model.to(device).eval()
    loader = DataLoader(_EvalImages(source, transform), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    feats, kept, skipped = [], [], []
    smallest = smallest_side(model)
    for items in tqdm(loader, desc="features", unit="batch", disable=not progress, leave=False):
        groups: dict[tuple, list] = {}
        for i, x, reason in items:
            if x is not None and min(x.shape[-2:]) < smallest:  # skipped like an unreadable file, not fatal
                x, reason = None, f"smaller than one {smallest}x{smallest} patch ({x.shape[-1]}x{x.shape[-2]} px)"
            if x is None:
                skipped.append((i, reason))
            else:
                groups.setdefault(tuple(x.shape), []).append((i, x))
        for group in groups.values():
            batch = torch.stack([x for _, x in group]).to(device)
            feats.append(feature_fn(model, batch).float().cpu())
            kept.extend(i for i, _ in group)
    if not feats:
        raise ValueError(f"no readable images in {getattr(source, 'name', source)} ({len(skipped)} skipped)")
    if len({f.shape[1:] for f in feats}) > 1:
        raise ValueError(f"features of {getattr(source, 'name', source)} differ in shape between image sizes "
                         f"({sorted({tuple(f.shape[1:]) for f in feats})}); use images of one size")
    order = sorted(range(len(kept)), key=kept.__getitem__)  # back to source order
    return torch.cat(feats)[order], [kept[j] for j in order], skipped


def patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final-norm patch tokens of the last block: B, patches, dim (row-major over the patch grid)."""
    return model.forward_features(x)[:, 1:]


def gem(tokens: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """Generalised-mean pooling over tokens (B, N, D) -> (B, D); p = 1 is the average, large p the max."""
    return tokens.clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p)


def gem_features(p: float = 4.0):
    return lambda model, x: gem(patch_tokens(model, x), p)


def cls_gem_features(p: float = 4.0):
    """Copy detection's descriptor: [CLS] and GeM-pooled patch tokens of the last block, concatenated."""
    def fn(model, x):
        tokens = model.forward_features(x)
        return torch.cat([tokens[:, 0], gem(tokens[:, 1:], p)], dim=1)
    return fn


def last_blocks_features(n_last_blocks: int = 4, avgpool: bool = False):
    """The linear probe's input, as the paper's `eval_linear.py` builds it: [CLS] of the last n blocks (the
    final norm applied to each), concatenated; with `avgpool`, also the average of the last block's patch
    tokens. With one block (the paper's ViT-B setting) the two are interleaved feature by feature
    (cls_0, avg_0, cls_1, avg_1, ...), the layout the paper's code makes and its released linear weights
    expect; with more blocks (which the paper's code cannot combine with avgpool) the average is appended.

    >>> from dinokit.models.vit import VisionTransformer
    >>> last_blocks_features(2, avgpool=True)(VisionTransformer(32, 8, embed_dim=48, depth=2, num_heads=3),
    ...                                       torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 144])
    """
    def fn(model, x):
        layers = model.get_intermediate_layers(x, n_last_blocks)
        parts = [t[:, 0] for t in layers]
        if avgpool:
            average = layers[-1][:, 1:].mean(dim=1)
            if len(parts) == 1:
                return torch.stack([parts[0], average], dim=2).flatten(1)
            parts.append(average)
        return torch.cat(parts, dim=1)
    return fn
