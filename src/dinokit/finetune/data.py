"""Labelled batches for fine-tuning: DeiT's augmentation (RandomResizedCrop, flip, RandAugment, then MixUp /
CutMix on whole batches) through torchvision's transforms, fed by the training loader (`data.loader`).

The training loader hands each batch's images to an augmentation's `geometric(images, index, epoch)` in its
workers and the result to `photometric(views, index, epoch)` on the device; `Augment` fills both roles for a
classifier. Every random draw is made under a seed fixed by (seed, epoch, sample) or (seed, step), as DINO's
multi-crop draws are: the same sample is augmented the same way whatever the workers, and a resumed run
repeats an uninterrupted one exactly.
"""
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
from torchvision.transforms import v2

from ..data.decode import BadImage
from ..data.multicrop import CropSpec
from ..data.normalize import normalize
from ..eval.features import eval_transform

EVAL_CROP = 224  # the evaluation protocol's crop for images larger than it


@contextmanager
def seeded(*key: int):
    """Run the block with the CPU's global generator seeded by `key` (torchvision's transforms draw from
    it), leaving the generator as it was: the model's own draws (drop path) are not disturbed."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1))
    try:
        yield
    finally:
        torch.set_rng_state(state)


def image_side(source) -> int:
    """The shorter side of the source's first readable image (in-memory sources: all of them)."""
    if hasattr(source, "images"):
        return int(min(source.images.shape[-2:]))
    for i in range(len(source)):
        try:
            return int(min(source.read(i).shape[-2:]))
        except BadImage:
            continue
    raise ValueError(f"no readable image in {source.name}")


def crop_size(side: int, native: int | None) -> int:
    """The training crops' side: the size the evaluation protocol gives images of shorter side `side` for a
    model trained at `native` pixels (`eval_transform`): 224 for large images, else the image's own side, down
    to the model's resolution where the image is larger than it. Training and test images then match.

    >>> crop_size(500, 224), crop_size(28, 20), crop_size(28, 224), crop_size(28, None)
    (224, 20, 28, 28)
    """
    if side > EVAL_CROP:
        return EVAL_CROP
    return min(side, native) if native else side


def test_transform(size: int, side: int):
    """The test images' transform at training crop size `size`: the paper's resize (256/224 of the crop)
    and centre crop for large images; small ones whole, brought down to `size` when larger."""
    return partial(eval_transform, resize=round(size * 256 / EVAL_CROP) if side > EVAL_CROP else size, crop=size)


class Augment:
    """DeiT's per-image augmentation, then the normalisation, in the two halves the training loader calls.

    >>> aug = Augment(size=16, seed=0)
    >>> views = aug.geometric(torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8), torch.arange(4), 0)
    >>> aug.photometric(views, torch.arange(4), 0)[0].shape
    torch.Size([4, 3, 16, 16])
    """

    def __init__(self, size: int, seed: int, crop_scale=(0.08, 1.0), randaug_ops: int = 2,
                 randaug_magnitude: int = 9):
        self.size, self.seed = size, seed
        self.crops = [CropSpec(size, tuple(crop_scale), 0.0, 0.0)]  # what the loader decodes large JPEGs for
        steps = [v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True), v2.RandomHorizontalFlip()]
        if randaug_ops:
            steps.append(v2.RandAugment(num_ops=randaug_ops, magnitude=randaug_magnitude))
        self.transform = v2.Compose(steps)

    def geometric(self, images, index: torch.Tensor, epoch: int, full_sizes=None, shrink=None) -> list[torch.Tensor]:
        """uint8 images (a batch tensor, or a list of (3, H, W) of any sizes) -> [uint8 (B, 3, size, size)].
        A large JPEG may come decoded at a reduced scale (`full_sizes`, `shrink`: the loader keeps every crop
        at least `size` pixels): its crop is drawn on the pixels it has, by the same rule as at full scale."""
        out, threads = [], torch.get_num_threads()
        torch.set_num_threads(1)  # ops on one small image: more threads only wait on each other (7x slower here)
        try:
            for image, i in zip(images, index.tolist()):
                with seeded(self.seed, epoch, i):
                    out.append(self.transform(image))
        finally:
            torch.set_num_threads(threads)
        return [torch.stack(out)]

    def photometric(self, views: list[torch.Tensor], index: torch.Tensor, epoch: int) -> list[torch.Tensor]:
        return [normalize(v.float().div_(255)) for v in views]


class Mixer:
    """MixUp and CutMix on a batch (one of them, chosen at random, when both are on), drawn from (seed, step);
    off, the labels as they are."""

    def __init__(self, num_classes: int, seed: int, mixup: float = 0.0, cutmix: float = 0.0):
        self.seed = seed
        kinds = [t(alpha=a, num_classes=num_classes) for t, a in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if a > 0]
        self.mix = v2.RandomChoice(kinds) if len(kinds) == 2 else (kinds[0] if kinds else None)

    def __bool__(self):
        return self.mix is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets): class ids when off, else mixed class probabilities."""
        if self.mix is None:
            return images, labels
        with seeded(self.seed, 1 << 20, step):  # a stream of its own, apart from the samples' (seed, epoch, i)
            return self.mix(images, labels)
