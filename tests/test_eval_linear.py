"""`dinokit linear`: the probe's features by hand, and the command end to end on small folders."""
import numpy as np
import pytest
import torch

from dinokit.eval.features import last_blocks_features
from test_eval_common import _cache_in_tmp, run_cli, save_vit, tiny_vit, write_images  # noqa: F401

COLOURS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def colour_folders(root, n, seed, swap=None):
    """Class folders of noisy single-colour 32 x 32 images; `swap` renames classes (wrong labels on purpose)."""
    rng = np.random.default_rng(seed)
    images = {}
    for name, colour in COLOURS.items():
        folder = (swap or {}).get(name, name)
        for i in range(n):
            a = np.clip(np.array(colour) + rng.normal(0, 50, (32, 32, 3)), 0, 255).astype(np.uint8)
            images[f"{folder}/{i}.png"] = a
    return write_images(root, images)


def test_last_blocks_features_by_hand():
    model = tiny_vit(depth=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = model.prepare_tokens(x)
        outs = []
        for blk in model.blocks:
            t = blk(t)
            outs.append(model.norm(t))
        expected = torch.cat([outs[1][:, 0], outs[2][:, 0], outs[2][:, 1:].mean(1)], dim=1)
        torch.testing.assert_close(last_blocks_features(2, avgpool=True)(model, x), expected)
        torch.testing.assert_close(last_blocks_features(1)(model, x), model(x))


def test_probe_learns_the_labels_it_is_given(tmp_path, capsys):
    colour_folders(tmp_path / "train", 10, seed=0)
    colour_folders(tmp_path / "test", 5, seed=1)
    colour_folders(tmp_path / "test-swapped", 5, seed=1, swap={"red": "blue", "blue": "red"})
    base = ["linear", "--weights", "pixels", "--train", str(tmp_path / "train"), "--epochs", "30",
            "--lr", "0.1", "--probe-batch-size", "8", "--json", "--quiet"]
    code, right, err = run_cli(base + ["--test", str(tmp_path / "test")], capsys)
    assert code == 0, err
    assert right["top1"] == 100.0 and right["feature_dim"] == 32 * 32 * 3 and right["n_test"] == 15
    # Same images, red and blue labels exchanged: exactly those 10 of 15 are now wrong.
    code, swapped, err = run_cli(base + ["--test", str(tmp_path / "test-swapped")], capsys)
    assert code == 0, err
    assert swapped["top1"] == pytest.approx(100 * 5 / 15)


def test_vit_probe_fast_and_augmented(tmp_path, capsys):
    colour_folders(tmp_path / "train", 6, seed=0)
    colour_folders(tmp_path / "test", 3, seed=1)
    weights = save_vit(tiny_vit(), tmp_path / "vit.safetensors")
    base = ["linear", "--weights", str(weights), "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
            "--last-blocks", "2", "--avgpool", "--epochs", "40", "--lr", "1.0", "--probe-batch-size", "6",
            "--device", "cpu", "--json", "--quiet"]
    code, fast, err = run_cli(base, capsys)
    assert code == 0, err
    assert fast["features"] == "last2+avgpool" and fast["feature_dim"] == 3 * 48
    assert fast["train_top1"] == 100.0 and fast["top1"] >= 2 / 3 * 100  # colour survives a random ViT
    code, aug, err = run_cli(base + ["--augment", "--epochs", "3"], capsys)
    assert code == 0, err
    assert aug["augment"] and aug["n_train"] == 18 and aug["feature_dim"] == 144

    code, _, err = run_cli(base + ["--last-blocks", "5"], capsys)
    assert code == 2 and "between 1 and the model's depth 2" in err
