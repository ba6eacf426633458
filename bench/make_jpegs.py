"""Write N JPEG files of random content and varied sizes (sides 400-500 px, like a photo folder after the usual
shrink), to measure the data pipeline of issue 6 without a real data set:

    python bench/make_jpegs.py /tmp/jpegs 2048
    dinokit bench --preset paper --data /tmp/jpegs --set local_crops_number=10 --set batch_size=256 ...

The content is smooth colour fields at a few scales plus fine grain, so files have a photo's size and decode
cost (about 60 KB at quality 90); pure noise would compress far worse than photos do.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def random_photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    out = np.zeros((height, width, 3))
    for cells, weight in ((3, 0.5), (12, 0.3), (48, 0.2)):  # coarse to fine colour fields
        field = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        out += weight * np.asarray(field.resize((width, height), Image.BICUBIC), dtype=np.float64)
    out += rng.normal(0, 6, out.shape)  # grain
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write into (created)")
    p.add_argument("n", type=int, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        rng = np.random.default_rng([args.seed, i])  # image i is the same whatever n is
        height, width = (int(v) for v in rng.integers(400, 501, 2))
        random_photo(rng, height, width).save(args.out / f"{i:06d}.jpg", quality=args.quality)
    print(f"wrote {args.n} JPEGs to {args.out}")


if __name__ == "__main__":
    main()
