"""Write a small labelled folder of 32 x 32 (or --size) colour images: 10 classes of shapes and textures, each drawn in
random colours on a random (sometimes textured) background, at a random position, scale and rotation, as PNGs
in class folders (train/ and test/). Colour tells nothing about the class; shape and texture do.

It checks that a preset is not tuned to grey 28-pixel images (issue 16):

    python bench/make_shapes.py /tmp/shapes
    dinokit demo --data /tmp/shapes/train --test /tmp/shapes/test --preset auto --time-budget 5m

`--size 96` writes them at 96 x 96 (the size they are drawn at), for `auto`'s mid-size rule; larger sizes are the
96-pixel drawings enlarged (photo-sized files with the same content), for its photo-size rule.
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from class_folders import folder_args, write_class_folders

CLASSES = ["disc", "square", "triangle", "cross", "ring", "star", "h-stripes", "v-stripes", "checks", "dots"]
CANVAS = 96  # drawn at 3x, then shrunk: smooth edges


def colour(rng: np.random.Generator, avoid: tuple | None = None) -> tuple:
    while True:
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        if avoid is None or sum(abs(a - b) for a, b in zip(c, avoid)) > 200:  # the shape stays visible
            return c


def polygon(cx: float, cy: float, radius: float, corners: list[float], angle: float) -> list[tuple]:
    return [(cx + radius * r * math.cos(angle + 2 * math.pi * i / len(corners)),
             cy + radius * r * math.sin(angle + 2 * math.pi * i / len(corners))) for i, r in enumerate(corners)]


def texture(kind: str, fg: tuple, bg: tuple, rng: np.random.Generator, size: int) -> Image.Image:
    """Stripes, checks or dots over the whole tile, at a random period and phase."""
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    period = int(rng.integers(14, 30))
    phase = int(rng.integers(0, period))
    for k in range(-1, size // period + 2):
        a = k * period + phase
        if kind == "h-stripes":
            draw.rectangle([0, a, size, a + period // 2], fill=fg)
        elif kind == "v-stripes":
            draw.rectangle([a, 0, a + period // 2, size], fill=fg)
        else:
            for m in range(-1, size // period + 2):
                b = m * period + phase
                if kind == "checks" and (k + m) % 2 == 0:
                    draw.rectangle([a, b, a + period - 1, b + period - 1], fill=fg)
                elif kind == "dots":
                    r = period // 4
                    draw.ellipse([a + period // 2 - r, b + period // 2 - r, a + period // 2 + r, b + period // 2 + r],
                                 fill=fg)
    return img


def draw_image(label: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    bg, fg = colour(rng), None
    fg = colour(rng, avoid=bg)
    if label in ("h-stripes", "v-stripes", "checks", "dots"):  # a texture patch over part of the tile
        tile = texture(label, fg, bg, rng, CANVAS * 2).rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
        img = tile.crop((CANVAS // 2, CANVAS // 2, CANVAS // 2 + CANVAS, CANVAS // 2 + CANVAS))
    else:
        img = Image.new("RGB", (CANVAS, CANVAS), bg)
        if rng.random() < 0.3:  # a faint, different texture behind some shapes: background is not a cue
            faint = texture(str(rng.choice(["h-stripes", "v-stripes", "checks", "dots"])), colour(rng, bg), bg, rng,
                            CANVAS)
            img = Image.blend(img, faint, 0.25)
        draw = ImageDraw.Draw(img)
        r = rng.uniform(0.22, 0.42) * CANVAS
        cx, cy = (rng.uniform(r, CANVAS - r) for _ in range(2))
        angle = rng.uniform(0, 2 * math.pi)
        if label == "disc":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        elif label == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=int(r * rng.uniform(0.25, 0.4)))
        elif label == "square":
            draw.polygon(polygon(cx, cy, r, [1] * 4, angle), fill=fg)
        elif label == "triangle":
            draw.polygon(polygon(cx, cy, r, [1] * 3, angle), fill=fg)
        elif label == "star":
            draw.polygon(polygon(cx, cy, r, [1, 0.45] * 5, angle), fill=fg)
        elif label == "cross":
            w = r * rng.uniform(0.25, 0.4)
            for a in (angle, angle + math.pi / 2):
                dx, dy, nx, ny = r * math.cos(a), r * math.sin(a), w * -math.sin(a), w * math.cos(a)
                draw.polygon([(cx - dx - nx, cy - dy - ny), (cx + dx - nx, cy + dy - ny), (cx + dx + nx, cy + dy + ny),
                              (cx - dx + nx, cy - dy + ny)], fill=fg)
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float64)
    pixels += rng.normal(0, 8, pixels.shape)  # sensor noise
    resample = Image.LANCZOS if size <= CANVAS else Image.BICUBIC  # larger: the drawing enlarged
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize((size, size), resample)


def main(argv=None):
    args = folder_args(__doc__.splitlines()[0], argv, size=32)
    if args.size < 8:
        raise SystemExit("--size must be at least 8")
    out = write_class_folders(args.out, CLASSES, lambda label, rng: draw_image(label, rng, args.size), args.train,
                              args.test, args.seed)
    print(f"{out}: {10 * args.train} train and {10 * args.test} test {args.size} x {args.size} colour images of "
          f"{len(CLASSES)} classes")


if __name__ == "__main__":
    main()
