"""`dinokit retrieve`: the revisited Oxford / Paris metric on hand-made rankings, the safe ground-truth reader,
and a whole run on a tiny benchmark layout."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main as cli_main
from dinokit.eval.retrieve import (average_precision, evaluate, positive_positions, precision_at,
                                   read_ground_truth)
from dinokit.models.vit import VisionTransformer
from test_weights import WritesAFile

# Database of 8 images. Query 0: easy 0 and 3, hard 5, junk 1. Query 1: easy 7 only (no hard positive).
GND = [{"easy": [0, 3], "hard": [5], "junk": [1], "bbx": None},
       {"easy": [7], "hard": [], "junk": [], "bbx": None}]
RANKINGS = np.array([[1, 0, 2, 5, 3, 4, 6, 7],
                     [7, 0, 1, 2, 3, 4, 5, 6]])


def test_average_precision_and_precision_at_k_by_hand():
    # Query 0, Medium: positives {0, 3, 5}, junk {1}. Without the junk the ranking is 0 2 5 3 4 6 7:
    # positives at 0-based positions 0, 2, 3. Trapezoids of recall width 1/3 between the precision just
    # before each positive and at it: (1 + 1)/2, (1/2 + 2/3)/2, (2/3 + 3/4)/2 -> (1/3)(1 + 7/12 + 17/24) = 55/72.
    pos = positive_positions(RANKINGS[0], [0, 3, 5], [1])
    assert pos.tolist() == [0, 2, 3]
    assert average_precision(pos, 3) == pytest.approx(55 / 72)
    # P@k (1-based ranks 1, 3, 4): P@1 = 1; for k >= 4 the window stops at the last positive: 3/4.
    assert [precision_at(pos, k) for k in (1, 5, 10)] == pytest.approx([1, 3 / 4, 3 / 4])
    # A positive never ranked (not in the list) still counts in the denominator.
    assert average_precision(np.array([0]), 2) == pytest.approx(1 / 2)


def test_easy_medium_hard_map_by_hand():
    results = evaluate(RANKINGS, GND, ks=(1, 5, 10))
    # Query 0, Easy: positives {0, 3}, junk {1, 5}: ranking 0 2 3 4 6 7, positives at 0 and 2:
    # AP = (1/2)(1 + (1/2 + 2/3)/2) = 19/24; P@1 = 1, P@5 = P@10 = 2/3 (window cut at rank 3).
    # Query 0, Hard: positive {5}, junk {1, 0, 3}: ranking 2 5 4 6 7, the positive at 1:
    # AP = (0 + 1/2)/2 = 1/4; P@1 = 0, P@5 = P@10 = 1/2 (window cut at rank 2).
    # Query 1: its only (easy) positive first: AP 1 in Easy and Medium; no positive in Hard: left out there.
    assert results["easy"]["mAP"] == pytest.approx((19 / 24 + 1) / 2)
    assert results["medium"]["mAP"] == pytest.approx((55 / 72 + 1) / 2)
    assert results["hard"]["mAP"] == pytest.approx(1 / 4)
    assert [results["easy"][f"mP@{k}"] for k in (1, 5, 10)] == pytest.approx([1, (2 / 3 + 1) / 2, (2 / 3 + 1) / 2])
    assert [results["medium"][f"mP@{k}"] for k in (1, 5, 10)] == pytest.approx([1, (3 / 4 + 1) / 2, (3 / 4 + 1) / 2])
    assert [results["hard"][f"mP@{k}"] for k in (1, 5, 10)] == pytest.approx([0, 1 / 2, 1 / 2])
    assert [results[s]["queries"] for s in ("easy", "medium", "hard")] == [2, 2, 1]
    # A perfect ranking scores 1 everywhere; junk ranked first does not hurt it.
    perfect = evaluate(np.array([[1, 0, 3, 5, 2, 4, 6, 7], [7, 0, 1, 2, 3, 4, 5, 6]]), GND)
    assert [perfect[s]["mAP"] for s in ("easy", "medium", "hard")] == pytest.approx([1, 1, 1])


def gnd_dict(n_db=8):
    return {"imlist": [f"db{i}" for i in range(n_db)], "qimlist": ["q0", "q1"],
            "gnd": [{"bbx": np.array([1.0, 2.0, 30.5, 40.0]), "easy": np.array([0, 3]), "hard": [5], "junk": [1]},
                    {"bbx": [0, 0, 10, 10], "easy": [7], "hard": np.array([], dtype=np.int64), "junk": []}]}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_ground_truth_is_read_as_plain_data(tmp_path, protocol):
    with open(tmp_path / "gnd_test.pkl", "wb") as f:
        pickle.dump(gnd_dict(), f, protocol=protocol)  # numpy arrays inside, as some copies of the files have
    gt = read_ground_truth(tmp_path / "gnd_test.pkl")
    assert gt["imlist"][3] == "db3" and gt["qimlist"] == ["q0", "q1"]
    assert gt["gnd"][0] == {"easy": [0, 3], "hard": [5], "junk": [1], "bbx": [1.0, 2.0, 30.5, 40.0]}
    assert gt["gnd"][1]["hard"] == [] and gt["gnd"][1]["bbx"] == [0.0, 0.0, 10.0, 10.0]


@pytest.mark.parametrize("protocol", [2, 4])
def test_ground_truth_that_would_run_code_is_refused(tmp_path, capsys, protocol):
    victim = tmp_path / "created-by-unpickling"
    evil = gnd_dict()
    evil["gnd"][0]["bbx"] = WritesAFile(victim)
    with open(tmp_path / "gnd_evil.pkl", "wb") as f:
        pickle.dump(evil, f, protocol=protocol)
    with pytest.raises(ValueError, match=r"refused to read .*gnd_evil.pkl: it would import io.open.*nothing"):
        read_ground_truth(tmp_path / "gnd_evil.pkl")
    assert not victim.exists()
    # The same file through the command: refused before any model or image is read.
    (tmp_path / "jpg").mkdir()
    assert cli_main(["retrieve", "--weights", str(tmp_path / "no-such-weights.pth"), "--data", str(tmp_path)]) == 2
    assert "refused to read" in capsys.readouterr().err
    assert not victim.exists()


def test_malformed_ground_truth_is_a_clear_error(tmp_path):
    bad = gnd_dict()
    bad["gnd"][1]["easy"] = [8]  # outside the database of 8 images
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="query 1 'easy' holds an index outside the database of 8"):
        read_ground_truth(tmp_path / "a.pkl")
    (tmp_path / "b.pkl").write_bytes(pickle.dumps(gnd_dict())[:50])
    with pytest.raises(ValueError, match="not a readable ground-truth pickle"):
        read_ground_truth(tmp_path / "b.pkl")


def noise(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_jpg(array, path):
    Image.fromarray(array).save(path, quality=95, subsampling=0)  # 4:4:4: 8 x 8 blocks decode independently


def tiny_layout(root):
    """A benchmark folder: 8 database images of noise; each query image is another noise image with a
    database image pasted at its box (16-pixel aligned, so JPEG gives the same pixels there)."""
    rng = np.random.default_rng(0)
    (root / "jpg").mkdir(parents=True)
    db = [noise(rng, 64, 48) for _ in range(8)]
    for i, a in enumerate(db):
        save_jpg(a, root / "jpg" / f"db{i}.jpg")
    boxes = []
    for q, (target, (x, y)) in enumerate([(6, (16, 32)), (3, (32, 16))]):
        a = noise(rng, 112, 96)
        a[y:y + 64, x:x + 48] = db[target]
        save_jpg(a, root / "jpg" / f"q{q}.jpg")
        boxes.append([x, y, x + 48, y + 64])
    # Query 0 finds database image 6 (easy) and has database image 2 as junk; query 1 finds 3 (hard).
    gnd = {"imlist": [f"db{i}" for i in range(8)], "qimlist": ["q0", "q1"],
           "gnd": [{"bbx": boxes[0], "easy": [6], "hard": [], "junk": [2]},
                   {"bbx": boxes[1], "easy": [], "hard": [3], "junk": []}]}
    (root / "gnd_tiny5k.pkl").write_bytes(pickle.dumps(gnd))
    return root


@pytest.mark.parametrize("multiscale", [False, True])
def test_retrieve_end_to_end(tmp_path, capsys, multiscale):
    layout = tiny_layout(tmp_path / "tiny5k")
    crop = np.asarray(Image.open(layout / "jpg" / "q0.jpg"))[32:96, 16:64]
    assert np.array_equal(crop, np.asarray(Image.open(layout / "jpg" / "db6.jpg")))  # the premise holds
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    args = ["retrieve", "--weights", str(tmp_path / "vit.pth"), "--data", str(layout), "--imsize", "64",
            "--device", "cpu", "--json", "--quiet"] + (["--multiscale"] if multiscale else [])
    # The paper's script feeds whole queries (the default); the benchmark's protocol crops them to their box.
    assert cli_main(args) == 0
    whole = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert not whole["crop_queries"] and whole["n_queries"] == 2
    args.append("--crop-queries")
    assert cli_main(args) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["dataset"] == "tiny5k" and out["n_database"] == 8 and out["n_queries"] == 2 and out["crop_queries"]
    assert out["skipped"] == 0 and out["multiscale"] == multiscale
    # Each query's crop is exactly its positive: found first, in the settings where it counts.
    r = out["results"]
    assert r["easy"]["mAP"] == pytest.approx(100) and r["easy"]["queries"] == 1
    assert r["hard"]["mAP"] == pytest.approx(100) and r["hard"]["queries"] == 1
    assert r["medium"]["mAP"] == pytest.approx(100) and r["medium"]["mP@1"] == pytest.approx(100)

    # An unreadable database image is reported and ranked last instead of stopping the run.
    (layout / "jpg" / "db0.jpg").write_bytes(b"")
    assert cli_main([a for a in args if a != "--quiet"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.splitlines()[-1])
    assert out["skipped"] == 1 and f"skipped {layout / 'jpg' / 'db0.jpg'}" in captured.err
    assert out["results"]["medium"]["mAP"] == pytest.approx(100)
