"""DINO's multi-crop augmentation on batches of tensors, any crop sizes, on any device.

Every random draw is a pure function of (seed, epoch, sample index, draw id), computed by a counter-based
hash. A sample's crops are therefore the same whatever the batch size, the number of loader workers or
processes, and a resumed run needs no augmentation RNG state to repeat itself exactly.

Two halves, so that the geometric half can run where images are decoded (loader workers) and the
photometric half on whole batches where the model is (the GPU when there is one):
- `geometric`: RandomResizedCrop (torchvision's rule: 10 tries, then a centre crop) via roi_align,
  which averages 2 x 2 samples per output pixel: cheap anti-aliasing when a crop shrinks.
- `photometric`: flip, colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur, solarization, normalisation.
"""
import math
from dataclasses import dataclass

import torch
from torchvision.ops import roi_align

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic; shifts made logical by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def _i64(v: int) -> int:
    """A Python int wrapped to the signed int64 range, as tensors hold it."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def uniform(seed: int, epoch: int, index: torch.Tensor, draw: int, low: float = 0.0, high: float = 1.0):
    """One uniform number in [low, high) per sample index, fixed by (seed, epoch, index, draw)."""
    stream = _i64(_i64(seed) * 0x9E3779B97F4A7C15 + _i64(epoch) * 0xD1B54A32D192ED03 + draw * 0x632BE59BD9B4E5B)
    x = _mix(_mix(index.long() + stream) ^ stream)
    u = ((x >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)
    return (low + (high - low) * u).float()


@dataclass
class CropSpec:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


class MultiCrop:
    def __init__(self, global_size: int = 224, local_size: int = 96, local_crops: int = 8,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), seed: int = 0):
        self.seed = seed
        self.crops = [CropSpec(global_size, tuple(global_scale), 1.0, 0.0),
                      CropSpec(global_size, tuple(global_scale), 0.1, 0.2)]
        self.crops += [CropSpec(local_size, tuple(local_scale), 0.5, 0.0) for _ in range(local_crops)]
        # Blur radii are the paper's (0.1, 2.0) px at 224 (global) and 96 (local), scaled to our crop sizes.
        self.blur_scale = [global_size / 224] * 2 + [local_size / 96] * local_crops

    @property
    def ncrops(self) -> int:
        return len(self.crops)

    def _draw(self, epoch, index, crop: int, what: int, low=0.0, high=1.0):
        return uniform(self.seed, epoch, index, crop * 64 + what, low, high)

    # ---- geometric -------------------------------------------------------------------------------
    def crop_boxes(self, epoch: int, index: torch.Tensor, c: int, height: int, width: int) -> torch.Tensor:
        """RandomResizedCrop boxes (x1, y1, x2, y2) in pixels, one per sample, for crop number c."""
        spec, area = self.crops[c], float(height * width)
        n = index.shape[0]
        box = torch.empty(n, 4)
        done = torch.zeros(n, dtype=torch.bool)
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for t in range(10):
            target = area * self._draw(epoch, index, c, 4 * t, *spec.scale)
            ratio = torch.exp(self._draw(epoch, index, c, 4 * t + 1, *log_ratio))
            w = torch.round(torch.sqrt(target * ratio))
            h = torch.round(torch.sqrt(target / ratio))
            ok = (w > 0) & (h > 0) & (w <= width) & (h <= height) & ~done
            top = torch.floor(self._draw(epoch, index, c, 4 * t + 2) * (height - h + 1))
            left = torch.floor(self._draw(epoch, index, c, 4 * t + 3) * (width - w + 1))
            box[ok] = torch.stack([left, top, left + w, top + h], 1)[ok]
            done |= ok
        if not done.all():  # torchvision's fallback: the largest centre crop within the ratio range
            ratio = width / height
            w = float(width) if ratio <= 4 / 3 else round(height * 4 / 3)
            h = float(height) if ratio >= 3 / 4 else round(width / (3 / 4))
            w, h = min(w, width), min(h, height)
            left, top = (width - w) // 2, (height - h) // 2
            box[~done] = torch.tensor([left, top, left + w, top + h], dtype=torch.float)
        return box

    def geometric(self, images: torch.Tensor | list[torch.Tensor], index: torch.Tensor, epoch: int):
        """uint8 images (a batch tensor, or a list of (3, H, W) of any sizes) -> one float [0, 1] tensor
        (B, 3, S, S) per crop."""
        if isinstance(images, torch.Tensor):
            groups = [(images, torch.arange(len(images)))]
        else:  # images of different sizes: crop each size group separately, then restore order
            by_size: dict[tuple, list[int]] = {}
            for j, im in enumerate(images):
                by_size.setdefault(tuple(im.shape[-2:]), []).append(j)
            groups = [(torch.stack([images[j] for j in js]), torch.tensor(js)) for js in by_size.values()]
        out = []
        for c, spec in enumerate(self.crops):
            crop = torch.empty(len(index), 3, spec.size, spec.size)
            for batch, pos in groups:
                boxes = self.crop_boxes(epoch, index[pos], c, batch.shape[-2], batch.shape[-1])
                rois = torch.cat([torch.arange(len(pos), dtype=torch.float)[:, None], boxes], 1)
                crop[pos] = roi_align(batch.float(), rois, spec.size, spatial_scale=1.0, sampling_ratio=2,
                                      aligned=True)
            out.append(crop.div_(255))
        return out

    # ---- photometric -----------------------------------------------------------------------------
    def photometric(self, crops: list[torch.Tensor], index: torch.Tensor, epoch: int) -> list[torch.Tensor]:
        """Float [0, 1] crops (on any device) -> augmented, normalised crops."""
        out = []
        for c, (x, spec) in enumerate(zip(crops, self.crops)):
            d = lambda what, low=0.0, high=1.0: self._draw(epoch, index, c, 40 + what, low, high).to(x.device)
            col = lambda v: v.view(-1, 1, 1, 1)
            x = torch.where(col(d(0) < 0.5), x.flip(-1), x)
            jitter = col(d(1) < 0.8)
            y = adjust_brightness(x, col(d(2, 0.6, 1.4)))
            y = adjust_contrast(y, col(d(3, 0.6, 1.4)))
            y = adjust_saturation(y, col(d(4, 0.8, 1.2)))
            y = adjust_hue(y, col(d(5, -0.1, 0.1)))
            x = torch.where(jitter, y, x)
            x = torch.where(col(d(6) < 0.2), grayscale(x).expand_as(x), x)
            if spec.blur_p > 0:
                sigma = d(8, 0.1, 2.0) * self.blur_scale[c]
                sigma = torch.where(d(7) < spec.blur_p, sigma, torch.zeros_like(sigma))
                x = gaussian_blur(x, sigma)
            if spec.solarize_p > 0:
                x = torch.where(col(d(9) < spec.solarize_p) & (x >= 128 / 255), 1 - x, x)
            mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
            out.append((x - mean) / std)
        return out


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def adjust_brightness(x, factor):
    return (x * factor).clamp(0, 1)


def adjust_contrast(x, factor):
    mean = grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0, 1)


def adjust_saturation(x, factor):
    gray = grayscale(x)
    return ((x - gray) * factor + gray).clamp(0, 1)


def adjust_hue(x, shift):
    """Rotate hue by `shift` turns (per sample), through HSV."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6,
                    torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    v = maxc
    # HSV -> RGB: each channel n in (5, 3, 1): v - v s max(0, min(k, 4 - k, 1)), k = (n + 6h) mod 6
    out = []
    for n in (5, 3, 1):
        k = (n + h * 6) % 6
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (0 = unchanged), reflect padding."""
    if not bool((sigma > 0).any()):
        return x
    B, C, H, W = x.shape
    radius = max(1, min(int(math.ceil(3 * float(sigma.max()))), (min(H, W) - 1)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-6).view(-1, 1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = torch.where(sigma.view(-1, 1) > 0, k, (t == 0).to(x.dtype).expand_as(k))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, taps)
    y = torch.nn.functional.pad(x.reshape(1, B * C, H, W), (radius, radius, radius, radius), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(B * C, 1, 1, -1), groups=B * C)
    y = torch.nn.functional.conv2d(y, k.view(B * C, 1, -1, 1), groups=B * C)
    return y.view(B, C, H, W)
