"""`dinokit index` / `dinokit search` on a folder where the true nearest neighbours are known: edited copies."""
import io
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from dinokit.cli import main
from dinokit.eval.search import load_index, nearest
from dinokit.models.export import export_backbone
from dinokit.models.vit import VisionTransformer

ORIGINALS, DISTRACTORS = 4, 8


def random_picture(rng: np.random.Generator) -> Image.Image:
    """A smooth random colour field with a few rectangles: images unlike each other."""
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((64, 64), Image.BICUBIC)
    pixels = np.asarray(im).copy()
    for _ in range(3):
        y, x = rng.integers(0, 48, 2)
        h, w = rng.integers(8, 24, 2)
        pixels[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def edited_copies(im: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    """Near-duplicates: brightened a little and re-encoded as JPEG; with pixel noise added."""
    buffer = io.BytesIO()
    ImageEnhance.Brightness(im).enhance(1.03).save(buffer, "JPEG", quality=80)
    jpeg = Image.open(buffer).convert("RGB")
    noisy = np.asarray(im).astype(np.int16)
    noisy = np.clip(noisy + rng.integers(-6, 7, noisy.shape), 0, 255).astype(np.uint8)
    return [jpeg, Image.fromarray(noisy)]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """queries/q{i}.png, and an indexed folder holding two edited copies of each query plus distractors."""
    root = tmp_path_factory.mktemp("search")
    rng = np.random.default_rng(0)
    (root / "queries").mkdir()
    (root / "folder" / "sub").mkdir(parents=True)
    for i in range(ORIGINALS):
        im = random_picture(rng)
        im.save(root / "queries" / f"q{i}.png")
        for j, copy in enumerate(edited_copies(im, rng)):
            copy.save(root / "folder" / ("sub" if j else "") / f"copy{i}_{j}.png")
    for i in range(DISTRACTORS):
        random_picture(rng).save(root / "folder" / f"other{i}.png")
    (root / "folder" / "broken.png").write_bytes(b"not an image")
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    with torch.no_grad():  # random weights 3x the init's: features that tell random images apart better
        for name, p in model.named_parameters():
            if p.ndim >= 2 and name not in ("pos_embed", "cls_token"):
                p.mul_(3)
    export_backbone(model, "safetensors", root / "vit.safetensors")
    assert main(["index", "--weights", str(root / "vit.safetensors"), "--data", str(root / "folder"),
                 "--out", str(root / "index.safetensors")]) == 0
    return root


def test_index_holds_every_readable_image(gallery):
    features, paths, weights = load_index(gallery / "index.safetensors")
    assert len(paths) == 2 * ORIGINALS + DISTRACTORS and not any("broken" in p for p in paths)
    assert features.shape == (len(paths), 48)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(len(paths)))
    assert weights["which"] == "teacher"


def test_each_query_finds_its_own_copies_first(gallery, capsys):
    queries = [str(gallery / "queries" / f"q{i}.png") for i in range(ORIGINALS)]
    sheet = gallery / "sheet.png"
    assert main(["search", "--index", str(gallery / "index.safetensors"), *queries, "--k", "5", "--json",
                 "--sheet", str(sheet)]) == 0
    results = json.loads(capsys.readouterr().out)  # stdout is pure JSON
    assert [r["query"] for r in results] == queries
    for i, r in enumerate(results):
        assert len(r["results"]) == 5
        top2 = {m["path"].rsplit("/", 1)[-1] for m in r["results"][:2]}
        assert top2 == {f"copy{i}_0.png", f"copy{i}_1.png"}, r
        sims = [m["similarity"] for m in r["results"]]
        assert sims == sorted(sims, reverse=True) and sims[0] <= 1 + 1e-5
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width > im.height  # one row of 1 + 5 thumbnails per query
    args = ["search", "--index", str(gallery / "index.safetensors"), queries[0], "--sheet", str(sheet)]
    before = sheet.read_bytes()
    assert main(args) == 2 and "exists: pass --force" in capsys.readouterr().err
    assert sheet.read_bytes() == before  # not redrawn
    assert main(args + ["--force"]) == 0
    with Image.open(sheet) as im, Image.open(io.BytesIO(before)) as old:
        assert im.height < old.height  # now one query's row


def test_text_output(gallery, capsys):
    assert main(["search", "--index", str(gallery / "index.safetensors"), str(gallery / "queries" / "q0.png"),
                 "--k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("q0.png") and len(lines) == 3
    assert lines[1].split()[0] == "1" and "copy0_" in lines[1]


def test_nearest_is_exact():
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    queries = features[[3, 17]] + 0.01 * torch.randn(2, 8, generator=g)
    sims, idx = nearest(features, queries, k=50)
    assert idx[:, 0].tolist() == [3, 17]
    brute = queries @ features.T
    torch.testing.assert_close(sims, brute.gather(1, idx))
    assert (sims[:, :-1] >= sims[:, 1:]).all()
    assert nearest(features, queries, k=100)[0].shape == (2, 50)  # k beyond the index: all of it


def test_unreadable_index(tmp_path):
    (tmp_path / "index.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a dinokit index"):
        load_index(tmp_path / "index.safetensors")


def test_index_refuses_existing_output_unless_forced(gallery, tmp_path, capsys):
    weights = gallery / "vit.safetensors"
    base = ["index", "--weights", str(weights), "--data", str(gallery / "folder")]
    mine = tmp_path / "mine.safetensors"
    mine.write_text("user data")
    assert main(base + ["--out", str(mine)]) == 2
    assert "exists: pass --force" in capsys.readouterr().err and mine.read_text() == "user data"
    old = os.umask(0o022)
    try:
        assert main(base + ["--out", str(mine), "--force"]) == 0
    finally:
        os.umask(old)
    assert len(load_index(mine)[1]) == 2 * ORIGINALS + DISTRACTORS
    assert stat.S_IMODE(mine.stat().st_mode) == 0o644
    before = weights.read_bytes()
    assert main(base + ["--out", str(weights), "--force"]) == 2
    assert "would overwrite the --weights" in capsys.readouterr().err and weights.read_bytes() == before
