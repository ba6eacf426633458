"""`dinokit attention` and `dinokit embed` end to end on tiny ViTs, against values computed here."""
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from safetensors import safe_open

from dinokit.eval.attention import MAX_PATCHES, mass_mask, resized_size
from test_eval_common import _cache_in_tmp, normalised, run_cli, save_vit, tiny_vit, write_images  # noqa: F401


def test_mass_mask_by_hand():
    attn = torch.tensor([[[0.05, 0.40], [0.25, 0.10]],    # sorted 0.40 0.25 | 0.10 0.05: 0.65 >= 0.6
                         [[0.30, 0.30], [0.20, 0.00]]])   # sum 0.8, normalised .375 .375 | .25 0: 0.75
    expected = torch.tensor([[[0, 1], [1, 0]], [[1, 1], [0, 0]]], dtype=torch.bool)
    assert torch.equal(mass_mask(attn, 0.6), expected)
    assert mass_mask(attn, 1.0)[0].all()  # all mass needs every non-zero patch
    assert mass_mask(torch.tensor([[[1.0, 0.0]]]), 0.6).tolist() == [[[True, False]]]


def last_block_cls_attention(model, x):
    """The last block's [CLS] attention, recomputed from the weights step by step."""
    with torch.no_grad():
        t = model.prepare_tokens(x[None])
        for blk in model.blocks[:-1]:
            t = blk(t)
        attn = model.blocks[-1].attn
        t = model.blocks[-1].norm1(t)
        heads, dim = attn.num_heads, t.shape[-1]
        q, k, _ = attn.qkv(t)[0].split(dim, dim=-1)
        q = q.reshape(-1, heads, dim // heads).transpose(0, 1)
        k = k.reshape(-1, heads, dim // heads).transpose(0, 1)
        scores = (q[:, :1] @ k.transpose(1, 2))[:, 0] / (dim // heads) ** 0.5
        return scores.softmax(-1)[:, 1:]  # heads, patches


def test_attention_command_any_size(tmp_path, capsys):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (45, 37, 3), dtype=np.uint8)  # odd size: cropped to 40 x 32 (patch 8)
    write_images(tmp_path, {"odd.png": img})
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    model = tiny_vit()
    weights = save_vit(model, tmp_path / "vit.safetensors")
    code, result, err = run_cli(["attention", "--weights", str(weights), str(tmp_path / "odd.png"),
                                 str(tmp_path / "bad.jpg"), "--out", str(tmp_path / "maps"), "--image-size", "0",
                                 "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    (res,) = result["images"]
    assert res["size"] == [40, 32] and res["grid"] == [5, 4] and len(result["skipped"]) == 1
    names = sorted(p.name for p in (tmp_path / "maps" / "odd").iterdir())
    assert names == sorted(["image.png", "overlay.png"] + [f"{k}-head{h}.png" for k in ("attn", "mask")
                                                             for h in range(3)])

    attn = last_block_cls_attention(model, normalised(img[:40, :32]))
    for h in range(3):
        a = attn[h] / attn[h].sum()
        order = np.argsort(-a.numpy(), kind="stable")
        n_keep = int(np.searchsorted(np.cumsum(a.numpy()[order]), 0.6 - 1e-7) + 1)
        expected = np.zeros(20, bool)
        expected[order[:n_keep]] = True
        mask_png = np.asarray(Image.open(tmp_path / "maps" / "odd" / f"mask-head{h}.png"))
        assert mask_png.shape == (40, 32)
        np.testing.assert_array_equal(mask_png[::8, ::8] > 0, expected.reshape(5, 4))
        assert res["mask_fraction"][h] == pytest.approx(n_keep / 20)
        # The heat map shows the most attended patch in the colour map's top colour, the least in its bottom one.
        heat = np.asarray(Image.open(tmp_path / "maps" / "odd" / f"attn-head{h}.png"))[::8, ::8].reshape(20, 3)
        top, bottom = (np.round(np.array(colormaps["viridis"](v)[:3]) * 255) for v in (1.0, 0.0))
        assert order[0] in (heat == top).all(1).nonzero()[0]  # (the map has 256 colours: near-ties share one)
        assert order[-1] in (heat == bottom).all(1).nonzero()[0]


def test_attention_resizes_large_images(tmp_path, capsys):
    write_images(tmp_path, {"wide.png": np.full((60, 90, 3), 100, np.uint8)})
    weights = save_vit(tiny_vit(), tmp_path / "vit.safetensors")
    code, result, err = run_cli(["attention", "--weights", str(weights), str(tmp_path / "wide.png"),
                                 "--out", str(tmp_path / "maps"), "--image-size", "40", "--json"], capsys)
    assert code == 0, err
    assert result["images"][0]["size"] == [40, 56]  # 40 x 60, cropped to whole patches


def test_embed_cls_gem_patch(tmp_path, capsys):
    rng = np.random.default_rng(2)
    images = {f"d/{i}.png": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(5)}
    write_images(tmp_path, images)
    (tmp_path / "d" / "2b-broken.png").write_bytes(b"")
    model = tiny_vit()
    weights = save_vit(model, tmp_path / "vit.safetensors")
    keys = sorted(images)
    x = torch.stack([normalised(images[k]) for k in keys])
    with torch.no_grad():
        tokens = model.get_intermediate_layers(x, 1)[0]

    base = ["embed", "--weights", str(weights), "--data", str(tmp_path / "d"), "--json"]
    code, result, err = run_cli(base + ["--out", str(tmp_path / "cls.npy")], capsys)
    assert code == 0, err
    assert result["skipped"] == 1 and result["shape"] == [5, 48]
    np.testing.assert_allclose(np.load(tmp_path / "cls.npy"), tokens[:, 0].numpy(), atol=1e-5)
    assert (tmp_path / "cls.txt").read_text().split() == [str(tmp_path / k) for k in keys]

    code, result, err = run_cli(base + ["--out", str(tmp_path / "gem.safetensors"), "--kind", "gem"], capsys)
    assert code == 0, err
    patches = tokens[:, 1:].numpy().astype(np.float64)
    expected = (np.maximum(patches, 1e-6) ** 4).mean(axis=1) ** 0.25
    with safe_open(str(tmp_path / "gem.safetensors"), "pt") as f:
        np.testing.assert_allclose(f.get_tensor("features").numpy(), expected, rtol=1e-4, atol=1e-6)
        assert f.get_tensor("index").tolist() == [0, 1, 2, 4, 5]  # sorted: 2.png, 2b-broken.png, 3.png

    code, result, err = run_cli(base + ["--out", str(tmp_path / "p.safetensors"), "--kind", "patch"], capsys)
    assert code == 0 and result["shape"] == [5, 16, 48]


def test_embed_rejects_unknown_extension(tmp_path, capsys):
    write_images(tmp_path, {"d/a.png": np.zeros((8, 8, 3), np.uint8)})
    code, _, err = run_cli(["embed", "--weights", "pixels", "--data", str(tmp_path / "d"),
                            "--out", str(tmp_path / "f.csv")], capsys)
    assert code == 2 and ".safetensors or .npy" in err


def test_attention_out_is_a_file(tmp_path, capsys):
    write_images(tmp_path, {"a.png": np.zeros((16, 16, 3), np.uint8)})
    (tmp_path / "maps").write_text("user file")
    weights = save_vit(tiny_vit(), tmp_path / "vit.safetensors")
    code, _, err = run_cli(["attention", "--weights", str(weights), str(tmp_path / "a.png"),
                            "--out", str(tmp_path / "maps")], capsys)
    assert code == 2 and "is a file" in err and (tmp_path / "maps").read_text() == "user file"


def test_attention_caps_the_longer_side(tmp_path, capsys):
    assert resized_size(20, 600, 480) == (64, 1920)  # shorter side 480 would make it 480 x 14400
    assert resized_size(60, 90, 40) == (40, 60)
    write_images(tmp_path, {"strip.png": np.full((20, 600, 3), 100, np.uint8),
                            "line.png": np.full((1, 500, 3), 100, np.uint8)})
    weights = save_vit(tiny_vit(), tmp_path / "vit.safetensors")
    code, result, err = run_cli(["attention", "--weights", str(weights), str(tmp_path / "strip.png"),
                                 str(tmp_path / "line.png"), "--out", str(tmp_path / "maps"), "--json"], capsys)
    assert code == 0, err
    assert [r["size"] for r in result["images"]] == [[64, 1920]]
    assert result["skipped"] == [{"image": str(tmp_path / "line.png"),
                                  "reason": "smaller than one 8x8 patch (1920x4 px once resized)"}]


def test_attention_skips_images_of_too_many_patches(tmp_path, capsys):
    write_images(tmp_path, {"big.png": np.zeros((8 * 127, 8 * 130, 3), np.uint8),  # 127 rows of 130 patches
                            "small.png": np.zeros((16, 16, 3), np.uint8)})
    weights = save_vit(tiny_vit(), tmp_path / "vit.safetensors")
    code, result, err = run_cli(["attention", "--weights", str(weights), str(tmp_path / "big.png"),
                                 str(tmp_path / "small.png"), "--out", str(tmp_path / "maps"), "--image-size", "0",
                                 "--json"], capsys)
    assert code == 0, err
    assert 130 * 127 > MAX_PATCHES and len(result["images"]) == 1
    (skip,) = result["skipped"]
    assert skip["image"] == str(tmp_path / "big.png") and skip["reason"].startswith("130x127 patches (1040x1016 px)")
    assert f"skipped {tmp_path / 'big.png'}: 130x127 patches" in err


def test_attention_folders_never_collide_nor_overwrite(tmp_path, capsys):
    rng = np.random.default_rng(3)
    images = {rel: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
              for rel in ("col/a/x.png", "col/b/x.png", "col/x-2.png", "new/x.png")}
    write_images(tmp_path, images)
    weights = save_vit(tiny_vit(), tmp_path / "vit.safetensors")

    def attention(*rels, force=False):
        argv = ["attention", "--weights", str(weights), *(str(tmp_path / r) for r in rels),
                "--out", str(tmp_path / "maps"), "--image-size", "0", "--json"] + (["--force"] if force else [])
        code, result, err = run_cli(argv, capsys)
        assert code == 0, err
        return [Path(r["files"][0]).parent.name for r in result["images"]]

    def shown(name):  # the input image, as the folder's image.png holds it
        return np.asarray(Image.open(tmp_path / "maps" / name / "image.png"))

    assert attention("col/a/x.png", "col/b/x.png", "col/x-2.png") == ["x", "x-2", "x-2-2"]
    for name, rel in (("x", "col/a/x.png"), ("x-2", "col/b/x.png"), ("x-2-2", "col/x-2.png")):
        np.testing.assert_array_equal(shown(name), images[rel])
    assert attention("new/x.png") == ["x-3"]  # the earlier run's folders stay as they were
    np.testing.assert_array_equal(shown("x"), images["col/a/x.png"])
    assert attention("new/x.png", "col/a/x.png", force=True) == ["x", "x-2"]
    np.testing.assert_array_equal(shown("x"), images["new/x.png"])


def test_embed_refuses_existing_outputs_unless_forced(tmp_path, capsys):
    write_images(tmp_path, {"d/a.png": np.zeros((8, 8, 3), np.uint8), "d/b.png": np.ones((8, 8, 3), np.uint8)})
    weights = save_vit(tiny_vit(), tmp_path / "vit.safetensors")
    base = ["embed", "--weights", str(weights), "--data", str(tmp_path / "d"), "--quiet"]
    (tmp_path / "f.txt").write_text("user notes")  # the list embed would write beside f.safetensors
    code, _, err = run_cli(base + ["--out", str(tmp_path / "f.safetensors")], capsys)
    assert code == 2 and "f.txt exists: pass --force" in err
    assert (tmp_path / "f.txt").read_text() == "user notes" and not (tmp_path / "f.safetensors").exists()
    (tmp_path / "g.npy").write_text("user array")
    code, _, err = run_cli(base + ["--out", str(tmp_path / "g.npy")], capsys)
    assert code == 2 and (tmp_path / "g.npy").read_text() == "user array" and not (tmp_path / "g.txt").exists()

    old = os.umask(0o022)
    try:
        code, _, err = run_cli(base + ["--out", str(tmp_path / "f.safetensors"), "--force"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "f.txt").read_text().split() == [str(tmp_path / "d" / n) for n in ("a.png", "b.png")]
    assert stat.S_IMODE((tmp_path / "f.safetensors").stat().st_mode) == 0o644  # as the .txt and .npy files
    code, _, err = run_cli(base + ["--out", str(tmp_path / "g.npy"), "--force"], capsys)
    assert code == 0 and np.load(tmp_path / "g.npy").shape == (2, 48)

    before = weights.read_bytes()
    code, _, err = run_cli(base + ["--out", str(weights), "--force"], capsys)
    assert code == 2 and "would overwrite the --weights" in err and weights.read_bytes() == before
