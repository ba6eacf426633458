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

from .normalize import mean_std

# Ranges of the colour draws 40-49 (ColorJitter(0.4, 0.4, 0.2, 0.1) and the paper's blur sigmas at 224 px)
COLOUR_LOW = (0.0, 0.0, 0.6, 0.6, 0.8, -0.1, 0.0, 0.0, 0.1, 0.0)
COLOUR_HIGH = (1.0, 1.0, 1.4, 1.4, 1.2, 0.1, 1.0, 1.0, 2.0, 1.0)


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


def uniform(seed: int, epoch: int, index: torch.Tensor, draw, low=0.0, high=1.0) -> torch.Tensor:
    """Uniform numbers in [low, high) fixed by (seed, epoch, sample index, draw id): (N,) for one draw id,
    (N, D) for a tensor of D ids (low and high then scalars or one per id). All of a crop's draws are made in
    one call: each call costs a dozen small tensor operations whatever its size."""
    base = _i64(_i64(seed) * 0x9E3779B97F4A7C15 + _i64(epoch) * 0xD1B54A32D192ED03)
    stream = base + torch.as_tensor(draw, dtype=torch.long) * 0x632BE59BD9B4E5B  # int64 wraps like _i64
    x = _mix(_mix(index.long().view(-1, *[1] * stream.dim()) + stream) ^ stream)
    u = ((x >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)
    low, high = torch.as_tensor(low, dtype=torch.double), torch.as_tensor(high, dtype=torch.double)
    return (low + (high - low) * u).float()


@dataclass
class CropSpec:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


class MultiCrop:
    """DINO's views of each image: 2 global crops and `local_crops` local ones, each resized-cropped, flipped,
    colour-jittered, sometimes greyed, blurred and solarised as the paper's `DataAugmentationDINO` does, with
    its probabilities as defaults. `geometric` cuts the crops (in loader workers or on the GPU),
    `photometric` does the rest on whole batches.

    >>> mc = MultiCrop(global_size=32, local_size=16, local_crops=4)
    >>> images, index = torch.randint(0, 256, (8, 3, 48, 48), dtype=torch.uint8), torch.arange(8)
    >>> views = mc.photometric(mc.geometric(images, index, epoch=0), index, epoch=0)
    >>> [tuple(v.shape) for v in views][:3]
    [(8, 3, 32, 32), (8, 3, 32, 32), (8, 3, 16, 16)]
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, local_crops: int = 8,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), seed: int = 0, flip_p: float = 0.5,
                 jitter_p: float = 0.8, grayscale_p: float = 0.2, global_blur_p: tuple[float, float] = (1.0, 0.1),
                 local_blur_p: float = 0.5, solarize_p: float = 0.2):
        self.seed = seed
        self.flip_p, self.jitter_p, self.grayscale_p = flip_p, jitter_p, grayscale_p
        # solarisation: the second global view only
        self.crops = [CropSpec(global_size, tuple(global_scale), global_blur_p[0], 0.0),
                      CropSpec(global_size, tuple(global_scale), global_blur_p[1], solarize_p)]
        self.crops += [CropSpec(local_size, tuple(local_scale), local_blur_p, 0.0) for _ in range(local_crops)]
        # Blur radii are the paper's (0.1, 2.0) px at 224 (global) and 96 (local), scaled to our crop sizes.
        self.blur_scale = [global_size / 224] * 2 + [local_size / 96] * local_crops

    @property
    def ncrops(self) -> int:
        return len(self.crops)

    def _draw(self, epoch, index, crop: int, what, low=0.0, high=1.0):
        """Draw ids: 64 per crop; 0-39 its crop box (10 tries x 4), 40-49 its colours."""
        return uniform(self.seed, epoch, index, crop * 64 + torch.as_tensor(what), low, high)

    # ---- geometric -------------------------------------------------------------------------------
    def crop_boxes(self, epoch: int, index: torch.Tensor, c: int, height, width) -> torch.Tensor:
        """RandomResizedCrop boxes (x1, y1, x2, y2) in pixels, one per sample, for crop number c. `height` and
        `width`: the images' size, one for all samples or a tensor with one per sample."""
        spec, n = self.crops[c], index.shape[0]
        height = torch.as_tensor(height, dtype=torch.float).expand(n)
        width = torch.as_tensor(width, dtype=torch.float).expand(n)
        area = height * width
        # torchvision's rule: the first of 10 tries that fits. All drawn in one call: try t's scale, log-ratio,
        # top and left are draws 4t to 4t + 3
        low = torch.tensor([spec.scale[0], math.log(3 / 4), 0.0, 0.0], dtype=torch.double).repeat(10)
        high = torch.tensor([spec.scale[1], math.log(4 / 3), 1.0, 1.0], dtype=torch.double).repeat(10)
        draws = self._draw(epoch, index, c, torch.arange(40), low, high)
        scale, log_ratio, u_top, u_left = draws.view(n, 10, 4).unbind(2)
        target = area[:, None] * scale
        ratio = torch.exp(log_ratio)
        w = torch.round(torch.sqrt(target * ratio))
        h = torch.round(torch.sqrt(target / ratio))
        fits = (w > 0) & (h > 0) & (w <= width[:, None]) & (h <= height[:, None])
        top = torch.floor(u_top * (height[:, None] - h + 1))
        left = torch.floor(u_left * (width[:, None] - w + 1))
        first = fits.int().argmax(1, keepdim=True)[..., None]  # (n, 1, 1): the first try that fits
        box = torch.stack([left, top, left + w, top + h], 2).gather(1, first.expand(-1, 1, 4))[:, 0]
        done = fits.any(1)
        if not done.all():  # torchvision's fallback: the largest centre crop within the ratio range
            H, W = height.double(), width.double()  # float64, as torchvision's Python arithmetic
            w = torch.where(W / H <= 4 / 3, W, torch.round(H * 4 / 3)).minimum(W)
            h = torch.where(W / H >= 3 / 4, H, torch.round(W / (3 / 4))).minimum(H)
            left, top = torch.floor((W - w) / 2), torch.floor((H - h) / 2)
            box[~done] = torch.stack([left, top, left + w, top + h], 1).float()[~done]
        return box

    def geometric(self, images: torch.Tensor | list[torch.Tensor], index: torch.Tensor, epoch: int,
                  canvas: bool | None = None, full_sizes: torch.Tensor | None = None,
                  shrink: torch.Tensor | None = None):
        """uint8 images (a batch tensor, or a list of (3, H, W) of any sizes) -> one float [0, 1] tensor
        (B, 3, S, S) per crop, on the images' device.

        Images of different sizes are cropped by size group (`canvas` false: the CPU's way, bit for bit as
        ever), or all at once on a common canvas (`canvas` true; by default when the images are on a GPU,
        where nearly every JPEG has its own size and a group per image would mean a kernel per image).

        `full_sizes` (N, 2) and `shrink` (N,): images decoded at 1/shrink of their full (H, W) size; their crop
        boxes are drawn on the full size, as for the image decoded whole, and scaled down."""
        device = images.device if isinstance(images, torch.Tensor) else images[0].device
        if canvas is None:
            canvas = device.type != "cpu"
        if isinstance(images, torch.Tensor):
            height, width = images.shape[-2:]
            groups = [(images, None)]
        else:
            sizes = torch.tensor([im.shape[-2:] for im in images], dtype=torch.float)
            height, width = sizes[:, 0], sizes[:, 1]
            if full_sizes is not None:
                height, width = full_sizes[:, 0].float(), full_sizes[:, 1].float()
            if canvas:
                groups = [(pad_to_canvas(images), None)]
            else:
                by_size: dict[tuple, list[int]] = {}
                for j, im in enumerate(images):
                    by_size.setdefault(tuple(im.shape[-2:]), []).append(j)
                groups = [(torch.stack([images[j] for j in js]), torch.tensor(js)) for js in by_size.values()]
        # grey images (three equal channels) on the CPU are cropped as one: the same numbers, roi_align in two
        # thirds of the time
        channels = groups[0][0].shape[1]
        groups = [((batch[:, :1] if device.type == "cpu" and is_grey(batch) else batch).float(), pos)
                  for batch, pos in groups]
        out = []
        for c, spec in enumerate(self.crops):
            boxes = self.crop_boxes(epoch, index, c, height, width)  # each sample's from its own size
            if shrink is not None:
                boxes = boxes / shrink.view(-1, 1)
            parts = []
            for batch, pos in groups:
                group_boxes = boxes if pos is None else boxes[pos]
                rois = torch.cat([torch.arange(len(group_boxes), dtype=torch.float)[:, None], group_boxes], 1)
                # boxes are drawn on the CPU; a blocking copy would wait for the GPU to finish its queue
                part = roi_align(batch, rois.to(device, non_blocking=True), spec.size, spatial_scale=1.0,
                                 sampling_ratio=2, aligned=True).div_(255)
                parts.append(part.expand(-1, channels, -1, -1).contiguous() if part.shape[1] < channels else part)
            crop = parts[0]
            if len(groups) > 1:  # size groups: back in batch order
                crop = torch.empty(len(index), channels, spec.size, spec.size, device=device)
                for (_, pos), part in zip(groups, parts):
                    crop[pos] = part
            out.append(crop)
        return out

    # ---- photometric -----------------------------------------------------------------------------
    def photometric(self, crops: list[torch.Tensor], index: torch.Tensor, epoch: int) -> list[torch.Tensor]:
        """Float [0, 1] crops (on any device) -> augmented, normalised crops. Nothing here waits for the
        device: the draws are made on the CPU and cross over in one non-blocking copy per crop. Grey crops on
        the CPU skip the colour operations that leave grey unchanged (saturation, hue, greyscale): a third
        of the work for nothing (checking the crops on a GPU would make it wait)."""
        out = []
        mean, std = mean_std(crops[0].device)
        for c, (x, spec) in enumerate(zip(crops, self.crops)):
            # draws 40-49: flip, jitter?, brightness, contrast, saturation, hue, grey?, blur?, sigma, solarize?
            u = self._draw(epoch, index, c, 40 + torch.arange(10), COLOUR_LOW, COLOUR_HIGH)
            draws = u.T.contiguous().to(x.device, non_blocking=True)
            flip, jitter, brightness, contrast, saturation, hue, gray, _, _, solarize = draws.view(10, -1, 1, 1, 1)
            x = torch.where(flip < self.flip_p, x.flip(-1), x)
            grey = x.device.type == "cpu" and is_grey(x)
            y = adjust_contrast(adjust_brightness(x, brightness), contrast)
            if not grey:
                y = adjust_hue(adjust_saturation(y, saturation), hue)
            x = torch.where(jitter < self.jitter_p, y, x)
            if not grey:
                x = torch.where(gray < self.grayscale_p, grayscale(x).expand_as(x), x)
            if spec.blur_p > 0:  # sigma read on the CPU: its kernel size is chosen there, with no sync
                sigma = u[:, 8] * self.blur_scale[c]
                x = gaussian_blur(x, torch.where(u[:, 7] < spec.blur_p, sigma, torch.zeros_like(sigma)))
            if spec.solarize_p > 0:
                x = torch.where((solarize < spec.solarize_p) & (x >= 128 / 255), 1 - x, x)
            out.append((x - mean) / std)
        return out


def is_grey(images: torch.Tensor) -> bool:
    """Whether a (B, 3, H, W) batch's three channels are all equal."""
    return images.shape[1] == 3 and torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])


def pad_to_canvas(images: list[torch.Tensor]) -> torch.Tensor:
    """(3, H, W) images of any sizes -> one batch at the largest H and W, each image's last row and column
    repeated into its margin. roi_align clamps samples beyond an image's last pixel to that pixel; over a
    repeated margin its bilinear samples come out the same, so crops match those of the image alone."""
    height, width = max(im.shape[-2] for im in images), max(im.shape[-1] for im in images)
    canvas = images[0].new_empty(len(images), images[0].shape[0], height, width)
    for j, im in enumerate(images):
        h, w = im.shape[-2:]
        canvas[j, :, :h, :w] = im
        canvas[j, :, :h, w:] = im[:, :, w - 1:]
        canvas[j, :, h:] = canvas[j, :, h - 1:h]
    return canvas


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


# Below this sigma (pixels) a neighbour weighs under 1e-4 of the centre: the blur moves no pixel by a tenth
# of a grey level, so it is skipped. The paper's radii scaled to 20-pixel crops stay under it (<= 0.18 px).
NO_OP_SIGMA = 0.23


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (0 = unchanged), reflect padding; a batch whose
    sigmas are all under `NO_OP_SIGMA` comes back as it is. `sigma` lives on the CPU, where the draws are
    made: the kernel's radius comes from its largest value without a device sync, and it crosses to x's
    device in a non-blocking copy."""
    sigma = sigma.cpu()
    largest = float(sigma.max())
    if largest < NO_OP_SIGMA:
        return x
    B, C, H, W = x.shape
    radius = max(1, min(int(math.ceil(3 * largest)), (min(H, W) - 1)))
    sigma = sigma.to(x.device, non_blocking=True)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-6).view(-1, 1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = torch.where(sigma.view(-1, 1) > 0, k, (t == 0).to(x.dtype).expand_as(k))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, taps)
    y = torch.nn.functional.pad(x.reshape(1, B * C, H, W), (radius, radius, radius, radius), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(B * C, 1, 1, -1), groups=B * C)
    y = torch.nn.functional.conv2d(y, k.view(B * C, 1, -1, 1), groups=B * C)
    return y.view(B, C, H, W)
