"""`dinokit copydetect`: AP and whitening on hand-made cases, the command on layouts with known answers,
and the benchmark builder."""
import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data.sources import open_source
from dinokit.eval.copydetect import average_precision, build_benchmark, learn_whitening, mean_average_precision
from test_eval_common import _cache_in_tmp, run_cli, save_vit, tiny_vit, write_images  # noqa: F401


def test_average_precision_by_hand():
    assert average_precision([0], 1) == 1.0
    # Positives at ranks 0 and 2 of 2: trapezoids (1 + 1) / 2 / 2 + (1/2 + 2/3) / 2 / 2.
    assert average_precision([0, 2], 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    assert average_precision([1], 1) == pytest.approx((0 + 1 / 2) / 2)
    assert average_precision([], 3) == 0.0
    assert average_precision([0], 2) == 0.5  # the second positive was never retrieved
    retrieved = torch.tensor([[3, 1, 2], [0, 2, 1]])  # first query: positive at rank 0; second: at rank 2
    assert mean_average_precision(retrieved, [{3}, {1}]) == pytest.approx((1.0 + (0 + 1 / 3) / 2) / 2)


def test_whitening_by_hand():
    # The paper's whitening: eigenvectors and scales from the second-moment matrix x^T x / n (not the centred
    # covariance), applied after subtracting the mean. So x @ projection has an identity second moment.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=g) @ torch.randn(6, 6, generator=g) + 10.0
    mean, projection = learn_whitening(x)
    torch.testing.assert_close(mean, x.mean(0))
    y = (x @ projection).double()
    torch.testing.assert_close(y.T @ y / len(y), torch.eye(6, dtype=torch.float64), atol=1e-3, rtol=0)
    # Largest eigenvalue first: the first component is the mean direction (the mean is large here).
    assert abs(torch.nn.functional.cosine_similarity(projection[:, 0], x.mean(0), dim=0)) > 0.99
    # A direction with no energy is floored at 1e-5 of the largest eigenvalue instead of dividing by zero.
    flat = torch.cat([x, torch.zeros(2000, 1)], dim=1)
    _, p = learn_whitening(flat)
    assert torch.isfinite(p).all() and p.abs().max() < 1e4


def copydays_by_hand(root, rng):
    """Originals in two groups (prefix 0001: two identical images; 0002: one). Strong queries are exact
    copies, so every answer is known: each query finds all its positives first."""
    a, b = (rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(2))
    images = {"original/000100.jpg": a, "original/000101.jpg": a, "original/000200.jpg": b,
              "strong/000105.jpg": a, "strong/000207.jpg": b,
              "jpegqual/50/000200.jpg": b, "jpegqual/50/000101.jpg": b}  # 000101's query is wrong on purpose
    images |= {f"distractors/{i}.jpg": rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for i in range(5)}
    images |= {f"white/{i}.jpg": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(30)}
    return write_images(root, images)


def test_command_known_answers(tmp_path, capsys):
    root = copydays_by_hand(tmp_path / "cd", np.random.default_rng(0))
    weights = save_vit(tiny_vit(), tmp_path / "vit.safetensors")
    code, result, err = run_cli(["copydetect", "--weights", str(weights), "--data", str(root), "--image-size", "32",
                                 "--whitening", str(root / "white"), "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    assert result["n_database"] == 8 and result["n_distractors"] == 5 and result["whitened"]
    assert result["mAP"]["strong"] == pytest.approx(1.0)
    # jpegqual/50 pairs queries with the original of the same name. 000200 finds itself first: AP 1.
    # "000101" shows image b, so 000200 comes first and the positive 000101 at some rank r >= 1: AP 1 / (2 (r + 1)).
    assert any(result["mAP"]["jpegqual/50"] == pytest.approx((1 + 1 / (2 * (r + 1))) / 2) for r in range(1, 8))


def test_builder_layout_and_a_run(tmp_path, capsys):
    rng = np.random.default_rng(1)
    write_images(tmp_path / "pool", {f"{i}.png": rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                                     for i in range(14)})
    (tmp_path / "pool" / "zz-broken.png").write_bytes(b"oops")
    counts = build_benchmark(open_source(str(tmp_path / "pool")), tmp_path / "bench", originals=4, edits=2,
                             distractors=4, whitening=5, seed=0, progress=False)
    assert counts["original"] == 4 and counts["strong"] == 8 and counts["distractors"] == 4
    names = sorted(p.name for p in (tmp_path / "bench" / "strong").iterdir())
    assert names == [f"{n:04d}{e:02d}.jpg" for n in range(4) for e in (1, 2)]
    strong = Image.open(tmp_path / "bench" / "strong" / "000001.jpg")
    original = np.asarray(Image.open(tmp_path / "bench" / "original" / "000000.jpg"))
    assert strong.size != (40, 40) or not np.array_equal(np.asarray(strong), original)  # edited
    with pytest.raises(ValueError, match="too few readable images"):
        build_benchmark(open_source(str(tmp_path / "pool")), tmp_path / "b2", 10, 1, 10, 10, progress=False)

    weights = save_vit(tiny_vit(), tmp_path / "vit.safetensors")
    code, result, err = run_cli(["copydetect", "--weights", str(weights), "--data", str(tmp_path / "bench"),
                                 "--image-size", "32", "--json", "--quiet"], capsys)
    assert code == 0, err
    assert result["whitened"] and result["n_distractors"] == 4 and 0.0 <= result["mAP"]["strong"] <= 1.0
