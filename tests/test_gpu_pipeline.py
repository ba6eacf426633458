"""The GPU data path (issue 6), checked on the CPU: JPEGs decoded in one batched call in the training process,
crops of mixed-size images on one canvas, and augmentations that never wait for the device."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from dinokit.data import loader
from dinokit.data.decode import decode_jpegs, read_jpeg
from dinokit.data.loader import RunBatches, batch_loader, decode_on_device
from dinokit.data.multicrop import NO_OP_SIGMA, MultiCrop, gaussian_blur, pad_to_canvas
from dinokit.data.sources import FolderSource
from dinokit.models.weights import safe_load
from dinokit.train.config import Config, resolve_decode
from dinokit.train.loop import train

CPU = torch.device("cpu")


def photo(rng: np.random.Generator, height: int, width: int, mode: str = "RGB") -> Image.Image:
    """Smooth random colour with some grain: compresses and decodes like a photo, unlike pure noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.float64) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)


def jpeg_folder(root, n_good: int, seed: int = 0):
    """n_good RGB JPEGs of different sizes, and the odd files a real folder has. Returns the odd ones by role."""
    rng = np.random.default_rng(seed)
    for i in range(n_good):
        photo(rng, *(int(v) for v in rng.integers(40, 90, 2))).save(root / f"{i:03d}.jpg", quality=90)
    photo(rng, 50, 70, "L").save(root / "grey.jpg")
    photo(rng, 60, 45, "CMYK").save(root / "cmyk.jpg")  # Pillow decodes it in the workers: nvJPEG cannot
    photo(rng, 48, 64).save(root / "lossless.png")
    good = (root / "000.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[:len(good) // 2])  # Pillow refuses it (nvJPEG would fill it in)
    (root / "text.jpg").write_text("not an image")
    # the second half of the scan data scrambled (no 0xff byte, so no marker): torchvision's libjpeg refuses
    # it, Pillow reads it with a warning
    noise = rng.integers(0, 255, len(good) - len(good) // 2, dtype=np.uint8).tobytes()
    (root / "scrambled.jpg").write_bytes(good[:len(good) // 2] + noise)
    return {"truncated": root / "truncated.jpg", "text": root / "text.jpg", "scrambled": root / "scrambled.jpg"}


def test_canvas_crops_equal_size_grouped_crops():
    """One roi_align per crop over a replicate-padded canvas gives the crops of cropping each size alone."""
    g = torch.Generator().manual_seed(0)
    sizes = [(40, 50), (33, 21), (40, 50), (64, 64), (5, 90), (90, 7), (17, 30), (61, 62)]  # elongated: fallback
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    index = torch.arange(len(images)) * 13 + 5
    mc = MultiCrop(global_size=32, local_size=12, local_crops=3, seed=4)
    for epoch in range(3):
        grouped = mc.geometric(images, index, epoch, canvas=False)
        canvas = mc.geometric(images, index, epoch, canvas=True)
        for a, b in zip(grouped, canvas):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    # the canvas is each image with its last row and column repeated, as F.pad(mode="replicate") makes it
    batch = pad_to_canvas(images)
    assert batch.shape == (len(images), 3, 90, 90)
    for im, padded in zip(images, batch):
        h, w = im.shape[-2:]
        expected = F.pad(im[None].float(), (0, 90 - w, 0, 90 - h), mode="replicate")[0]
        assert torch.equal(padded.float(), expected)


def test_device_decode_matches_workers_and_skips_the_same_files(tmp_path, monkeypatch):
    odd = jpeg_folder(tmp_path, 9)
    source = FolderSource(tmp_path)
    paths = source.paths
    # the workers read (not decode) the JPEGs a device decoder takes whole; the rest they decode as before,
    # the scrambled file too: cut short (no end-of-image marker), it is Pillow's to accept or refuse
    kinds = {p.rsplit("/", 1)[-1]: source.read_encoded(i).ndim for i, p in enumerate(paths)
             if not p.endswith(("truncated.jpg", "text.jpg"))}
    assert kinds.pop("cmyk.jpg") == 3 and kinds.pop("lossless.png") == 3 and kinds.pop("scrambled.jpg") == 3
    assert set(kinds.values()) == {1}
    assert read_jpeg(str(odd["truncated"])) is None and read_jpeg(str(tmp_path / "000.jpg")) is not None
    # libjpeg refuses the scrambled bytes, alone or in a batch; the caller is left to decode them with Pillow
    scrambled = torch.frombuffer(bytearray(odd["scrambled"].read_bytes()), dtype=torch.uint8)
    good = source.read_encoded(paths.index(str(tmp_path / "000.jpg")))
    assert decode_jpegs([scrambled], CPU) == [None]
    out = decode_jpegs([good, scrambled, good], CPU)
    assert out[1] is None and torch.equal(out[0], source.read(paths.index(str(tmp_path / "000.jpg"))))

    mc = MultiCrop(global_size=32, local_size=16, local_crops=2, seed=1)
    n = len(source)  # one batch of every file
    workers = list(batch_loader(RunBatches(source, mc, n, seed=0, length=1), 0))

    def on_device():
        return list(decode_on_device(batch_loader(RunBatches(source, mc, n, seed=0, encoded=True, length=1), 0),
                                     source, mc, CPU))

    # the device decoder refusing a JPEG sends it to Pillow: the same batch either way
    first = str(tmp_path / "001.jpg")
    refused = []

    def refusing(data, device):
        out = decode_jpegs(data, device)
        refused.extend(j for j, d in enumerate(data) if torch.equal(d, read_jpeg(first)))
        return [None if j in refused else im for j, im in enumerate(out)]

    for decoder in (decode_jpegs, refusing):
        monkeypatch.setattr(loader, "decode_jpegs", decoder)
        device = on_device()
        assert len(workers) == len(device) == 1
        (_, index_w, crops_w, skipped_w), (_, index_d, crops_d, skipped_d) = workers[0], device[0]
        assert torch.equal(index_w, index_d) and len(index_d) == n - 2
        assert sorted(map(tuple, skipped_w)) == sorted(map(tuple, skipped_d))
        assert sorted(p for p, _ in skipped_d) == sorted(str(odd[k]) for k in ("truncated", "text"))
        diff = torch.cat([(a - b).abs().flatten() for a, b in zip(crops_w, crops_d)])
        # libjpeg-turbo in torchvision and in Pillow: identical pixels here; other builds may round differently
        assert diff.mean() < 0.5 / 255 and diff.max() <= 4 / 255, (diff.mean(), diff.max())
    assert len(refused) == 1  # the refusal did happen


def test_a_lenient_device_decoder_skips_what_pillow_skips(tmp_path, monkeypatch):
    """nvJPEG decodes a JPEG cut short (filling in the rest) where Pillow refuses it. A stand-in decoder that
    accepts anything shows the rule holds by construction: files cut short never reach the device decoder."""
    odd = jpeg_folder(tmp_path, 6)
    (tmp_path / "no_end.jpg").write_bytes((tmp_path / "000.jpg").read_bytes()[:-2])  # only the EOI marker cut
    source = FolderSource(tmp_path)
    mc = MultiCrop(global_size=32, local_size=16, local_crops=2, seed=1)
    seen = []

    def lenient(data, device):
        seen.extend(data)
        return [torch.full((3, 40, 50), 128, dtype=torch.uint8, device=device) for _ in data]

    monkeypatch.setattr(loader, "decode_jpegs", lenient)
    n = len(source)
    [(_, _, _, skipped_w)] = list(batch_loader(RunBatches(source, mc, n, seed=0, length=1), 0))
    [(_, _, _, skipped_d)] = list(decode_on_device(
        batch_loader(RunBatches(source, mc, n, seed=0, encoded=True, length=1), 0), source, mc, CPU))
    assert sorted(map(tuple, skipped_d)) == sorted(map(tuple, skipped_w))
    assert sorted(p for p, _ in skipped_d) == sorted([str(odd["truncated"]), str(odd["text"]),
                                                      str(tmp_path / "no_end.jpg")])
    assert all("truncated" in reason for p, reason in skipped_d if not p.endswith("text.jpg"))
    assert len(seen) == 6 + 1  # the six photos and the grey one: complete JPEGs only


def reference_blur(x: torch.Tensor, sigma: list[float]) -> torch.Tensor:
    """Each sample convolved with its own 2-D Gaussian (the outer product of the 1-D one), reflect padding,
    over the taps the batch's largest sigma asks for."""
    radius = math.ceil(3 * max(sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    out = []
    for image, s in zip(x.double(), sigma):
        k = torch.exp(-0.5 * (t / s) ** 2) if s > 0 else (t == 0).double()
        k2 = torch.outer(k, k) / k.sum() ** 2
        padded = F.pad(image[None], (radius,) * 4, mode="reflect")
        out.append(F.conv2d(padded, k2.expand(3, 1, -1, -1), groups=3)[0])
    return torch.stack(out).float()


def test_blur_too_small_to_move_a_grey_level_is_skipped():
    x = torch.randint(0, 256, (3, 3, 12, 12)).float() / 255  # as crops are: whole grey levels
    sigma = [0.0, NO_OP_SIGMA * 0.99, 0.1]
    assert gaussian_blur(x, torch.tensor(sigma)) is x
    assert (reference_blur(x, sigma) - x).abs().max() < 0.1 / 255  # what skipping it loses
    assert (gaussian_blur(x, torch.tensor(sigma) * 1.02) - x).abs().max() > 0  # at the threshold and over it


def test_blur_is_the_gaussian_and_augmentation_never_reads_device_values():
    x = torch.rand(4, 3, 24, 20)
    sigma = [0.0, 0.3, 1.1, 2.6]
    torch.testing.assert_close(gaussian_blur(x, torch.tensor(sigma)), reference_blur(x, sigma), rtol=0, atol=1e-6)
    # On the "meta" device tensors have shapes but no values: reading one (a GPU sync: .item(), bool(),
    # float() of a device tensor) raises. Cropping mixed sizes and every augmentation go through untouched.
    mc = MultiCrop(global_size=24, local_size=10, local_crops=3, seed=2)
    images = [torch.empty(3, h, w, dtype=torch.uint8, device="meta") for h, w in [(30, 40), (33, 21), (50, 50)]]
    index = torch.tensor([7, 8, 9])
    crops = mc.geometric(images, index, 0)
    assert all(c.device.type == "meta" for c in crops)
    out = mc.photometric(crops, index, 0)
    assert [tuple(o.shape) for o in out] == [(3, 3, 24, 24)] * 2 + [(3, 3, 10, 10)] * 3
    with pytest.raises(RuntimeError, match="meta"):  # the check can fail: a device read does raise
        bool((out[0] > 0).any())


def test_decode_setting_is_checked_and_auto_means_device_on_gpus():
    with pytest.raises(ValueError, match="decode must be auto, workers or device"):
        Config(decode="gpu").validate()
    assert [resolve_decode("auto", d) for d in ("cuda", "cpu", "mps")] == ["device", "workers", "workers"]
    assert resolve_decode("device", "cpu") == "device" and resolve_decode("workers", "cuda") == "workers"


TINY = dict(arch="vit", patch_size=4, embed_dim=32, depth=2, num_heads=2, out_dim=64, head_hidden_dim=48,
            bottleneck_dim=16, global_crop_size=16, local_crop_size=8, local_crops_number=2, batch_size=8,
            epochs=1, warmup_epochs=1, precision="fp32", log_every=1, save_every_steps=2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_training_with_device_decode_runs_and_reports_skips(tmp_path, device):
    folder = tmp_path / "images"
    folder.mkdir()
    odd = jpeg_folder(folder, 14)
    runs = {}
    for decode in ("device", "workers"):
        cfg = Config(**TINY, decode=decode, data=str(folder), device=device).validate()
        summary = train(cfg, tmp_path / decode, max_steps=2, progress=False)
        assert summary["step"] == 2 and summary["skipped"] == 2
        runs[decode] = safe_load(tmp_path / decode / "checkpoint.pt")["teacher"]
        resolved = yaml.safe_load((tmp_path / decode / "config.yaml").read_text())["resolved"]
        assert resolved["decode"] == decode
        skipped = (tmp_path / decode / "skipped.txt").read_text().splitlines()
        assert sorted(line.split("\t")[0] for line in skipped) == sorted(str(odd[k]) for k in ("truncated", "text"))
    for k, v in runs["workers"].items():  # the same pixels, the same crops: the same training
        torch.testing.assert_close(runs["device"][k], v, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_crops_match_cpu_without_syncs(tmp_path):
    jpeg_folder(tmp_path, 30)
    source = FolderSource(tmp_path)
    mc = MultiCrop(global_size=64, local_size=32, local_crops=4, seed=3)
    cuda = torch.device("cuda")
    batches = lambda encoded: batch_loader(RunBatches(source, mc, len(source), seed=0, encoded=encoded, length=1), 0,
                                           pin_memory=encoded)
    _, index, crops_cpu, _ = next(iter(batches(False)))
    _, index_gpu, crops_gpu, _ = next(decode_on_device(batches(True), source, mc, cuda))
    assert torch.equal(index, index_gpu)
    diff = torch.cat([(a.cpu() - b).abs().flatten() for a, b in zip(crops_gpu, crops_cpu)])
    assert diff.mean() < 1 / 255, diff.mean()  # nvJPEG rounds a little differently from libjpeg
    # from decoded images to augmented crops, the GPU's work is queued and never waited for
    images = [source.read(i) for i in index.tolist()]
    on_gpu = [im.to(cuda) for im in images]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mc.photometric(mc.geometric(on_gpu, index, 0), index, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = mc.photometric(mc.geometric(images, index, 0), index, 0)
    for a, b in zip(out, reference):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-4)
