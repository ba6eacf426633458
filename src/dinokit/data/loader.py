"""Training batches: a seeded order per epoch, decoding with skips, geometric crops in loader workers, or
(decoding on the device) JPEGs only read in the workers, then decoded and cropped in one go on the GPU.

The data order is a pure function of (seed, epoch): batch b of an epoch is the same whatever the process
count (each process takes its slice of the global batch), so a run resumes at any step by starting the
epoch's order at that batch.
"""
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .decode import BadImage, decode_image, decode_jpegs
from .multicrop import MultiCrop
from .sources import ArraySource


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class EpochBatches(Dataset):
    """Item b: (sample indices, geometric crops, skipped (path, reason) pairs) of this process's share of
    global batch b. With `encoded`, the images instead of their crops: JPEG bytes where a device decoder can
    take them, else decoded images (for `on_device`)."""

    def __init__(self, source, multicrop: MultiCrop, batch_size: int, epoch: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_batch: int = 0, encoded: bool = False):
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by {world_size} processes")
        self.source, self.multicrop, self.epoch = source, multicrop, epoch
        self.order = epoch_order(len(source), seed, epoch)
        self.global_batch, self.local_batch = batch_size, batch_size // world_size
        self.rank, self.start_batch, self.encoded = rank, start_batch, encoded

    def __len__(self):
        return len(self.order) // self.global_batch - self.start_batch  # the incomplete last batch is dropped

    def __getitem__(self, b):
        start = (self.start_batch + b) * self.global_batch + self.rank * self.local_batch
        index = torch.from_numpy(self.order[start:start + self.local_batch].copy())
        skipped = []
        if isinstance(self.source, ArraySource):
            images = self.source.images[index]
        else:
            images, kept = [], []
            read = self.source.read_encoded if self.encoded else self.source.read
            for i in index.tolist():
                try:
                    images.append(read(i))
                    kept.append(i)
                except BadImage as e:
                    skipped.append((self.source.paths[i], str(e)))
            index = torch.tensor(kept, dtype=torch.long)
            if not kept:
                return index, None, skipped
        if self.encoded:
            return index, images, skipped
        return index, self.multicrop.geometric(images, index, self.epoch), skipped


def epoch_loader(dataset: EpochBatches, num_workers: int, pin_memory: bool = False) -> DataLoader:
    # Its own generator: a DataLoader otherwise draws a seed from the global RNG each time it is iterated,
    # which would shift the student's drop-path draws after a resume.
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=2 if num_workers else None,
                      generator=torch.Generator().manual_seed(dataset.epoch))


def on_device(batches, source, multicrop: MultiCrop, epoch: int, device: torch.device):
    """Items of EpochBatches(encoded=True) -> the items of the workers' way, (index, geometric crops,
    skipped), with the batch's JPEGs decoded in one call and cropped on `device`. A JPEG the device decoder
    refuses is decoded by Pillow, or skipped for Pillow's reason: the same files are skipped either way."""
    for index, images, skipped in batches:
        if isinstance(images, torch.Tensor):  # an in-memory source: a uint8 batch already
            images = images.to(device, non_blocking=True)
        elif images is not None:
            jpegs = [j for j, im in enumerate(images) if im.ndim == 1]
            decoded = dict(zip(jpegs, decode_jpegs([images[j] for j in jpegs], device) if jpegs else []))
            kept, out = [], []
            for j, i in enumerate(index.tolist()):
                im = decoded.get(j, images[j])
                if im is None:
                    try:
                        im = decode_image(source.paths[i])
                    except BadImage as e:
                        skipped.append((source.paths[i], str(e)))
                        continue
                kept.append(j)
                out.append(im.to(device, non_blocking=True))
            index, images = index[kept], out or None
        yield index, None if images is None else multicrop.geometric(images, index, epoch), skipped


def any_readable(source) -> bool:
    """Whether at least one image of the source decodes; stops at the first that does."""
    for i in range(len(source)):
        try:
            source.read(i)
            return True
        except BadImage:
            pass
    return False


def iters_per_epoch(n_images: int, batch_size: int) -> int:
    if n_images < batch_size:
        raise ValueError(f"the data has {n_images} images, fewer than one batch of {batch_size}")
    return n_images // batch_size
