"""Shared pieces of the evaluation commands: --weights loading (and the pixel baseline), the feature cache,
the --json line. Also the helpers the other test_eval_* files use."""
import json
from argparse import Namespace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dinokit import cli
from dinokit.data.sources import open_source
from dinokit.eval import common
from dinokit.eval.features import MEAN, STD, cls_features, extract_features
from dinokit.models.convnets import convnet
from dinokit.models.vit import VisionTransformer


def tiny_vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    arch = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3) | kw
    return VisionTransformer(**arch).eval()


def save_vit(model: VisionTransformer, path: Path) -> Path:
    """dinokit's safetensors export layout: the architecture in the metadata."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"dinokit_arch": json.dumps({"name": "vit", **model.arch()})})
    return path


def write_images(folder: Path, images: dict[str, np.ndarray]) -> Path:
    """{relative path: uint8 (H, W, 3)} -> PNG files."""
    for rel, a in images.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / rel)
    return folder


def normalised(img_hwc: np.ndarray) -> torch.Tensor:
    """The evaluation input of a small image, computed here without dinokit's transform."""
    x = torch.from_numpy(np.array(img_hwc)).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def run_cli(argv, capsys) -> tuple[int, dict | None, str]:
    """Run `dinokit ARGV`; return the exit code, the --json object (last stdout line) and stderr."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    result = json.loads(lines[-1]) if code == 0 and "--json" in argv else None
    return code, result, err


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))


def _args(weights, **kw):
    return Namespace(weights=str(weights), which="teacher", device="cpu", batch_size=4, num_workers=0,
                     json=False, quiet=True, **kw)


def test_pixels_baseline_is_flattened_unit_pixels():
    model = common.load_model("pixels")
    img = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    x = common.transform_for(model)(img)
    torch.testing.assert_close(model(x[None])[0], img.flatten().float() / 255)
    grey = torch.rand(5, 1, 4, 4).expand(-1, 3, -1, -1).flatten(1)
    colour = torch.rand(5, 48)
    (g,) = common.Pixels.drop_repeated_channels(grey)
    assert g.shape == (5, 16)
    assert [f.shape[1] for f in common.Pixels.drop_repeated_channels(grey, colour)] == [48, 48]


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        common.load_model(str(tmp_path / "nope.pth"))


def test_cache_hits_same_weights_and_misses_changed_weights(tmp_path):
    rng = np.random.default_rng(0)
    data = write_images(tmp_path / "data", {f"{i}.png": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                                            for i in range(6)})
    (data / "broken.png").write_bytes(b"not a png")
    source = open_source(str(data))
    model = tiny_vit()
    weights = save_vit(model, tmp_path / "w.safetensors")
    args = _args(weights)
    f1, kept, skipped = common.cached_features(model, source, args, "cls", cls_features, common.transform_for(model))
    assert len(kept) == 6 and [source.paths[i] for i, _ in skipped] == [str(data / "broken.png")]
    expected = model(torch.stack([normalised(np.asarray(Image.open(p))) for p in source.paths if "broken" not in p]))
    torch.testing.assert_close(f1, expected, atol=1e-5, rtol=0)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    # A cache hit returns the stored tensor, whatever model is passed: prove it by passing another one.
    other = tiny_vit(seed=1)
    f2, kept2, skipped2 = common.cached_features(other, source, args, "cls", cls_features, common.transform_for(other))
    assert torch.equal(f1, f2) and kept2 == kept and len(skipped2) == 1
    # New content at the same path: a new key, fresh features.
    save_vit(other, weights)
    f3, _, _ = common.cached_features(other, source, args, "cls", cls_features, common.transform_for(other))
    assert not torch.allclose(f1, f3)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_small_images_are_evaluated_at_the_models_training_resolution(tmp_path):
    """A ViT trained on 20-pixel crops sees 28-pixel test images at 20 (the whole image, resized); images no
    larger than its resolution, and the pixel baseline, keep their size; large images take the paper's
    resize and centre crop whatever the model."""
    img = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    vit20 = VisionTransformer(img_size=20, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    x = common.transform_for(vit20)(img)
    assert x.shape == (3, 20, 20)
    resized = torch.nn.functional.interpolate(img[None].float() / 255, size=(20, 20), mode="bicubic",
                                              antialias=True, align_corners=False)[0].clamp(0, 1)
    torch.testing.assert_close(x, normalised(resized.permute(1, 2, 0).numpy() * 255), atol=1e-5, rtol=0)
    assert common.transform_for(VisionTransformer(img_size=32, patch_size=4, embed_dim=16, depth=1,
                                                  num_heads=2))(img).shape == (3, 28, 28)
    assert common.transform_for(common.load_model("pixels"))(img).shape == (3, 28, 28)
    wide = torch.randint(0, 256, (3, 28, 40), dtype=torch.uint8)
    assert common.transform_for(vit20)(wide).shape == (3, 20, 20)  # shorter side to 20, the centre square
    big = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    assert common.transform_for(vit20)(big).shape == (3, 224, 224)
    # features at another size are other features: the cache keeps them apart
    source = open_source(str(write_images(tmp_path / "d", {f"{i}.png": np.full((28, 28, 3), 40 * i, np.uint8)
                                                            for i in range(3)})))
    weights = save_vit(vit20, tmp_path / "w.safetensors")
    args = _args(weights)
    a, _, _ = common.cached_features(vit20, source, args, "cls", cls_features, common.transform_for(vit20))
    b, _, _ = common.cached_features(vit20, source, args, "cls", cls_features,
                                     partial(common.eval_transform, normalize=True))
    assert not torch.allclose(a, b)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_images_smaller_than_a_patch_are_skipped_not_fatal(tmp_path):
    """A patchify (the paper's ViT stem) needs one whole patch: smaller images are skipped with a reason, like
    unreadable files. Conv stems and ResNets pad, so they take every size."""
    rng = np.random.default_rng(0)
    sizes = {"ok.png": (32, 32), "patch.png": (8, 8), "one.png": (1, 1), "two.png": (2, 2), "line.png": (1, 500),
             "strip.png": (7, 50), "odd.png": (21, 21)}
    source = open_source(str(write_images(tmp_path / "d", {n: rng.integers(0, 256, (*s, 3), dtype=np.uint8)
                                                           for n, s in sizes.items()})))
    names = [Path(p).name for p in source.paths]
    vit = tiny_vit()  # patch 8
    feats, kept, skipped = extract_features(vit, source, 4, transform=common.transform_for(vit), progress=False)
    assert sorted(names[i] for i in kept) == ["odd.png", "ok.png", "patch.png"]
    assert {names[i]: reason for i, reason in skipped} == {
        "one.png": "smaller than one 8x8 patch (1x1 px)", "two.png": "smaller than one 8x8 patch (2x2 px)",
        "line.png": "smaller than one 8x8 patch (500x1 px)", "strip.png": "smaller than one 8x8 patch (50x7 px)"}
    x = common.transform_for(vit)(source.read(names.index("ok.png")))
    torch.testing.assert_close(feats[kept.index(names.index("ok.png"))], vit(x[None])[0])

    for model in (tiny_vit(stem="conv"), tiny_vit(stem="conv-full", patch_size=4), convnet("resnet18").eval()):
        feats, kept, skipped = extract_features(model, source, 4, transform=common.transform_for(model),
                                                progress=False)
        assert skipped == [] and sorted(kept) == list(range(len(sizes))) and feats.isfinite().all()
