"""Multi-crop augmentation: shapes, ranges, determinism, the crop rule and the blur."""
import pytest
import torch
from PIL import Image

from dinokit.data.loader import build_data
from dinokit.data.multicrop import MultiCrop, gaussian_blur, uniform
from dinokit.train.config import Config


def test_multicrop_shapes_ranges_and_determinism():
    mc = MultiCrop(global_size=24, local_size=10, local_crops=3, seed=5)
    images = (torch.rand(6, 3, 30, 40) * 255).to(torch.uint8)
    index = torch.arange(100, 106)
    geo = mc.geometric(images, index, epoch=2)
    assert [tuple(g.shape) for g in geo] == [(6, 3, 24, 24)] * 2 + [(6, 3, 10, 10)] * 3
    assert all(g.min() >= 0 and g.max() <= 1 for g in geo)
    out = mc.photometric(geo, index, epoch=2)
    lo = (0 - torch.tensor(mc_mean())) / torch.tensor(mc_std())
    hi = (1 - torch.tensor(mc_mean())) / torch.tensor(mc_std())
    for x in out:
        assert torch.all(x >= lo.view(1, 3, 1, 1) - 1e-5) and torch.all(x <= hi.view(1, 3, 1, 1) + 1e-5)
    # the same sample gets the same crops whatever batch it is in
    again = mc.photometric(mc.geometric(images[3:5], index[3:5], 2), index[3:5], 2)
    for a, b in zip(out, again):
        torch.testing.assert_close(a[3:5], b, rtol=0, atol=1e-6)
    # another epoch, other crops; images of mixed sizes go through the same rule
    other = mc.geometric(images, index, epoch=3)
    assert not torch.equal(other[0], geo[0])
    mixed = mc.geometric([images[0], images[1, :, :20, :30]], index[:2], 2)
    torch.testing.assert_close(mixed[0][0], geo[0][0])


def mc_mean():
    from dinokit.data.normalize import MEAN
    return MEAN


def mc_std():
    from dinokit.data.normalize import STD
    return STD


def test_counter_rng_is_uniform_and_keyed():
    u = uniform(0, 0, torch.arange(200_000), 7)
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.std().item() - (1 / 12) ** 0.5) < 0.005
    assert not torch.equal(u[:100], uniform(0, 0, torch.arange(100), 8))
    assert not torch.equal(u[:100], uniform(1, 0, torch.arange(100), 7))
    # many draw ids in one call: the same numbers as one call per id, each with its own range
    ids, low, high = torch.tensor([0, 7, 63, 10 ** 6]), torch.tensor([0, 0.5, -1, 2]), torch.tensor([1, 2, 1, 3])
    grid = uniform(3, 4, torch.arange(50), ids, low, high)
    assert grid.shape == (50, 4)
    for j in range(4):
        assert torch.equal(grid[:, j], uniform(3, 4, torch.arange(50), int(ids[j]), float(low[j]), float(high[j])))


def test_crop_boxes_take_the_first_of_ten_tries_that_fits():
    """torchvision's RandomResizedCrop rule, try by try, against the boxes drawn for all tries at once."""
    import math
    mc = MultiCrop(global_size=24, local_size=10, local_crops=1, global_scale=(0.3, 1.0), local_scale=(0.9, 1.0))
    index = torch.arange(400)
    for c, (h, w) in [(0, (30, 40)), (2, (8, 90))]:  # the thin image: tries often fail, some fall back
        boxes = mc.crop_boxes(1, index, c, h, w)
        scale, n_fallback = mc.crops[c].scale, 0
        for i in range(len(index)):
            d = lambda what, lo=0.0, hi=1.0: float(mc._draw(1, index[i:i + 1], c, what, lo, hi))
            expected = None
            for t in range(10):
                target = torch.tensor(h * w, dtype=torch.float) * d(4 * t, *scale)
                ratio = torch.exp(torch.tensor(d(4 * t + 1, math.log(3 / 4), math.log(4 / 3))))
                bw, bh = torch.round(torch.sqrt(target * ratio)), torch.round(torch.sqrt(target / ratio))
                if 0 < bw <= w and 0 < bh <= h:
                    top = math.floor(d(4 * t + 2) * float(h - bh + 1))
                    left = math.floor(d(4 * t + 3) * float(w - bw + 1))
                    expected = [left, top, left + float(bw), top + float(bh)]
                    break
            if expected is None:
                n_fallback += 1
                bw, bh = min(w, round(h * 4 / 3)), h
                expected = [(w - bw) // 2, 0, (w - bw) // 2 + bw, bh]
            assert boxes[i].tolist() == expected, (c, i)
        assert (n_fallback > 0) == (c == 2)


def test_blur_zero_sigma_is_identity_and_blur_preserves_mean():
    x = torch.rand(2, 3, 16, 16)
    y = gaussian_blur(x, torch.tensor([0.0, 1.5]))
    torch.testing.assert_close(y[0], x[0])
    assert (y[1] - x[1]).abs().max() > 0.01
    assert y[1].mean().item() == pytest.approx(x[1].mean().item(), abs=0.02)


def test_flip_probability_comes_from_the_config(tmp_path):
    plain = dict(jitter_p=0.0, grayscale_p=0.0, global_blur_p=(0.0, 0.0), solarize_p=0.0)
    crops, index = [torch.rand(6, 3, 16, 16)] * 2, torch.arange(6)
    never, always = (MultiCrop(16, 8, 0, flip_p=p, **plain).photometric(crops, index, 0) for p in (0.0, 1.0))
    torch.testing.assert_close(never[0].flip(-1), always[0])
    assert not torch.allclose(never[0], always[0])
    for i in range(4):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(tmp_path / f"{i}.png")
    assert build_data(Config(data=str(tmp_path), batch_size=2, flip_p=0.0))[2].flip_p == 0.0
    with pytest.raises(ValueError, match="flip_p"):
        Config(flip_p=1.5).validate()


def test_grey_images_are_cropped_as_one_channel_with_the_numbers_of_three():
    """On the CPU a grey batch (three equal channels) is cropped through one channel: its crops must be the
    numbers the three-channel path gives, channel for channel, for batch tensors and for size groups."""
    g = torch.Generator().manual_seed(0)
    mc = MultiCrop(global_size=20, local_size=12, local_crops=2, seed=5)
    grey = torch.randint(0, 256, (8, 1, 28, 28), generator=g, dtype=torch.uint8).expand(-1, 3, -1, -1).contiguous()
    colour = grey.clone()
    colour[:, 1:] = 255 - colour[:, 1:]  # channel 0 kept: the general path crops it exactly as before
    index = torch.arange(8) * 3
    for as_list in (False, True):
        def batch(x):
            return [x[i, :, :24 + i % 2] for i in range(8)] if as_list else x
        for crop_grey, crop_colour in zip(mc.geometric(batch(grey), index, 1), mc.geometric(batch(colour), index, 1)):
            assert crop_grey.shape == crop_colour.shape and crop_grey.is_contiguous()
            for c in range(3):
                assert torch.equal(crop_grey[:, c], crop_colour[:, 0])
