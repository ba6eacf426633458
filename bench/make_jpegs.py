"""Write N JPEG files of random content and varied sizes (sides 400-500 px by default, like a photo folder after
the usual shrink), to measure the data pipeline without a real data set:

    python bench/make_jpegs.py /tmp/jpegs 2048 [--workers 16]
    dinokit bench --preset paper --data /tmp/jpegs --set local_crops_number=10 --set batch_size=256 ...

The content is smooth colour fields at a few scales plus fine grain, so files have a photo's size and decode
cost (about 60 KB at quality 90); pure noise would compress far worse than photos do. Image i is the same
whatever N and the number of processes.
"""
import argparse
from concurrent.futures import ProcessPoolExecutor
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


def write_range(out: Path, start: int, stop: int, seed: int, quality: int, sides: tuple[int, int]) -> int:
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])  # image i is the same whatever n is
        height, width = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        random_photo(rng, height, width).save(out / f"{i:06d}.jpg", quality=quality)
    return stop - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write into (created)")
    p.add_argument("n", type=int, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--sides", type=int, nargs=2, default=(400, 500), metavar=("MIN", "MAX"),
                   help="each side drawn in this range of pixels")
    p.add_argument("--workers", type=int, default=1, help="processes writing in parallel")
    args = p.parse_args(argv)
    if args.n < 0 or args.workers < 1 or not 1 <= args.sides[0] <= args.sides[1]:
        p.error("n >= 0, --workers >= 1 and 1 <= MIN <= MAX, please")
    args.out.mkdir(parents=True, exist_ok=True)
    chunks = [(s, min(args.n, s + 64)) for s in range(0, args.n, 64)]
    if args.workers == 1 or len(chunks) <= 1:
        for start, stop in chunks:
            write_range(args.out, start, stop, args.seed, args.quality, tuple(args.sides))
    else:
        with ProcessPoolExecutor(args.workers) as pool:
            list(pool.map(write_range, *zip(*[(args.out, a, b, args.seed, args.quality, tuple(args.sides))
                                               for a, b in chunks])))
    print(f"wrote {args.n} JPEGs to {args.out}")


if __name__ == "__main__":
    main()
