"""`dinokit finetune`: learning on a small labelled folder, exact resume after a hard kill, the recipe's parts
(layer-wise decay, from scratch, augmentation), its checkpoint read as any other weights, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from test_eval_common import save_vit, tiny_vit
from test_loop import write_fmnist_pngs

from dinokit import load_backbone
from dinokit.cli import main as cli_main
from dinokit.finetune.config import FinetuneConfig
from dinokit.finetune.data import Augment, Mixer, crop_size
from dinokit.finetune.loop import finetune
from dinokit.finetune.model import build_classifier, param_groups
from dinokit.models.weights import safe_load


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    write_fmnist_pngs(root / "train", "train", 480)
    write_fmnist_pngs(root / "test", "test", 300)
    weights = save_vit(tiny_vit(img_size=28, patch_size=4, embed_dim=48, depth=2, num_heads=3, stem="conv"),
                       root / "vit.safetensors")  # random weights: a convolutional stem learns fast from them
    return root, weights


def quick(weights, root, **changes) -> FinetuneConfig:
    return FinetuneConfig(weights=str(weights), train=str(root / "train"), device="cpu", precision="fp32",
                          **{"test": str(root / "test"), "batch_size": 32, "epochs": 20, "lr": 0.01, "warmup_epochs": 1,
                             "layer_decay": 1.0, "randaug_ops": 0, "crop_scale": [0.5, 1.0], "log_every": 5,
                             **changes})


def test_fine_tuning_a_small_folder_beats_chance(data, tmp_path):
    root, weights = data
    summary = finetune(quick(weights, root), tmp_path / "run", progress=False)  # 15 steps an epoch, 300 in all
    assert summary["finished"] and summary["step"] == 300 and summary["image_size"] == 28
    assert summary["n_test"] == 300 and summary["classes"] == 10
    assert summary["test_top1"] > 30, summary  # 10 classes: chance is 10% (measured: 48%)
    assert summary["test_top5"] > summary["test_top1"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows[:-1]] == list(range(5, 301, 5))
    assert rows[-1]["test_top1"] == summary["test_top1"]
    assert rows[-2]["loss"] < rows[0]["loss"] - 0.3  # it learned
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["resolved"]["image_size"] == 28 and saved["layer_decay"] == 1.0

    # its checkpoint is weights like any other: the backbone, without the head, through load_backbone and export
    ckpt = safe_load(tmp_path / "run" / "checkpoint.pt")
    backbone = load_backbone(tmp_path / "run" / "checkpoint.pt")
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, ckpt["model"][f"backbone.{k}"]), k
    assert not torch.equal(backbone.state_dict()["blocks.0.attn.qkv.weight"],
                           load_backbone(weights).state_dict()["blocks.0.attn.qkv.weight"])  # it was trained
    out = tmp_path / "export.safetensors"
    assert cli_main(["export", "--weights", str(tmp_path / "run" / "checkpoint.pt"), "--format", "safetensors",
                     "--out", str(out)]) == 0
    x = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(load_backbone(out)(x), backbone(x))


def run_cli(args, kill_at=None):
    env = dict(os.environ)  # same threads as this process's reference run: same rounding
    env.pop("DINOKIT_TEST_KILL_AT", None)
    if kill_at:
        env["DINOKIT_TEST_KILL_AT"] = kill_at  # the crash hook of dinokit.train.checkpoint
    return subprocess.run([sys.executable, "-m", "dinokit", "finetune", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_resume_after_a_kill_is_bit_identical(data, tmp_path):
    root, weights = data
    # every random stream on: drop path, RandAugment, MixUp and CutMix; 15 steps an epoch, 2 epochs
    recipe = dict(epochs=2, save_every_steps=4, log_every=1, mixup=0.8, cutmix=1.0, drop_path=0.2, randaug_ops=2,
                  layer_decay=0.75, lr=0.004, crop_scale=[0.25, 1.0])
    reference = finetune(quick(weights, root, **recipe, test=""), tmp_path / "reference", progress=False)
    assert reference["step"] == 30
    args = ["--weights", str(weights), "--train", str(root / "train"), "--out", str(tmp_path / "run"),
            "--device", "cpu", "--precision", "fp32", "--batch-size", "32", "--lr", "0.004", "--warmup-epochs", "1",
            "--epochs", "2", "--save-every-steps", "4", "--log-every", "1", "--mixup", "0.8", "--cutmix", "1.0",
            "--drop-path", "0.2", "--randaug-ops", "2", "--layer-decay", "0.75", "--crop-scale", "0.25", "1",
            "--no-progress"]
    r = run_cli(args, kill_at="step:11")  # mid-run: after step 11's update, 3 steps past the checkpoint
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert safe_load(tmp_path / "run" / "checkpoint.pt")["dinokit"]["step"] == 8
    r = run_cli(args + ["--resume"], kill_at="write:16")  # half-way through writing a checkpoint
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "resumed from step 8" in r.stderr
    r = run_cli(args + ["--resume", "--json"])
    assert r.returncode == 0, r.stderr
    assert "resumed from step 12" in r.stderr and json.loads(r.stdout.splitlines()[-1])["step"] == 30
    final, expected = (safe_load(tmp_path / d / "checkpoint.pt") for d in ("run", "reference"))
    for k, v in expected["model"].items():
        assert torch.equal(final["model"][k], v), k
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))  # steps run twice are logged once
    reference_rows = (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
    assert [r["loss"] for r in rows] == [json.loads(line)["loss"] for line in reference_rows]


def test_layer_wise_decay_and_what_gets_weight_decay(data):
    _, weights = data
    model = build_classifier(str(weights), num_classes=5)
    scale, decay = {}, {}
    for group in param_groups(model, weight_decay=0.05, layer_decay=0.5):
        for p in group["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            scale[name], decay[name] = group["lr_scale"], group["weight_decay"]
    assert len(scale) == len(list(model.parameters()))
    # depth 2: embeddings are layer 0, block i layer i + 1, the final norm and the head layer 3
    for name, expected in (("backbone.pos_embed", 0.125), ("backbone.patch_embed.proj.weight", 0.125),
                           ("backbone.blocks.0.mlp.fc1.weight", 0.25), ("backbone.blocks.1.attn.qkv.bias", 0.5),
                           ("backbone.norm.weight", 1.0), ("head.weight", 1.0)):
        assert scale[name] == expected, name
    for name in ("backbone.cls_token", "backbone.pos_embed", "backbone.blocks.0.norm1.weight", "head.bias"):
        assert decay[name] == 0.0, name
    assert decay["backbone.blocks.1.mlp.fc2.weight"] == decay["head.weight"] == 0.05


def test_from_scratch_keeps_the_architecture_not_the_weights(data):
    _, weights = data
    pretrained = load_backbone(weights).state_dict()
    tuned = build_classifier(str(weights), 3, drop_path=0.1).backbone
    scratch = build_classifier(str(weights), 3, from_scratch=True).backbone
    assert tuned.state_dict().keys() == scratch.state_dict().keys() == pretrained.keys()
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in pretrained.items())
    assert not torch.equal(scratch.state_dict()["blocks.1.mlp.fc1.weight"], pretrained["blocks.1.mlp.fc1.weight"])
    assert [b.drop_path.drop_prob for b in tuned.blocks] == pytest.approx([0.0, 0.1])  # deeper blocks drop more


def test_augmentation_is_seeded_per_sample_and_mixing_per_step():
    images = torch.randint(0, 256, (6, 3, 28, 28), dtype=torch.uint8)
    aug = Augment(size=20, seed=3, crop_scale=(0.25, 1.0))
    a = aug.geometric(images, torch.arange(6), epoch=1)[0]
    b = aug.geometric(images[[4, 5]], torch.tensor([4, 5]), epoch=1)[0]  # the same samples in another batch
    assert a.shape == (6, 3, 20, 20) and a.dtype == torch.uint8 and torch.equal(a[4:], b)
    assert not torch.equal(a, aug.geometric(images, torch.arange(6), epoch=2)[0])  # a new epoch: new draws
    mixer = Mixer(num_classes=4, seed=0, mixup=0.8, cutmix=1.0)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    state = torch.get_rng_state()
    mixed, targets = mixer(x, y, step=7)
    assert torch.equal(torch.get_rng_state(), state)  # the model's draws are left alone
    assert targets.shape == (6, 4) and torch.allclose(targets.sum(1), torch.ones(6))
    again = mixer(x, y, step=7)
    assert torch.equal(mixed, again[0]) and torch.equal(targets, again[1])
    assert crop_size(500, 20) == 224 and crop_size(28, 20) == 20 and crop_size(28, None) == 28


def test_bad_input_gets_clear_errors(data, tmp_path, capsys):
    root, weights = data
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"{i}.png").write_bytes((root / "train" / "class0").glob("*.png").__next__().read_bytes())
    other = tmp_path / "other" / "unicorn"
    other.mkdir(parents=True)
    (other / "a.png").write_bytes((flat / "0.png").read_bytes())
    base = ["finetune", "--weights", str(weights), "--device", "cpu", "--no-progress"]
    cases = [
        (["--train", str(flat), "--out", str(tmp_path / "a")], "no labels"),
        (["--train", str(root / "train"), "--test", str(tmp_path / "other"), "--out", str(tmp_path / "b")],
         "classes the training set lacks: unicorn"),
        (["--train", str(root / "train"), "--out", str(tmp_path / "c"), "--layer-decay", "0"], "layer_decay"),
        (["--train", str(root / "train"), "--out", str(tmp_path / "d"), "--batch-size", "1000"], "fewer than one batch"),
        (["--train", str(root / "nope"), "--out", str(tmp_path / "e")], "does not exist"),
    ]
    for args, message in cases:
        assert cli_main(base + args) == 2, args
        err = capsys.readouterr().err
        assert "dinokit finetune: error:" in err and message in err, (args, err)
    assert cli_main(["finetune", "--weights", str(tmp_path / "none.pt"), "--train", str(root / "train"),
                     "--out", str(tmp_path / "f")]) == 2
    assert "no such file" in capsys.readouterr().err
    dino_run = tmp_path / "dino"
    dino_run.mkdir()
    torch.save({"student": {}, "teacher": {}, "optimizer": {}, "dino_loss": {}, "dinokit": {"step": 1}},
               dino_run / "checkpoint.pt")
    assert cli_main(base + ["--train", str(root / "train"), "--out", str(dino_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli_main(base + ["--train", str(root / "train"), "--out", str(dino_run), "--resume"]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err  # a DINO run lacks a fine-tuning run's state
    assert not any((tmp_path / name).exists() for name in "abcdef")  # nothing was written


def test_sigterm_saves_and_stops_and_a_time_budget_ends_on_time(data, tmp_path):
    root, weights = data
    run = tmp_path / "run"
    args = [sys.executable, "-m", "dinokit", "finetune", "--weights", str(weights), "--train", str(root / "train"),
            "--test", str(root / "test"), "--out", str(run), "--device", "cpu", "--batch-size", "32", "--epochs", "100",
            "--log-every", "1", "--save-every-steps", "1000", "--no-progress", "--json"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = run / "metrics.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM: saving a checkpoint" in err, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["stopped_by_signal"] and "test_top1" not in summary  # stopped: no test
    assert safe_load(run / "checkpoint.pt")["dinokit"]["step"] == summary["step"] >= 3

    summary = finetune(quick(weights, root, test=""), tmp_path / "budget", time_budget=8, progress=False)
    assert summary["finished"] and summary["seconds"] < 8
    saved = yaml.safe_load((tmp_path / "budget" / "config.yaml").read_text())
    assert saved["resolved"]["total_steps"] == summary["total_steps"] == summary["step"]
