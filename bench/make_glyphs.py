"""Write a small labelled image folder from a source other than Fashion-MNIST: the digits 0-9 rendered in
the fonts matplotlib ships (DejaVu, STIX, Computer Modern), each at a random size, slant, rotation, stroke
weight and position, as 28 x 28 grey PNGs in class folders (train/ and test/).

It checks that a preset made for Fashion-MNIST is not tuned to it (issue 7):

    python bench/make_glyphs.py /tmp/glyphs
    dinokit demo --data /tmp/glyphs/train --test /tmp/glyphs/test --out /tmp/glyphs-demo
"""
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from class_folders import folder_args, write_class_folders

FONTS = ["DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSansMono",
         "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique", "DejaVuSerif",
         "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic", "STIXGeneral", "STIXGeneralBol",
         "STIXGeneralItalic", "STIXGeneralBolIta", "cmr10", "cmss10", "cmtt10", "cmb10", "cmti10"]


def render(digit: str, font_path: Path, rng: np.random.Generator) -> Image.Image:
    canvas = 56  # drawn at twice the size, then shrunk: smooth edges
    font = ImageFont.truetype(str(font_path), int(rng.integers(26, 44)))
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), digit, font=font)
    x = (canvas - (right - left)) / 2 - left + rng.uniform(-6, 6)
    y = (canvas - (bottom - top)) / 2 - top + rng.uniform(-6, 6)
    draw.text((x, y), digit, fill=int(rng.integers(160, 256)), font=font,
              stroke_width=int(rng.integers(0, 3)), stroke_fill=int(rng.integers(160, 256)))
    img = img.rotate(rng.uniform(-25, 25), resample=Image.BILINEAR)
    shear = rng.uniform(-0.3, 0.3)
    img = img.transform(img.size, Image.AFFINE, (1, shear, -shear * canvas / 2, 0, 1, 0), resample=Image.BILINEAR)
    return img.filter(ImageFilter.GaussianBlur(0.5)).resize((28, 28), Image.LANCZOS)


def main(argv=None):
    args = folder_args(__doc__.splitlines()[0], argv)
    fonts_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = [fonts_dir / f"{name}.ttf" for name in FONTS if (fonts_dir / f"{name}.ttf").exists()]
    out = write_class_folders(args.out, list("0123456789"), lambda digit, rng: render(digit, fonts[rng.integers(
        len(fonts))], rng), args.train, args.test, args.seed)
    print(f"{out}: {10 * args.train} train and {10 * args.test} test images of 10 classes, {len(fonts)} fonts")


if __name__ == "__main__":
    main()
