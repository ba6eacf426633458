"""`dinokit train --init WEIGHTS [--init-head]`: starting from pretrained weights of every format, round trips,
and mismatches refused with their names before anything runs."""
import json

import pytest
import torch
import yaml

from dinokit.cli import main as cli_main
from dinokit.models import DINOHead, MultiCropWrapper, VisionTransformer, load_backbone
from dinokit.models.weights import safe_load
from dinokit.train.config import Config
from dinokit.train.init import read_init
from dinokit.train.loop import train
from dinokit.train.step import Trainer
from test_loop import TINY, write_fmnist_pngs

# TINY's shapes: ViT patch 4, width 32, depth 2, 2 heads, 16-pixel global crops; head 48 / 16 -> K 64.
CFG = {**TINY, "drop_path_rate": 0.0}
CPU = torch.device("cpu")


def tiny_vit(seed: int, **changes) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**{"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                **changes})


def wrapped(backbone, seed, out_dim=64):
    torch.manual_seed(seed)
    return MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, out_dim, hidden_dim=48, bottleneck_dim=16))


def paper_checkpoint(path, student, teacher, center):
    """The layout of the paper's main_dino.py checkpoint.pth: the student DDP-wrapped, the teacher not."""
    torch.save({"student": {f"module.{k}": v for k, v in student.state_dict().items()},
                "teacher": teacher.state_dict(), "optimizer": {}, "epoch": 3, "dino_loss": {"center": center}}, path)
    return path


def views(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)] + \
           [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


@torch.no_grad()
def test_init_head_from_a_paper_checkpoint_gives_its_student_and_teacher_outputs(tmp_path):
    student, teacher = wrapped(tiny_vit(1), 3), wrapped(tiny_vit(2), 4)
    center = torch.randn(1, 64)
    path = paper_checkpoint(tmp_path / "checkpoint.pth", student, teacher, center)
    cfg = Config(**CFG).validate()
    trainer = Trainer(cfg, CPU, 4, 8, init=read_init(str(path), cfg, with_head=True))
    x = views()
    for ours, theirs in ((trainer.student, student), (trainer.teacher, teacher)):
        ours.eval(), theirs.eval()
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=0, atol=0)
    torch.testing.assert_close(trainer.dino_loss.center, center)
    assert not torch.allclose(trainer.student(x).logits, trainer.teacher(x).logits)  # each its own


@torch.no_grad()
def test_init_from_a_backbone_starts_both_from_it_with_a_fresh_head(tmp_path):
    backbone = tiny_vit(5)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")  # the paper's released backbone files
    cfg = Config(**CFG).validate()
    trainer = Trainer(cfg, CPU, 4, 8, init=read_init(str(tmp_path / "backbone.pth"), cfg))
    x = torch.randn(3, 3, 16, 16)
    for model in (trainer.student, trainer.teacher):
        torch.testing.assert_close(model.backbone.eval()(x), backbone.eval()(x), rtol=0, atol=0)
    for a, b in zip(trainer.student.head.state_dict().values(), trainer.teacher.head.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="--init-head needs a full training checkpoint"):
        read_init(str(tmp_path / "backbone.pth"), cfg, with_head=True)


@torch.no_grad()
def test_init_from_a_timm_state_dict_matches_the_backbone(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2,
                                                             num_heads=2, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    cfg = Config(**CFG).validate()
    trainer = Trainer(cfg, CPU, 4, 8, init=read_init(str(tmp_path / "timm.pth"), cfg))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(trainer.teacher.backbone.eval()(x), load_backbone(tmp_path / "timm.pth", num_heads=2)(x),
                               rtol=0, atol=0)
    torch.testing.assert_close(trainer.teacher.backbone(x), model.eval().forward_features(x)[:, 0], rtol=0, atol=1e-5)


def test_position_embeddings_for_another_image_size_are_resampled(tmp_path):
    torch.save(tiny_vit(6, img_size=32).state_dict(), tmp_path / "at32.pth")  # a 8 x 8 grid for our 4 x 4
    cfg = Config(**CFG).validate()
    trainer = Trainer(cfg, CPU, 4, 8, init=read_init(str(tmp_path / "at32.pth"), cfg))
    assert trainer.student.backbone.pos_embed.shape == (1, 17, 32)


def test_mismatches_are_refused_with_their_names_before_anything_runs(tmp_path, capsys):
    cfg = Config(**CFG).validate()
    torch.save(tiny_vit(7, patch_size=8, embed_dim=48, num_heads=3).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"patch size: the weights have 8, the configuration 4(.|\n)*"
                                         r"embedding width: the weights have 48, the configuration 32"):
        read_init(str(tmp_path / "other.pth"), cfg)
    student, teacher = wrapped(tiny_vit(1), 3, out_dim=128), wrapped(tiny_vit(2), 4, out_dim=128)
    paper_checkpoint(tmp_path / "k128.pth", student, teacher, torch.zeros(1, 128))
    with pytest.raises(ValueError, match=r"K \(out_dim\): the weights have 128, the configuration 64"):
        read_init(str(tmp_path / "k128.pth"), cfg, with_head=True)
    read_init(str(tmp_path / "k128.pth"), cfg)  # the backbone alone fits: the head is fresh anyway

    # Through the command line: one clear line, and no run folder.
    data = write_fmnist_pngs(tmp_path / "data", "train", 16)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(CFG))
    out = tmp_path / "run"
    code = cli_main(["train", "--data", str(data), "--out", str(out), "--config", str(tmp_path / "tiny.yaml"),
                     "--init", str(tmp_path / "k128.pth"), "--init-head", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "K (out_dim): the weights have 128, the configuration 64" in err and "Traceback" not in err
    assert not out.exists()
    assert cli_main(["train", "--data", str(data), "--out", str(out), "--init-head", "--no-progress"]) == 2
    assert "--init-head goes with --init" in capsys.readouterr().err


def test_a_run_continues_from_a_dinokit_checkpoint_with_its_optimizer(tmp_path):
    data = write_fmnist_pngs(tmp_path / "data", "train", 32)
    cfg = Config(**CFG, data=str(data)).validate()
    train(cfg, tmp_path / "first", max_steps=3, progress=False)
    first = safe_load(tmp_path / "first" / "checkpoint.pt")
    init = read_init(str(tmp_path / "first" / "checkpoint.pt"), cfg, with_head=True)
    assert init.optimizer is not None  # ours, the same shapes: the optimizer state comes too
    assert read_init(str(tmp_path / "first" / "checkpoint.pt"), Config(**{**CFG, "optimizer": "sgd"}).validate(),
                     with_head=True).optimizer is None
    summary = train(cfg, tmp_path / "second", max_steps=1, progress=False, init=init)
    assert summary["step"] == 1  # a new run: its own schedule, from step 0
    resolved = yaml.safe_load((tmp_path / "second" / "config.yaml").read_text())["resolved"]
    assert resolved["init"] == str(tmp_path / "first" / "checkpoint.pt") and resolved["init_head"] is True
    second = safe_load(tmp_path / "second" / "checkpoint.pt")
    # step 0 runs at lr 0 (the warm-up), so the student is the first run's, and the teacher moved toward it
    for k, v in first["student"].items():
        torch.testing.assert_close(second["student"][k], v, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "second" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_the_mlp_ratio_is_a_configuration_key_that_checkpoints_carry_and_init_checks(tmp_path):
    data = write_fmnist_pngs(tmp_path / "data", "train", 16)
    cfg = Config(**CFG, mlp_ratio=2.0, data=str(data)).validate()
    train(cfg, tmp_path / "run", max_steps=2, progress=False)
    model = load_backbone(tmp_path / "run" / "checkpoint.pt")
    assert model.blocks[0].mlp.fc1.out_features == 64 and model.arch()["mlp_ratio"] == 2.0  # width 32 x 2
    assert read_init(str(tmp_path / "run" / "checkpoint.pt"), cfg, with_head=True).optimizer is not None
    # the paper's ratio, 4, against weights of ratio 2: refused with the widths named
    with pytest.raises(ValueError, match=r"MLP hidden width: the weights have 64, the configuration 128"):
        read_init(str(tmp_path / "run" / "checkpoint.pt"), Config(**CFG).validate())
    # a bare state dict shows its ratio in its tensors
    torch.save(tiny_vit(3, mlp_ratio=2.0).state_dict(), tmp_path / "bare.pth")
    read_init(str(tmp_path / "bare.pth"), cfg)
    with pytest.raises(ValueError, match="mlp_ratio"):
        Config(**CFG, mlp_ratio=0.01).validate()  # 0.32 of a hidden unit


def test_the_stems_activation_rides_with_a_checkpoint_and_a_bare_state_dict_takes_the_configurations(tmp_path):
    """`conv-full` and `conv-full-relu` share their tensors: a checkpoint names its stem and `--init` holds
    the configuration to it; a bare state dict cannot show the activation, so the configuration's is taken."""
    data = write_fmnist_pngs(tmp_path / "data", "train", 16)
    relu = Config(**CFG, stem="conv-full-relu", data=str(data)).validate()
    train(relu, tmp_path / "run", max_steps=2, progress=False)
    model = load_backbone(tmp_path / "run" / "checkpoint.pt")
    assert model.arch()["stem"] == "conv-full-relu"
    assert any(isinstance(m, torch.nn.ReLU) for m in model.patch_embed.modules())
    assert not any(isinstance(m, torch.nn.GELU) for m in model.patch_embed.modules())
    with pytest.raises(ValueError, match="patch embedding stem"):
        read_init(str(tmp_path / "run" / "checkpoint.pt"), Config(**CFG, stem="conv-full").validate())
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    init = read_init(str(tmp_path / "bare.pth"), relu)
    torch.testing.assert_close(init.teacher, model.state_dict())
    with pytest.raises(ValueError, match="patch embedding stem"):  # the layouts differ: seen in the tensors
        read_init(str(tmp_path / "bare.pth"), Config(**CFG, stem="conv").validate())
