"""Decoding image files to RGB uint8 tensors, whatever their mode; a clear reason when impossible.

Two ways: `decode_image` decodes any file with Pillow on the CPU (loader workers). With decoding on the
device, workers only read JPEG files (`read_jpeg`) and the training process decodes a batch of them in one
call (`decode_jpegs`: nvJPEG on a GPU); files not fit for that are still decoded by Pillow.

For training, `decode_for_crops` decodes a JPEG much larger than its crops need at a reduced scale (libjpeg's
DCT scaling, through Pillow's `draft`): 1/2, 1/4 or 1/8 of its size, as far as every crop keeps at least its
output resolution. nvJPEG has no such option, so `read_jpeg` leaves those files to Pillow.
"""
import io
import math
import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

MAX_SIDE = 4096  # huge images are shrunk on decode: no crop DINO takes needs more
SMALLEST_RATIO = 3 / 4  # RandomResizedCrop's aspect ratios span 3/4 to 4/3: a crop's short side is >= sqrt(3/4 area)


class BadImage(Exception):
    """The file cannot be used as an image; str(e) is the reason."""


class Shrunk(NamedTuple):
    """An image decoded at 1/`factor` of its size (`height` x `width`): crops are drawn on the full size."""
    pixels: torch.Tensor  # (3, ceil(height / factor), ceil(width / factor)) uint8
    height: int
    width: int
    factor: int


def decode_image(path, max_side: int = MAX_SIDE) -> torch.Tensor:
    """RGB uint8 tensor (3, H, W). Palette, grey, 16-bit, CMYK and alpha images are converted."""
    return _decode(path, max_side, None)


def decode_for_crops(path, crops: Sequence[tuple[int, float]], max_side: int = MAX_SIDE) -> torch.Tensor | Shrunk:
    """`decode_image` for training crops `crops` ((side, smallest area fraction) pairs): a JPEG big enough
    that every crop would shrink it at least twice comes back `Shrunk`, decoded at 1/2, 1/4 or 1/8 scale
    (a 4000 x 3000 photo at the paper's crops: 1/4, its local crops' short side 670 pixels before the
    reduction, 168 after, for 96).

    >>> decode_for_crops("photo_4000x3000.jpg", [(224, 0.4), (96, 0.05)]).factor  # doctest: +SKIP
    4
    """
    return _decode(path, max_side, crops)


def shrink_factor(height: int, width: int, crops: Sequence[tuple[int, float]]) -> int:
    """The largest JPEG scale-down (1, 2, 4 or 8) that leaves every crop at least its output side in pixels.
    A crop of area fraction s of an H x W image has a short side of at least sqrt(s H W 3/4) pixels; at
    1/factor scale it must still have `side` of them.

    >>> shrink_factor(3000, 4000, [(224, 0.4), (96, 0.05)]), shrink_factor(450, 500, [(224, 0.4), (96, 0.05)])
    (4, 1)
    """
    room = min(math.sqrt(scale * height * width * SMALLEST_RATIO) / side for side, scale in crops)
    return next((f for f in (8, 4, 2) if f <= room and min(height, width) >= f), 1)


def _decode(path, max_side: int, crops) -> torch.Tensor | Shrunk:
    factor = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # judged below; over 2x, open refuses
            with Image.open(path) as im:
                width, height = im.size
                if im.format != "JPEG" and width * height > Image.MAX_IMAGE_PIXELS:
                    raise BadImage(f"too many pixels: {width} x {height}, more than Pillow's limit of "
                                   f"{Image.MAX_IMAGE_PIXELS} for a file it must decode whole")
                if im.format == "JPEG" and crops:
                    factor = shrink_factor(height, width, crops)
                    if factor > 1 and math.ceil(max(width, height) / factor) > max_side:
                        factor = 1  # still huge at 1/8: the max_side rule below shrinks it
                if factor > 1:
                    # Pillow picks the largest scale <= its size // the size asked: ask for size // factor
                    im.draft("RGB", (width // factor, height // factor))
                elif im.format == "JPEG" and max(im.size) > max_side:
                    im.draft("RGB", (max_side, max_side))  # decode at reduced scale: fast and small
                im.load()
                rgb = to_rgb(im)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too many pixels: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt or truncated: {e}") from None
    if factor == 1 and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()
    if factor > 1:
        return Shrunk(pixels, height, width, factor)
    return pixels


def decode_bytes(data: bytes, max_side: int = MAX_SIDE) -> torch.Tensor:
    """`decode_image` for a file already in memory (an upload), with the same rules and reasons."""
    return decode_image(io.BytesIO(data), max_side)


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


def jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG's data runs to its end: an end-of-image marker after the start of its first scan.
    nvJPEG decodes a file cut short (filling in what is missing) where Pillow refuses it; with this check
    such files go to Pillow, so both decoders skip the same files for the same reason. The walk follows the
    header's segment lengths to the first scan (an EXIF thumbnail's own markers are inside a segment);
    within scan data a 0xFF byte is always followed by 0x00 or a restart marker, never by 0xD9.

    >>> scan = b"\\xff\\xd8\\xff\\xda\\x00\\x02\\x12\\x34"  # start of image, of scan, two bytes of data
    >>> jpeg_complete(scan + b"\\xff\\xd9"), jpeg_complete(scan)
    (True, False)
    """
    if data[:2] != b"\xff\xd8":
        return False
    pos, n = 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:  # start of scan
            return data.rfind(b"\xff\xd9", pos) != -1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return False


def read_jpeg(path: str, max_side: int = MAX_SIDE, crops: Sequence[tuple[int, float]] | None = None
              ) -> torch.Tensor | None:
    """The file's bytes (uint8, 1-D) when it is a JPEG a device decoder takes as it is: RGB or grey, no side
    over max_side, its data complete (`jpeg_complete`), and (with `crops`) not big enough for a reduced-scale
    decode. None for anything else (CMYK, huge, cut short, not a JPEG, unreadable): decode it with Pillow."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # the header only: cheap
                fits = im.format == "JPEG" and im.mode in ("RGB", "L") and max(im.size) <= max_side
                fits = fits and not (crops and shrink_factor(im.height, im.width, crops) > 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None
    if not (fits and jpeg_complete(data)):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class DecodeStreams:
    """Decoding on a GPU so that the decoder is never handed memory that queued work still uses.

    torchvision's batched CUDA decoder allocates its outputs from the caching allocator's pool of the
    current stream and writes them from another stream without waiting for the current one; nvJPEG's
    hardware engine moreover writes when the call is made, whatever stream work is queued or waited for
    (pytorch/vision#9606, meta-pytorch/torchcodec#1634). A block freed on the training stream while kernels
    queued there still read it can therefore be overwritten. So: decode with a dedicated side stream current,
    whose pool only ever holds decoder outputs; hand each output to the caller's stream with `wait_stream`
    (the caller's work waits for the decode) and `record_stream` (when the output is freed, its block returns
    to the side pool only after the caller's work queued by then has run: the allocator checks that from the
    host, with an event, so even a decoder that ignores streams cannot be handed it). Nothing waits on the
    host. `cuda` is `torch.cuda`, or a stand-in for tests of the ordering.
    """

    def __init__(self, cuda=torch.cuda):
        self.cuda = cuda
        self.side: dict = {}  # device -> its decode stream

    def run(self, decode: Callable[[], list], device: torch.device) -> list:
        """`decode()` (returning tensors or None) on `device`'s decode stream, its outputs handed over to the
        stream current now."""
        main = self.cuda.current_stream(device)
        side = self.side.get(device)
        if side is None:
            side = self.side[device] = self.cuda.Stream(device)
        with self.cuda.stream(side):
            images = decode()
        main.wait_stream(side)
        for im in images:
            if im is not None:
                im.record_stream(main)
        return images


DECODE_STREAMS = DecodeStreams()


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes -> RGB uint8 tensors (3, H, W) on `device`, in one batched call (nvJPEG on a GPU, through
    `DecodeStreams`). If the batch fails, each is decoded alone: None for those the decoder refuses (libjpeg
    refuses some files Pillow reads with a warning), for the caller to decode with Pillow."""
    if device.type != "cuda":  # other devices: decode on the CPU
        return [im if im is None else im.to(device) for im in _decode_jpegs(data, torch.device("cpu"))]
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return DECODE_STREAMS.run(lambda: _decode_jpegs(data, device), device)


def _decode_jpegs(data: list[torch.Tensor], where: torch.device) -> list[torch.Tensor | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates it for TorchCodec's
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=where)
        except RuntimeError:
            images = []
            for d in data:
                try:
                    images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=where))
                except RuntimeError:
                    images.append(None)
            return images
