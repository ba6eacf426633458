"""Decoding image files to RGB uint8 tensors, whatever their mode; a clear reason when impossible.

Two ways: `decode_image` decodes any file with Pillow on the CPU (loader workers). With decoding on the
device, workers only read JPEG files (`read_jpeg`) and the training process decodes a batch of them in one
call (`decode_jpegs`: nvJPEG on a GPU); files not fit for that are still decoded by `decode_image`.
"""
import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

MAX_SIDE = 4096  # huge images are shrunk on decode: no crop DINO takes needs more


class BadImage(Exception):
    """The file cannot be used as an image; str(e) is the reason."""


def decode_image(path: str, max_side: int = MAX_SIDE) -> torch.Tensor:
    """RGB uint8 tensor (3, H, W). Palette, grey, 16-bit, CMYK and alpha images are converted."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format == "JPEG" and max(im.size) > max_side:
                    im.draft("RGB", (max_side, max_side))  # decode at reduced scale: fast and small
                im.load()
                rgb = to_rgb(im)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"too many pixels: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt or truncated: {e}") from None
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        im = Image.fromarray(((a - lo) / (hi - lo or 1.0) * 255.0 + 0.5).astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))  # alpha over white
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def read_jpeg(path: str, max_side: int = MAX_SIDE) -> torch.Tensor | None:
    """The file's bytes (uint8, 1-D) when it is a JPEG a device decoder takes as it is: RGB or grey, no side
    over max_side. None for anything else (CMYK, huge, not a JPEG, unreadable): `decode_image` it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # the header only: cheap
                fits = im.format == "JPEG" and im.mode in ("RGB", "L") and max(im.size) <= max_side
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if fits else None


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes -> RGB uint8 tensors (3, H, W) on `device`, in one batched call (nvJPEG on a GPU). If the
    batch fails, each is decoded alone: None for those the decoder refuses (libjpeg refuses some files
    Pillow reads with a warning), for the caller to `decode_image`."""
    where = device if device.type == "cuda" else torch.device("cpu")  # other devices: decode on the CPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates it for TorchCodec's
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=where)
        except RuntimeError:
            images = []
            for d in data:
                try:
                    images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=where))
                except RuntimeError:
                    images.append(None)
    return [im if im is None else im.to(device, non_blocking=True) for im in images]
