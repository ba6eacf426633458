"""Small synthetic videos in the DAVIS 2017 layout, with true masks: textured objects moving over textured
backgrounds. For testing `dinokit vidseg` without the real data set.

    ROOT/JPEGImages/480p/VIDEO/00000.jpg ...     frames
    ROOT/Annotations/480p/VIDEO/00000.png ...    indexed PNGs: 0 background, 1..K objects (DAVIS palette)
    ROOT/ImageSets/2017/val.txt                  one video name a line
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .common import report


def davis_palette() -> np.ndarray:
    """The PASCAL VOC / DAVIS colour map (256 x 3 uint8): index bits spread over the high bits of R, G, B."""
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette


def save_indexed(path: Path, labels: np.ndarray):
    im = Image.fromarray(labels.astype(np.uint8))
    im.putpalette(davis_palette().ravel().tolist())
    im.save(path)


def texture(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random colour texture (h, w, 3) in [0, 1]: bicubic-upsampled noise plus fine grain."""
    coarse = torch.from_numpy(rng.random((1, 3, cells, cells), dtype=np.float32))
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    return np.clip(smooth + rng.normal(0, 0.05, (h, w, 3)), 0, 1)


def make_video(rng: np.random.Generator, frames: int, h: int, w: int, objects: int):
    """Frames (T, h, w, 3) uint8 and label maps (T, h, w) uint8. Ellipses with their own textures move at
    constant speed and bounce off the borders; later objects pass in front of earlier ones."""
    background = texture(rng, h, w, 6)
    yy, xx = np.mgrid[0:h, 0:w]
    specs = []
    for _ in range(objects):
        ry, rx = rng.uniform(0.12, 0.25) * h, rng.uniform(0.12, 0.25) * w
        pos = np.array([rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)])
        vel = rng.uniform(-1, 1, 2) * np.array([h, w]) * 0.04
        specs.append([ry, rx, pos, vel, texture(rng, h, w, 3) * 0.6 + rng.random(3) * 0.4])
    images, labels = [], []
    for _ in range(frames):
        img, lab = background.copy(), np.zeros((h, w), np.uint8)
        for k, (ry, rx, pos, vel, tex) in enumerate(specs, start=1):
            inside = ((yy - pos[0]) / ry) ** 2 + ((xx - pos[1]) / rx) ** 2 <= 1
            img[inside], lab[inside] = tex[inside], k
        images.append((img * 255).round().astype(np.uint8))
        labels.append(lab)
        for spec in specs:  # move, bouncing off the borders
            ry, rx, pos, vel = spec[:4]
            pos += vel
            for d, r, size in ((0, ry, h), (1, rx, w)):
                if not r <= pos[d] <= size - r:
                    vel[d] = -vel[d]
                    pos[d] = np.clip(pos[d], r, size - r)
    return np.stack(images), np.stack(labels)


def make_davis(root: str | Path, videos: int = 3, frames: int = 10, size: tuple[int, int] = (120, 160),
               objects: int = 2, seed: int = 0) -> list[str]:
    """Write `videos` synthetic videos under `root` in the DAVIS layout; their names."""
    root, rng = Path(root), np.random.default_rng(seed)
    names = [f"synth{i:02d}" for i in range(videos)]
    for name in names:
        images, labels = make_video(rng, frames, *size, objects)
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True, exist_ok=True)
        for t, (img, lab) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95)
            save_indexed(root / "Annotations" / "480p" / name / f"{t:05d}.png", lab)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("".join(n + "\n" for n in names))
    return names


def register(sub):
    p = sub.add_parser("davis-synth", help="write small synthetic videos with true masks in the DAVIS layout")
    p.add_argument("--out", required=True, help="root folder of the data set")
    p.add_argument("--videos", type=int, default=3)
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--size", type=int, nargs=2, default=[120, 160], metavar=("H", "W"))
    p.add_argument("--objects", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args):
    if args.videos < 1 or args.frames < 2 or args.objects < 1 or min(args.size) < 16:
        raise ValueError("need at least 1 video, 2 frames, 1 object and 16 x 16 pixels")
    names = make_davis(args.out, args.videos, args.frames, tuple(args.size), args.objects, args.seed)
    report(args, {"command": "davis-synth", "out": args.out, "videos": names},
           [f"{len(names)} videos of {args.frames} frames ({args.size[0]}x{args.size[1]}) -> {args.out}"])
    return 0
