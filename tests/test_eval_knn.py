"""`dinokit knn`: the vote on hand-made cases, the command end to end, and the pixel baseline on Fashion-MNIST."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinokit import cli
from dinokit.eval.knn import knn_classify, knn_evaluate
from test_eval_common import _cache_in_tmp, normalised, run_cli, save_vit, tiny_vit, write_images  # noqa: F401


def test_vote_by_hand():
    # Unit vectors in 2-D at known angles: cos similarities are cos(angle difference).
    angles = torch.tensor([0.0, 0.1, 0.2, 1.5, 1.6, 3.0])
    train = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    test = torch.tensor([[math.cos(0.15), math.sin(0.15)]])
    T = 0.5
    # k = 3: neighbours at angle distance 0.05 (class 1: 0.2, class 0: 0.1) and 0.15 (class 0: 0.0).
    w = lambda d: math.exp(math.cos(d) / T)  # noqa: E731
    score0, score1 = w(0.05) + w(0.15), w(0.05)
    assert score0 > score1
    assert knn_classify(train, labels, test, torch.tensor([0]), k=3, T=T) == (100.0, 100.0)
    assert knn_classify(train, labels, test, torch.tensor([1]), k=3, T=T) == (0.0, 100.0)
    # k = 1 is a tie at 0.05 between classes 0 and 1; k = 6: class 1 has three votes but farther away.
    scores6 = {0: w(0.15) + w(0.05), 1: w(0.05) + w(1.35) + w(1.45), 2: w(2.85)}
    best = max(scores6, key=scores6.get)
    assert knn_classify(train, labels, test, torch.tensor([best]), k=6, T=T)[0] == 100.0


def test_evaluate_many_k_equals_one_k_at_a_time():
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(500, 16, generator=g), dim=1)
    test = F.normalize(torch.randn(120, 16, generator=g), dim=1)
    ytr, yte = torch.randint(0, 7, (500,), generator=g), torch.randint(0, 7, (120,), generator=g)
    many = knn_evaluate(train, ytr, test, yte, [1, 5, 20, 600], 0.07)
    for k, acc in many.items():
        assert acc == knn_classify(train, ytr, test, yte, k, 0.07)


def brute_force_knn(train, ytr, test, yte, k, T, num_classes):
    """Independent weighted k-NN in numpy: sort each row fully, vote, rank."""
    sim = test @ train.T
    top1 = top5 = 0
    for i in range(len(test)):
        order = np.argsort(-sim[i], kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in order:
            votes[ytr[j]] += np.exp(sim[i, j] / T)
        ranked = np.argsort(-votes, kind="stable")
        top1 += ranked[0] == yte[i]
        top5 += yte[i] in ranked[:min(5, k)]
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


def test_command_on_a_folder_matches_independent_computation(tmp_path, capsys):
    rng = np.random.default_rng(0)
    classes = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (128, 128, 128)}

    def image(colour):
        return np.clip(np.array(colour) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)

    train = {f"{c}/{i}.png": image(v) for c, v in classes.items() for i in range(8)}
    test = {f"{c}/{i}.png": image(v) for c, v in classes.items() if c != "grey" for i in range(5)}
    write_images(tmp_path / "train", train)
    write_images(tmp_path / "test", test)
    (tmp_path / "test" / "red" / "broken.png").write_bytes(b"\x89PNG truncated")
    model = tiny_vit()
    weights = save_vit(model, tmp_path / "vit.safetensors")
    argv = ["knn", "--weights", str(weights), "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
            "--k", "1", "5", "20", "--temperature", "0.1", "--device", "cpu", "--json"]
    code, result, err = run_cli(argv, capsys)
    assert code == 0, err
    assert result["n_train"] == 32 and result["n_test"] == 15 and result["skipped"] == {"train": 0, "test": 1}
    assert "broken.png" in err

    # Expected: features straight from the model; the test folder lacks "grey", so class ids follow train's.
    names = sorted(classes)
    def feats(images):  # noqa: E306
        keys = sorted(images)
        with torch.no_grad():
            f = F.normalize(model(torch.stack([normalised(images[k]) for k in keys])), dim=1).numpy()
        return f, np.array([names.index(k.split("/")[0]) for k in keys])
    ftr, ytr = feats(train)
    fte, yte = feats(test)
    for k in (1, 5, 20):
        expected = brute_force_knn(ftr, ytr, fte, yte, k, 0.1, 4)
        got = result["results"][str(k)]
        assert (got["top1"], got["top5"]) == pytest.approx(expected, abs=1e-9)

    # The second run reads the cached features and gives the same numbers.
    code, again, err = run_cli(argv, capsys)
    assert code == 0 and "from cache" in err and again == result


def test_unlabelled_test_set_is_a_clear_error(tmp_path, capsys):
    write_images(tmp_path / "flat", {"a.png": np.zeros((8, 8, 3), np.uint8)})
    write_images(tmp_path / "train", {"x/a.png": np.zeros((8, 8, 3), np.uint8)})
    code, _, err = run_cli(["knn", "--weights", "pixels", "--train", str(tmp_path / "train"),
                            "--test", str(tmp_path / "flat")], capsys)
    assert code == 2 and "no labels" in err


def test_pixels_on_fashion_mnist(capsys):
    """The built-in baseline: flattened pixels, 20-NN, T = 0.07 (our own measurement: 84.59%)."""
    code, result, err = run_cli(["knn", "--weights", "pixels", "--train", "fashion-mnist:train",
                                 "--test", "fashion-mnist:test", "--k", "20", "--batch-size", "1000",
                                 "--json", "--quiet"], capsys)
    assert code == 0, err
    assert result["n_train"] == 60000 and result["n_test"] == 10000
    assert result["results"]["20"]["top1"] == pytest.approx(84.6, abs=0.3)


def test_command_on_odd_and_tiny_image_sizes(tmp_path, capsys):
    """A conv-stem ViT takes every size (ceil(side / patch) tokens a side); a patch-stem one skips, with the
    reason on stderr and in the counts, the images smaller than one patch, and evaluates the rest."""
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (3, 3), (7, 50), (21, 21), (22, 22), (10, 300), (1, 500), (32, 32)]  # (width, height)
    images = {f"{c}/{w}x{h}.png": rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for c in "ab" for w, h in sizes}
    data = write_images(tmp_path / "data", images)
    argv = ["knn", "--train", str(data), "--test", str(data), "--k", "1", "--device", "cpu", "--json"]
    conv = save_vit(tiny_vit(stem="conv-full", patch_size=4, img_size=20), tmp_path / "conv.safetensors")
    code, result, err = run_cli(argv + ["--weights", str(conv)], capsys)
    assert code == 0, err
    assert result["n_train"] == result["n_test"] == 16 and result["skipped"] == {"train": 0, "test": 0}

    patch = save_vit(tiny_vit(), tmp_path / "patch.safetensors")  # patch 8
    code, result, err = run_cli(argv + ["--weights", str(patch)], capsys)
    assert code == 0, err
    assert result["n_train"] == result["n_test"] == 8 and result["skipped"] == {"train": 8, "test": 8}
    assert result["results"]["1"]["top1"] == 100.0  # each test image finds itself
    for name in ("1x1", "3x3", "7x50", "1x500"):
        assert f"{name}.png: smaller than one 8x8 patch ({name} px)" in err


def test_k_beyond_the_training_set_is_noted(tmp_path, capsys):
    rng = np.random.default_rng(1)
    write_images(tmp_path / "train", {f"{c}/{i}.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                                      for c in "ab" for i in range(3)})
    assert cli.main(["knn", "--weights", "pixels", "--train", str(tmp_path / "train"), "--test",
                     str(tmp_path / "train"), "--k", "2", "200", "--json", "--quiet"]) == 0
    *lines, last = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2-NN") and "capped" not in lines[0]
    assert lines[1].startswith("200-NN") and lines[1].endswith("(k capped at 6: only 6 training images)")
    results = json.loads(last)["results"]
    assert results["2"]["k_used"] == 2 and results["200"]["k_used"] == 6
