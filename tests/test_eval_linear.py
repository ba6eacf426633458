"""`dinokit linear`: the probe's features by hand, its training pieces (rate selection, standardisation), and the
command end to end on small folders."""
import numpy as np
import pytest
import torch

from dinokit.cli import main as cli_main
from dinokit.eval.features import last_blocks_features
from dinokit.eval.linear import LR_GRID, new_classifier, select_lr, standardizer, train_heads, train_probe
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
        # One block with the average: interleaved feature by feature, the paper's layout.
        interleaved = torch.stack([outs[2][:, 0], outs[2][:, 1:].mean(1)], dim=2).reshape(2, -1)
        torch.testing.assert_close(last_blocks_features(1, avgpool=True)(model, x), interleaved)
        torch.testing.assert_close(interleaved[0, :2], torch.stack([outs[2][0, 0, 0], outs[2][0, 1:, 0].mean()]))


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


def test_default_last_blocks_fit_a_depth_3_model(tmp_path, capsys):
    colour_folders(tmp_path / "train", 6, seed=0)
    colour_folders(tmp_path / "test", 3, seed=1)
    weights = save_vit(tiny_vit(depth=3), tmp_path / "vit3.safetensors")
    argv = ["linear", "--weights", str(weights), "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
            "--epochs", "5", "--device", "cpu", "--json", "--quiet"]
    code, result, err = run_cli(argv, capsys)
    assert code == 0, err
    assert result["features"] == "last3" and result["last_blocks"] == 3 and result["feature_dim"] == 3 * 48
    code = cli_main(argv[:-2])  # the human-readable lines say where the 3 comes from
    assert code == 0 and "--last-blocks 3: min(4, the model's depth 3)" in capsys.readouterr().out


def test_lr_selection_never_sees_the_test_set(tmp_path, capsys):
    colour_folders(tmp_path / "train", 10, seed=0)
    colour_folders(tmp_path / "test", 5, seed=1)
    colour_folders(tmp_path / "test-swapped", 5, seed=1, swap={"red": "blue", "blue": "red"})
    base = ["linear", "--weights", "pixels", "--train", str(tmp_path / "train"), "--epochs", "20",
            "--probe-batch-size", "8", "--json", "--quiet"]
    code, right, err = run_cli(base + ["--test", str(tmp_path / "test")], capsys)
    assert code == 0, err
    code, swapped, err = run_cli(base + ["--test", str(tmp_path / "test-swapped")], capsys)
    assert code == 0, err
    # Same choice from the same training set, whatever the test labels; the test score alone moves.
    assert right["lr_selection"] == swapped["lr_selection"] and right["base_lr"] == swapped["base_lr"]
    assert set(right["lr_selection"]) == {f"{lr:g}" for lr in LR_GRID}
    assert right["train_top1"] == swapped["train_top1"] == 100.0
    assert right["top1"] == 100.0 and swapped["top1"] == pytest.approx(100 * 5 / 15)


def test_heads_train_exactly_like_separate_probes():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    lrs = [0.01, 0.5]
    torch.manual_seed(1)
    heads = new_classifier(6, 3 * len(lrs))
    alone = []
    for i, lr in enumerate(lrs):
        single = new_classifier(6, 3)
        with torch.no_grad():
            single.weight.copy_(heads.weight[3 * i:3 * i + 3])
            single.bias.copy_(heads.bias[3 * i:3 * i + 3])
        train_probe(single, lambda epoch: (feats, labels), lr, 7, 16, torch.Generator().manual_seed(2))
        alone.append(single)
    train_heads(heads, feats, labels, lrs, 7, 16, torch.Generator().manual_seed(2))
    for i, single in enumerate(alone):
        torch.testing.assert_close(heads.weight[3 * i:3 * i + 3], single.weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(heads.bias[3 * i:3 * i + 3], single.bias, atol=1e-6, rtol=1e-5)


def test_select_lr_prefers_the_rate_that_learns():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200,), generator=g)
    feats = torch.randn(200, 4, generator=g) + 2.0 * labels[:, None]  # separable with a margin
    best, scores = select_lr(feats, labels, 2, base_lrs=(1e-7, 3.0), epochs=3, batch_size=16)
    assert best == 3.0 and scores[3.0] > 90 and set(scores) == {1e-7, 3.0}


def test_standardised_probe_ignores_the_features_scale():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    weights = []
    for f in (feats, 1000.0 * feats + 7.0):
        torch.manual_seed(3)
        linear = new_classifier(5, 3)
        train_probe(linear, lambda epoch: (standardizer(f)(f), labels), 0.1, 5, 16, torch.Generator().manual_seed(4))
        weights.append(linear.weight.detach())
    torch.testing.assert_close(weights[0], weights[1], atol=1e-4, rtol=1e-4)


def test_the_probe_uses_one_thread_for_narrow_features_and_every_core_for_wide_ones(monkeypatch):
    """Small matmuls on a busy 2-core machine lose most of their time to synchronisation; wide ones (raw
    pixels of larger images) gain from every core, busy or not (BENCHMARKS.md)."""
    import dinokit.eval.linear as linear
    seen = []
    monkeypatch.setattr(linear, "train_epoch", lambda *a, **k: seen.append(torch.get_num_threads()) or 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for width in (288, linear.WIDE_FEATURES):
            feats, labels = torch.zeros(4, width), torch.zeros(4, dtype=torch.long)
            train_probe(new_classifier(width, 2), lambda epoch: (feats, labels), 0.1, 1, 4, torch.Generator())
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
