"""`dinokit export`: every format reloads (load_backbone, timm, transformers, onnxruntime) to the same features."""
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from dinokit.cli import main
from dinokit.models import DINOHead, MultiCropWrapper, convnet, load_backbone
from dinokit.models.export import TraceableViT, bicubic_matrix, export_backbone, onnx_max_difference
from dinokit.models.vit import VisionTransformer
from dinokit.models.weights import build_backbone, vit_arch_from_state_dict
from conftest import jitter, tiny_vit


def images(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def assert_same_features(source, loaded, shapes, atol=1e-4):
    assert type(loaded) is type(source) and not loaded.training
    for shape in shapes:
        x = images(*shape)
        torch.testing.assert_close(loaded(x), source(x), atol=atol, rtol=0)
        if isinstance(source, VisionTransformer):
            torch.testing.assert_close(loaded.forward_features(x), source.forward_features(x), atol=atol, rtol=0)


VIT_SHAPES = [(2, 3, 32, 32), (1, 3, 48, 40)]  # the native grid, and a resized position embedding


@pytest.mark.parametrize("fmt,name", [("safetensors", "backbone.safetensors"), ("official", "backbone.pth"),
                                      ("timm", "timm.pth"), ("timm", "timm.safetensors"), ("hf", "hf")])
def test_vit_export_reloads(tmp_path, fmt, name):
    model = tiny_vit()
    out = export_backbone(model, fmt, tmp_path / name)
    # 48 dims is no standard width: only safetensors (metadata) and hf (config.json) record the 3 heads.
    heads = 3 if fmt in ("official", "timm") else None
    assert_same_features(model, load_backbone(out, num_heads=heads), VIT_SHAPES)


def test_safetensors_records_the_architecture(tmp_path):
    model = tiny_vit()
    export_backbone(model, "safetensors", tmp_path / "vit.safetensors")
    with safe_open(str(tmp_path / "vit.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["dinokit_arch"]) == {"name": "vit", **model.arch()}
    resnet = jitter(convnet("resnet18"), 0)
    export_backbone(resnet, "safetensors", tmp_path / "resnet.safetensors")
    with safe_open(str(tmp_path / "resnet.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["dinokit_arch"]) == {"name": "resnet18"}
    assert_same_features(resnet, load_backbone(tmp_path / "resnet.safetensors"), [(2, 3, 64, 64)])


def test_official_export_is_a_bare_reference_state_dict(tmp_path):
    model = tiny_vit()
    export_backbone(model, "official", tmp_path / "dino.pth")
    sd = torch.load(tmp_path / "dino.pth", weights_only=True)
    assert list(sd) == list(model.state_dict())  # no module./backbone. prefixes, no head
    fresh = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    fresh.load_state_dict(sd, strict=True)  # what the reference does with its released backbone files
    assert_same_features(model, fresh.eval(), VIT_SHAPES)


def test_timm_loads_the_timm_export(tmp_path):
    timm = pytest.importorskip("timm")
    model = tiny_vit()
    export_backbone(model, "timm", tmp_path / "vit.safetensors")
    theirs = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    timm.models.load_checkpoint(theirs, str(tmp_path / "vit.safetensors"), strict=True)
    x = images(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), model(x), atol=1e-4, rtol=0)

    resnet = jitter(convnet("resnet18"), 0)
    export_backbone(resnet, "timm", tmp_path / "resnet18.pth")
    theirs = timm.create_model("resnet18", pretrained=False, num_classes=0)
    timm.models.load_checkpoint(theirs, str(tmp_path / "resnet18.pth"), strict=True)
    x = images(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), resnet(x), atol=1e-4, rtol=0)


def test_transformers_loads_the_hf_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_vit()
    export_backbone(model, "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "vit" and config["num_attention_heads"] == 3
    hf, info = transformers.ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False,
                                                     output_loading_info=True)
    assert not any(info.values()), info  # every tensor used, none missing
    x = images(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(pixel_values=x).last_hidden_state, model.forward_features(x),
                                   atol=1e-4, rtol=0)


def test_hf_export_refuses_convnets(tmp_path):
    with pytest.raises(ValueError, match="ViTs only"):
        export_backbone(convnet("resnet18"), "hf", tmp_path / "hf")


def test_bicubic_matrix_is_the_reference_resize():
    grid = torch.randn(1, 5, 7, 7)
    for n in (1, 3, 7, 8, 12):
        want = F.interpolate(grid, scale_factor=((n + 0.1) / 7, (n + 0.1) / 7), mode="bicubic")
        m = bicubic_matrix(n, 7)
        torch.testing.assert_close(m @ grid[0] @ m.T, want[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_traceable_vit_matches_the_model():
    model = tiny_vit()
    for shape in [(2, 3, 32, 32), (1, 3, 32, 40), (1, 3, 37, 33), (1, 3, 8, 64), (2, 3, 64, 64)]:
        x = images(*shape)
        torch.testing.assert_close(TraceableViT(model)(x), model(x), atol=1e-5, rtol=0)


def test_cli_exports_the_student_of_a_training_checkpoint(tmp_path, capsys):
    teacher, student = tiny_vit(1), tiny_vit(2)
    ckpt = {"teacher": MultiCropWrapper(teacher, DINOHead(48, 16, hidden_dim=8, bottleneck_dim=4)).state_dict(),
            "student": {f"module.{k}": v for k, v in
                        MultiCropWrapper(student, DINOHead(48, 16, hidden_dim=8, bottleneck_dim=4))
                        .state_dict().items()},
            "epoch": 3}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    for which, source in (("student", student), ("teacher", teacher)):
        out = tmp_path / f"{which}.safetensors"
        assert main(["export", "--weights", str(tmp_path / "checkpoint.pth"), "--which", which,
                     "--num-heads", "3", "--format", "safetensors", "--out", str(out)]) == 0
        assert_same_features(source, load_backbone(out), VIT_SHAPES)
    assert "wrote student backbone" in capsys.readouterr().out


def test_cli_onnx_vit_dynamic_batch_and_size(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = tiny_vit()
    export_backbone(model, "official", tmp_path / "vit.pth")
    out = tmp_path / "vit.onnx"
    assert main(["export", "--weights", str(tmp_path / "vit.pth"), "--num-heads", "3", "--format", "onnx",
                 "--out", str(out)]) == 0
    assert "onnxruntime vs PyTorch" in capsys.readouterr().out
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]  # B, 3, H, W
    shapes = [(1, 3, 32, 32), (3, 3, 32, 32), (2, 3, 48, 40), (1, 3, 37, 33), (1, 3, 8, 64), (1, 3, 96, 96)]
    assert onnx_max_difference(model, out, shapes) < 1e-3


def test_onnx_resnet(tmp_path):
    pytest.importorskip("onnxruntime")
    resnet = jitter(convnet("resnet18"), 0)
    out = export_backbone(resnet, "onnx", tmp_path / "resnet18.onnx", image_size=64)
    assert onnx_max_difference(resnet, out, [(2, 3, 64, 64), (1, 3, 96, 80)]) < 1e-3


@pytest.mark.parametrize("stem", ["conv", "conv-full", "conv-full-relu"])
def test_conv_stem_vit_reloads_from_safetensors_and_tensors_alone(tmp_path, stem):
    model = jitter(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, stem=stem), 0)
    assert model.patch_embed(images(1, 3, 32, 32)).shape == (1, 16, 48)  # the patchify grid: 4 x 4
    out = export_backbone(model, "safetensors", tmp_path / "stem.safetensors")
    assert_same_features(model, load_backbone(out), VIT_SHAPES)
    torch.save(model.state_dict(), tmp_path / "bare.pth")  # no recorded arch: the stem is read off the tensors
    bare = load_backbone(tmp_path / "bare.pth", num_heads=3)
    if stem == "conv-full-relu":  # tensors cannot show the activation: read as GELU's, the layout's other stem
        assert bare.stem == "conv-full"
        bare = build_backbone({"name": "vit", **vit_arch_from_state_dict(model.state_dict(), 3, stem)})
        bare.load_state_dict(model.state_dict())
        bare.eval()
    assert_same_features(model, bare, VIT_SHAPES)
    for fmt in ("official", "timm", "hf"):  # their ViTs have one patch projection
        with pytest.raises(ValueError, match="convolutional stem"):
            export_backbone(model, fmt, tmp_path / f"x.{fmt}")


def test_conv_stem_vit_onnx_on_sides_not_a_multiple_of_the_patch(tmp_path):
    """A conv stem makes ceil(side / patch) tokens a side; the ONNX graph must place them as the model does
    (ONNX's integer division truncates: a ceiling written as -(-s // p) came out a floor there)."""
    pytest.importorskip("onnxruntime")
    model = jitter(VisionTransformer(img_size=20, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                     stem="conv-full"), 0).eval()
    shapes = [(2, 3, 20, 20), (1, 3, 22, 22), (1, 3, 7, 50), (1, 3, 21, 18)]
    with torch.no_grad():
        for shape in shapes:
            x = images(*shape)
            torch.testing.assert_close(TraceableViT(model)(x), model(x), atol=1e-5, rtol=0)
    out = export_backbone(model, "onnx", tmp_path / "stem.onnx", image_size=20)
    assert onnx_max_difference(model, out, shapes) < 1e-4


def test_cli_refuses_existing_outputs_unless_forced(tmp_path, capsys):
    export_backbone(tiny_vit(), "official", tmp_path / "vit.pth")
    base = ["export", "--weights", str(tmp_path / "vit.pth"), "--num-heads", "3"]
    mine = tmp_path / "mine.safetensors"
    mine.write_text("user data")
    assert main(base + ["--format", "safetensors", "--out", str(mine)]) == 2
    assert "exists: pass --force" in capsys.readouterr().err and mine.read_text() == "user data"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("my config")
    assert main(base + ["--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert (tmp_path / "hf" / "config.json").read_text() == "my config"
    assert not (tmp_path / "hf" / "model.safetensors").exists()

    assert main(base + ["--format", "safetensors", "--out", str(mine), "--force"]) == 0
    assert_same_features(tiny_vit(), load_backbone(mine), VIT_SHAPES)
    assert main(base + ["--format", "hf", "--out", str(tmp_path / "hf"), "--force"]) == 0
    assert_same_features(tiny_vit(), load_backbone(tmp_path / "hf"), VIT_SHAPES)


def test_cli_never_exports_onto_the_weights_it_reads(tmp_path, capsys):
    ckpt = tmp_path / "ck.pt"
    torch.save({"teacher": MultiCropWrapper(tiny_vit(), DINOHead(48, 16, hidden_dim=8, bottleneck_dim=4))
                .state_dict(), "epoch": 3}, ckpt)
    before = ckpt.read_bytes()
    (tmp_path / "symlink.pt").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hardlink.pt")
    for out in (ckpt, os.path.relpath(ckpt), tmp_path / "symlink.pt", tmp_path / "hardlink.pt"):
        assert main(["export", "--weights", str(ckpt), "--num-heads", "3", "--format", "official",
                     "--out", str(out), "--force"]) == 2
        assert "would overwrite the --weights" in capsys.readouterr().err
    assert ckpt.read_bytes() == before
    export_backbone(tiny_vit(), "hf", tmp_path / "hf")  # a folder of weights, exported onto itself
    config = (tmp_path / "hf" / "config.json").read_text()
    assert main(["export", "--weights", str(tmp_path / "hf"), "--format", "hf", "--out", str(tmp_path / "hf"),
                 "--force"]) == 2
    assert (tmp_path / "hf" / "config.json").read_text() == config


@pytest.mark.parametrize("fmt,name", [("safetensors", "vit.safetensors"), ("official", "vit.pth"),
                                      ("timm", "timm.safetensors"), ("hf", "hf")])
def test_exported_files_follow_the_umask(tmp_path, fmt, name):
    old = os.umask(0o022)
    try:
        export_backbone(tiny_vit(), fmt, tmp_path / name)
    finally:
        os.umask(old)
    for f in ([tmp_path / name] if fmt != "hf" else list((tmp_path / name).iterdir())):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_a_failed_export_leaves_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "vit.pth"
    out.write_bytes(b"the previous export")

    def fails_midway(obj, f):
        Path(f).write_bytes(b"half a file")
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", fails_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        export_backbone(tiny_vit(), "official", out)
    assert out.read_bytes() == b"the previous export" and os.listdir(tmp_path) == ["vit.pth"]


def test_official_export_warns_when_the_head_count_will_not_read_back(tmp_path, capsys):
    """Width 48 with 3 heads: the official layout cannot say 3, and a reader infers 1 from the width."""
    model = tiny_vit(1)
    export_backbone(model, "safetensors", tmp_path / "w.safetensors")
    for fmt, name in (("official", "b.pth"), ("safetensors", "c.safetensors")):
        assert main(["export", "--weights", str(tmp_path / "w.safetensors"), "--format", fmt,
                     "--out", str(tmp_path / name)]) == 0
        err = capsys.readouterr().err
        assert ("does not record the head count: this ViT has 3 heads" in err) == (fmt == "official")
    assert load_backbone(tmp_path / "b.pth", num_heads=3).blocks[0].attn.num_heads == 3
