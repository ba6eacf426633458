"""Training batches: a seeded order per epoch, decoding with skips, geometric crops in loader workers (or, with
decoding on the device, JPEGs only read in the workers, then decoded and cropped in one go on the GPU), and the
photometric half on the device. One loader serves the whole run, so its workers live from the first step to
the last, across epochs and from a resumed step alike.

The data order is a pure function of (seed, epoch): batch b of an epoch is the same whatever the process
count (each process takes its slice of the global batch), so a run resumes at any step by starting at that
step's batch.
"""
import math
import os
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .decode import BadImage, Shrunk, decode_for_crops, decode_jpegs, read_jpeg
from .multicrop import MultiCrop
from .sources import ArraySource, FolderSource, open_source

RUN_LENGTH = 1 << 40  # the loader's nominal length: the training loop decides where the run ends
# Decoded images kept in memory by each training process (shared out among its loader processes): a folder
# of small images is then decoded once, not once per epoch (28 x 28 PNGs: 60,000 fill 141 MB; decoding was a
# third of the data's time; BENCHMARKS.md).
DECODED_CACHE_BYTES = 1 << 30


class Batch(NamedTuple):
    epoch: int
    index: torch.Tensor  # the samples' indices in the source
    views: list[torch.Tensor] | None  # augmented views on the device, the global ones first; None: none readable
    skipped: list[tuple[str, str]]  # (path, reason) of the files of this batch that could not be used


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    if n_images < batch_size:
        raise ValueError(f"the data has {n_images} images, fewer than one batch of {batch_size}")
    return n_images // batch_size  # the incomplete last batch of an epoch is dropped


class RunBatches(Dataset):
    """Item i: (epoch, sample indices, geometric crops, skipped (path, reason) pairs) of this process's share
    of global batch `first + i` of the run, counted over epochs. With `encoded`, the images instead of their
    crops: JPEG bytes where a device decoder can take them, else decoded images (for `decode_on_device`).
    JPEGs much larger than the crops need are decoded at a reduced scale (`decode_for_crops`)."""

    def __init__(self, source, multicrop: MultiCrop, batch_size: int, seed: int, first: int = 0,
                 rank: int = 0, world_size: int = 1, encoded: bool = False, length: int = RUN_LENGTH,
                 colour: bool = False, cache_bytes: int = 0):
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by {world_size} processes")
        self.source, self.multicrop, self.seed, self.first, self.length = source, multicrop, seed, first, length
        self.global_batch, self.local_batch = batch_size, batch_size // world_size
        self.per_epoch = steps_per_epoch(len(source), batch_size)
        self.rank, self.encoded, self.colour = rank, encoded, colour  # colour: the photometric half here too
        self.crops = crop_needs(multicrop)
        self.order = (None, None)  # (epoch, its order): one epoch's order kept at a time
        self.decoded, self.cache_left = {}, cache_bytes  # index -> decoded image, while they fit

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        epoch, b = divmod(self.first + i, self.per_epoch)
        if self.order[0] != epoch:
            self.order = (epoch, epoch_order(len(self.source), self.seed, epoch))
        start = b * self.global_batch + self.rank * self.local_batch
        index = torch.from_numpy(self.order[1][start:start + self.local_batch].copy())
        skipped = []
        if isinstance(self.source, ArraySource):
            images = self.source.images[index]
        else:
            images, kept = [], []
            read = self.read if isinstance(self.source, FolderSource) else \
                self.source.read_encoded if self.encoded else self.source.read
            for i in index.tolist():
                try:
                    images.append(read(i))
                    kept.append(i)
                except BadImage as e:
                    skipped.append((self.source.paths[i], str(e)))
            index = torch.tensor(kept, dtype=torch.long)
            if not kept:
                return epoch, index, None, skipped
        if self.encoded:
            return epoch, index, images, skipped
        if isinstance(images, torch.Tensor):
            crops = self.multicrop.geometric(images, index, epoch)
        else:
            pixels, full_size = crop_inputs(images)
            crops = self.multicrop.geometric(pixels, index, epoch, **full_size)
        return epoch, index, self.multicrop.photometric(crops, index, epoch) if self.colour else crops, skipped

    def read(self, i: int) -> torch.Tensor | Shrunk:
        """A folder's file i for its crops: JPEG bytes for a device decoder (encoded), else decoded, at a
        reduced scale where the crops allow it."""
        path = self.source.paths[i]
        if self.encoded and path.lower().endswith((".jpg", ".jpeg")):
            data = read_jpeg(path, crops=self.crops)
            if data is not None:
                return data
        if i in self.decoded:
            return self.decoded[i]
        image = decode_for_crops(path, self.crops)
        size = (image.pixels if isinstance(image, Shrunk) else image).nbytes
        # Kept only where it never leaves this process (crops do): an image sent to another process would
        # have its memory moved to a shared segment, one per kept image. Nothing writes into a decoded image.
        if not self.encoded and size <= self.cache_left:
            self.decoded[i], self.cache_left = image, self.cache_left - size
        return image


def crop_needs(multicrop: MultiCrop) -> list[tuple[int, float]]:
    """(output side, smallest area fraction) of each crop: the resolution its image must keep."""
    return [(spec.size, float(spec.scale[0])) for spec in multicrop.crops]


def crop_inputs(images: list) -> tuple[list[torch.Tensor], dict]:
    """Decoded images, some of them `Shrunk` -> their pixels, and (when any is shrunk) the `full_sizes` and
    `shrink` that `MultiCrop.geometric` draws and scales their crop boxes with. With none shrunk, geometric
    gets exactly what it always did."""
    if not any(isinstance(im, Shrunk) for im in images):
        return images, {}
    full = [(im.height, im.width) if isinstance(im, Shrunk) else tuple(im.shape[-2:]) for im in images]
    shrink = [float(im.factor) if isinstance(im, Shrunk) else 1.0 for im in images]
    pixels = [im.pixels if isinstance(im, Shrunk) else im for im in images]
    return pixels, {"full_sizes": torch.tensor(full), "shrink": torch.tensor(shrink)}


def batch_loader(batches: RunBatches, num_workers: int, pin_memory: bool = False, prefetch: int = 2) -> DataLoader:
    # Its own generator: a DataLoader otherwise draws a seed from the global RNG each time it is iterated,
    # which would shift the student's drop-path draws after a resume.
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch if num_workers else None,
                      generator=torch.Generator().manual_seed(batches.seed))


def decode_on_device(items, source, multicrop: MultiCrop, device: torch.device):
    """Items of RunBatches(encoded=True) -> the items of the workers' way, (epoch, index, geometric crops,
    skipped), with the batch's JPEGs decoded in one call and cropped on `device`. A JPEG the device decoder
    refuses is decoded by Pillow, or skipped for Pillow's reason: the same files are skipped either way."""
    crops = crop_needs(multicrop)
    for epoch, index, images, skipped in items:
        full_size = {}
        if isinstance(images, torch.Tensor):  # an in-memory source: a uint8 batch already
            images = images.to(device, non_blocking=True)
        elif images is not None:
            jpegs = [j for j, im in enumerate(images) if isinstance(im, torch.Tensor) and im.ndim == 1]
            decoded = dict(zip(jpegs, decode_jpegs([images[j] for j in jpegs], device) if jpegs else []))
            kept, out = [], []
            for j, i in enumerate(index.tolist()):
                im = decoded.get(j, images[j])
                if im is None:
                    try:
                        im = decode_for_crops(source.paths[i], crops)
                    except BadImage as e:
                        skipped.append((source.paths[i], str(e)))
                        continue
                kept.append(j)
                out.append(im)
            index, images = index[kept], None
            if out:
                pixels, full_size = crop_inputs(out)
                images = [im.to(device, non_blocking=True) for im in pixels]
        yield epoch, index, None if images is None else multicrop.geometric(images, index, epoch, **full_size), \
            skipped


PREFETCH_COVER_S = 2.0  # seconds of steps that the batches in flight cover: a worker's hiccup goes unseen
PREFETCH_MEMORY = 8 << 30  # bytes that the batches in flight may hold (beyond the 2 per worker always kept)


def prefetch_factor(num_workers: int, sec_per_step: float | None, batch_bytes: int,
                    cover_s: float = PREFETCH_COVER_S, memory: int = PREFETCH_MEMORY) -> int:
    """Batches each loader worker keeps in flight (DataLoader's `prefetch_factor`), sized from the measured
    step: enough for `cover_s` seconds of steps over all workers, within `memory`, and never under 2 (with one,
    a worker that is done waits until its batch is taken, in order, before it starts the next). Unmeasured
    (`sec_per_step` None): 2, PyTorch's default.

    >>> prefetch_factor(12, 0.25, 15 << 20), prefetch_factor(2, 0.05, 1 << 20), prefetch_factor(12, None, 1)
    (2, 20, 2)
    """
    if num_workers == 0 or not sec_per_step or not math.isfinite(sec_per_step):
        return 2
    wanted = math.ceil(cover_s / sec_per_step / num_workers)
    fits = memory // max(1, batch_bytes * num_workers)
    return int(max(2, min(wanted, fits)))


def batch_bytes(source, multicrop: MultiCrop, local_batch: int, encoded: bool) -> int:
    """About how many bytes one loader item holds: float32 crops from the workers' way, file bytes (a sample
    of the files' sizes) or pixels with decoding on the device."""
    if not encoded:
        return local_batch * 3 * 4 * sum(spec.size ** 2 for spec in multicrop.crops)
    if isinstance(source, ArraySource):
        return local_batch * source.images[0].numel()
    paths = source.paths[::max(1, len(source.paths) // 32)]
    return local_batch * sum(os.path.getsize(p) for p in paths if os.path.exists(p)) // max(1, len(paths))


def build_data(cfg):
    """The image source of a training `Config`, its steps per epoch at the global batch, and its multi-crop."""
    source = open_source(cfg.data)
    multicrop = MultiCrop(cfg.global_crop_size, cfg.local_crop_size, cfg.local_crops_number,
                          cfg.global_crops_scale, cfg.local_crops_scale, seed=cfg.seed, flip_p=cfg.flip_p)
    return source, steps_per_epoch(len(source), cfg.batch_size), multicrop


def run_batches(cfg, source, multicrop: MultiCrop, device: torch.device, first: int = 0, rank: int = 0,
                world: int = 1, decode: str = "workers", length: int = RUN_LENGTH, prefetch: int | None = None,
                sec_per_step: float | None = None) -> Iterator[Batch]:
    """The run's batches from global batch `first` on, as `Batch`es with their views augmented on `device`:
    decoded and cropped in the loader workers (`decode` workers), or (`decode` device) only read there, then
    decoded and cropped here on `device`; the colour half here, in whole batches, on a GPU, and in the workers
    too when training runs on the CPU with workers (so that the training process never waits for it). The
    workers keep `prefetch` batches each in flight; by default as many as `prefetch_factor` sizes from
    `sec_per_step`."""
    encoded = decode == "device"
    colour_in_workers = device.type == "cpu" and cfg.num_workers > 0 and not encoded
    batches = RunBatches(source, multicrop, cfg.batch_size, cfg.seed, first, rank, world, encoded, length,
                         colour=colour_in_workers, cache_bytes=DECODED_CACHE_BYTES // max(1, cfg.num_workers))
    if prefetch is None:
        prefetch = prefetch_factor(cfg.num_workers, sec_per_step,
                                   batch_bytes(source, multicrop, batches.local_batch, encoded))
    items = batch_loader(batches, cfg.num_workers, pin_memory=device.type == "cuda", prefetch=prefetch)
    if encoded:
        items = decode_on_device(items, source, multicrop, device)
    for epoch, index, crops, skipped in items:
        if crops is not None and not colour_in_workers:
            crops = multicrop.photometric([c.to(device, non_blocking=True) for c in crops], index, epoch)
        yield Batch(epoch, index, crops, skipped)


def any_readable(source) -> bool:
    """Whether at least one image of the source decodes; stops at the first that does."""
    for i in range(len(source)):
        try:
            source.read(i)
            return True
        except BadImage:
            pass
    return False
