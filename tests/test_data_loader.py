"""The training loader (issue 15): workers that live across epochs and resumes, prefetch sized from the step,
and JPEGs decoded at a reduced scale where they are much larger than their crops need."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data.decode import Shrunk, decode_for_crops, decode_image, read_jpeg, shrink_factor
from dinokit.data.loader import (RunBatches, batch_bytes, batch_loader, crop_needs, decode_on_device,
                                 prefetch_factor, run_batches)
from dinokit.data.multicrop import MultiCrop
from dinokit.data.normalize import mean_std
from dinokit.data.sources import ArraySource, FolderSource
from dinokit.train.config import Config

CPU = torch.device("cpu")


class WorkerLoggingImages:
    """An in-memory source's images that note, in a file, which loader process (and worker id) read each batch."""

    def __init__(self, images: torch.Tensor, log: str):
        self.images, self.log = images, log

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        info = torch.utils.data.get_worker_info()
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {info.id if info else -1}\n")
        return self.images[index]


@pytest.mark.parametrize("first", [0, 4], ids=["fresh", "resumed"])
def test_workers_live_across_epochs(tmp_path, first):
    log = tmp_path / "readers.txt"
    pixels = torch.randint(0, 256, (48, 3, 20, 20), dtype=torch.uint8)
    source = ArraySource("logged", WorkerLoggingImages(pixels, str(log)), None, [])
    cfg = Config(batch_size=8, num_workers=2, global_crop_size=16, local_crop_size=8, local_crops_number=1)
    mc = MultiCrop(16, 8, 1, seed=0)
    batches = run_batches(cfg, source, mc, CPU, first=first, length=14)  # 6 batches an epoch: two boundaries
    epochs = [b.epoch for b in batches]
    assert epochs == [(first + i) // 6 for i in range(14)] and len(set(epochs)) == 3
    readers = [line.split() for line in log.read_text().splitlines()]
    assert len(readers) == 14
    assert {pid for pid, _ in readers} == {pid for pid, _ in readers[:2]}  # the two first readers read all
    assert len({pid for pid, _ in readers}) == 2 and str(os.getpid()) not in {pid for pid, _ in readers}
    assert {wid for _, wid in readers} == {"0", "1"}


def test_prefetch_is_sized_from_the_step():
    # unmeasured, or no workers: PyTorch's default
    assert prefetch_factor(4, None, 1 << 20) == 2 and prefetch_factor(0, 0.01, 1) == 2
    # enough batches in flight for 2 s of steps, spread over the workers
    assert prefetch_factor(2, 0.05, 1 << 20) == 20 and prefetch_factor(4, 0.05, 1 << 20) == 10
    assert prefetch_factor(12, 0.25, 1 << 20) == 2  # slow steps: the default covers them
    # never more than memory allows, never fewer than 2
    assert prefetch_factor(2, 0.01, 1 << 30, memory=8 << 30) == 4
    assert prefetch_factor(12, 0.01, 600 << 20) == 2
    assert prefetch_factor(2, float("nan"), 1) == 2
    # what an item holds: float32 crops from the workers, at the paper's 2 x 224 + 10 x 96 and 256 images
    # 591 MB (so 2 per worker at most, within 8 GiB, with 12 workers); JPEG bytes with decoding on the device
    paper = MultiCrop(224, 96, 10)
    assert batch_bytes(None, paper, 256, encoded=False) == 256 * 3 * 4 * (2 * 224 ** 2 + 10 * 96 ** 2)
    assert prefetch_factor(12, 0.01, batch_bytes(None, paper, 256, encoded=False)) == 2
    pixels = torch.zeros(10, 3, 28, 28, dtype=torch.uint8)
    assert batch_bytes(ArraySource("a", pixels, None, []), paper, 64, encoded=True) == 64 * 3 * 28 * 28


def smooth_photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Colour fields with no grain: detail well below the reduced scale, so only interpolation differs."""
    field = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
    return field.resize((width, height), Image.BICUBIC)


CROPS = dict(global_size=32, local_size=16, local_crops=2, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4))


def test_the_reduction_rule():
    crops = [(224, 0.4), (96, 0.05)]  # the paper's
    # a crop of area fraction s of H x W has a short side >= sqrt(s H W 3/4): the scale that keeps 96 px of it
    assert [shrink_factor(h, w, crops) for h, w in [(450, 500), (800, 800), (1500, 2000), (3000, 4000),
                                                    (6000, 8000)]] == [1, 1, 2, 4, 8]
    for h, w in [(1000, 1500), (2000, 3000), (5000, 4000), (640, 480)]:
        f = shrink_factor(h, w, crops)
        short = min(np.sqrt(s * h * w * 3 / 4) / side for side, s in crops)
        assert short >= f and (f == 8 or short < 2 * f)  # the largest of 1, 2, 4, 8 that keeps every crop's side
    assert shrink_factor(3000, 4000, [(224, 0.4)]) == 8 and shrink_factor(3000, 4000, [(1024, 0.9)]) == 2


def test_reduced_decoding_keeps_the_crops(tmp_path):
    rng = np.random.default_rng(0)
    smooth_photo(rng, 1200, 1600).save(tmp_path / "big.jpg", quality=95)
    smooth_photo(rng, 60, 70).save(tmp_path / "small.jpg", quality=95)
    mc = MultiCrop(**CROPS, seed=3)
    crops = crop_needs(mc)
    assert crops == [(32, 0.4), (32, 0.4), (16, 0.05), (16, 0.05)]
    # below the threshold: exactly today's decode; above: 1/8 scale, the full size kept for the crop boxes
    small = decode_for_crops(str(tmp_path / "small.jpg"), crops)
    assert isinstance(small, torch.Tensor) and torch.equal(small, decode_image(str(tmp_path / "small.jpg")))
    big = decode_for_crops(str(tmp_path / "big.jpg"), crops)
    assert isinstance(big, Shrunk) and (big.height, big.width, big.factor) == (1200, 1600, 8)
    assert tuple(big.pixels.shape) == (3, 150, 200)
    # a device decoder gets the small file's bytes; the big one is left to Pillow's reduced decode
    assert read_jpeg(str(tmp_path / "small.jpg"), crops=crops) is not None
    assert read_jpeg(str(tmp_path / "big.jpg"), crops=crops) is None
    assert read_jpeg(str(tmp_path / "big.jpg")) is not None

    source = FolderSource(tmp_path)
    full = [decode_image(p) for p in source.paths]
    for epoch in range(3):
        [(e, idx, reduced, _)] = list(batch_loader(RunBatches(source, mc, 2, seed=0, first=epoch, length=1), 0))
        [(_, idx_d, on_device, _)] = list(decode_on_device(
            batch_loader(RunBatches(source, mc, 2, seed=0, first=epoch, encoded=True, length=1), 0), source, mc, CPU))
        assert e == epoch and torch.equal(idx, idx_d) and all(torch.equal(a, b) for a, b in zip(reduced, on_device))
        order = idx.tolist()
        whole = mc.geometric([full[i] for i in order], idx, epoch)
        small_row = order.index(source.paths.index(str(tmp_path / "small.jpg")))
        for a, b in zip(reduced, whole):
            assert torch.equal(a[small_row], b[small_row])  # not reduced: bit for bit
            diff = (a[1 - small_row] - b[1 - small_row]).abs()
            assert diff.mean() < 0.6 / 255 and diff.max() < 4 / 255, (diff.mean(), diff.max())  # interpolation only
        # the test can fail: boxes drawn on the full size but not scaled to the reduced image cut other regions
        pixels = [big.pixels if r == 1 - small_row else full[i] for r, i in enumerate(order)]
        sizes = torch.tensor([tuple(full[i].shape[-2:]) for i in order])
        wrong = mc.geometric(pixels, idx, epoch, full_sizes=sizes)
        assert max((w[1 - small_row] - b[1 - small_row]).abs().mean() for w, b in zip(wrong, whole)) > 10 / 255


def test_on_the_cpu_workers_do_the_colour_half_too_and_give_the_same_views():
    """Training on the CPU with loader workers: the whole augmentation happens in the workers (the training
    process never waits for it), with the views it would have made itself."""
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (32, 1, 24, 24), dtype=torch.uint8, generator=g).expand(-1, 3, -1, -1)
    colour = torch.randint(0, 256, (32, 3, 24, 24), dtype=torch.uint8, generator=g)
    mc = MultiCrop(16, 8, 2, seed=1)
    for pixels in (grey, colour):  # grey crops skip the colour operations that leave grey as it is
        source = ArraySource("mem", pixels, None, [])
        made = {}
        for workers in (0, 1):
            cfg = Config(batch_size=8, num_workers=workers, global_crop_size=16, local_crop_size=8,
                         local_crops_number=2)
            made[workers] = list(run_batches(cfg, source, mc, CPU, length=5))
        for a, b in zip(made[0], made[1]):
            assert torch.equal(a.index, b.index) and a.epoch == b.epoch
            for x, y in zip(a.views, b.views):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    mean, std = mean_std(CPU)
    for v in mc.photometric(mc.geometric(grey[:4], torch.arange(4), 0), torch.arange(4), 0):
        pixels = v * std + mean  # grey in, grey out
        torch.testing.assert_close(pixels[:, 0], pixels[:, 1], rtol=0, atol=1e-6)
        torch.testing.assert_close(pixels[:, 1], pixels[:, 2], rtol=0, atol=1e-6)


def test_decoded_images_are_kept_within_the_budget(tmp_path, monkeypatch):
    for i in range(12):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    source, mc = FolderSource(tmp_path), MultiCrop(16, 8, 1, seed=0)
    plain = RunBatches(source, mc, 4, seed=0)
    plain = [plain[i][2] for i in range(9)]  # three epochs of 3 batches
    decodes = []
    real = decode_for_crops
    monkeypatch.setattr("dinokit.data.loader.decode_for_crops", lambda *a: decodes.append(a[0]) or real(*a))
    cached = RunBatches(source, mc, 4, seed=0, cache_bytes=5 * 20 * 20 * 3)  # room for 5 of 12 images
    for i, crops in enumerate(plain):  # the same crops, bit for bit
        assert all(torch.equal(x, y) for x, y in zip(cached[i][2], crops))
    assert len(cached.decoded) == 5 and cached.cache_left == 0
    assert len(decodes) == 12 + 2 * 7  # after the first epoch, only the 7 that did not fit are decoded again


def test_a_jpeg_over_pillows_pixel_limit_is_decoded_reduced_and_other_formats_are_refused(tmp_path, monkeypatch):
    """A phone's 108-megapixel JPEG decodes at a reduced scale (libjpeg's draft) in little memory; a PNG of
    that size would be decoded whole, so it stays refused. Pillow's limit lowered to keep the files small."""
    from dinokit.data.decode import BadImage
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 60 x 60 = 3,600: over the limit, under twice it
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60, 3), dtype=np.uint8))
    picture.save(tmp_path / "big.jpg", quality=90)
    picture.save(tmp_path / "big.png")
    assert decode_image(tmp_path / "big.jpg", max_side=30).shape == (3, 30, 30)  # 1/2 scale
    with pytest.raises(BadImage, match="too many pixels"):
        decode_image(tmp_path / "big.png")
