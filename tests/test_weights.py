"""Weight files: every supported layout round-trips into the same backbone; unsafe or broken files are refused."""
import argparse
import pickle

import pytest
import torch
import torchvision

from dinokit.models import DINOHead, MultiCropWrapper, UnsafeCheckpointError, load_backbone, safe_load, vit_small
from dinokit.models.vit import VisionTransformer
from conftest import jitter, tiny_vit
from dinokit.models.weights import hf_to_reference, reference_to_hf


@pytest.fixture(scope="module")
def small():
    return vit_small(patch_size=16).eval()  # random weights: built once for the whole file


def images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def assert_same_vit(source: VisionTransformer, loaded: torch.nn.Module, size: int, n: int = 2):
    assert isinstance(loaded, VisionTransformer) and loaded.arch() == source.arch()
    assert not loaded.training
    x = images(size, n)
    torch.testing.assert_close(loaded.forward_features(x), source.forward_features(x), atol=1e-5, rtol=0)


def test_backbone_pth(tmp_path):
    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    assert_same_vit(model, load_backbone(tmp_path / "backbone.pth", num_heads=3), 32)
    # The head count is not in the tensors: a wrong guess loads (same shapes) but computes something else.
    wrong = load_backbone(tmp_path / "backbone.pth")
    assert wrong.num_heads == 1
    assert not torch.allclose(wrong(images(32)), model(images(32)), atol=1e-3)


def test_vit_small_backbone_pth_infers_heads(tmp_path, small):
    torch.save(small.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    assert_same_vit(small, load_backbone(tmp_path / "dino_deitsmall16_pretrain.pth"), 224, n=1)


def official_checkpoint(teacher: VisionTransformer, student: VisionTransformer) -> dict:
    """The layout of the reference main_dino.py's checkpoint.pth (student DDP-wrapped, teacher not)."""
    def wrapped(backbone, seed):
        torch.manual_seed(seed)
        return MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, 64, hidden_dim=32, bottleneck_dim=16))
    s, t = wrapped(student, 1), wrapped(teacher, 2)
    optimizer = torch.optim.AdamW(s.parameters())
    s(images(32)).logits.sum().backward()
    optimizer.step()  # gives the optimizer state real tensors, as in a real checkpoint
    args = argparse.Namespace(arch="vit_small", patch_size=8, out_dim=64, norm_last_layer=True, lr=0.0005,
                              global_crops_scale=(0.4, 1.0), output_dir=".", dist_url="env://", seed=0)
    return {"student": {f"module.{k}": v for k, v in s.state_dict().items()}, "teacher": t.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": 7, "args": args, "fp16_scaler": None,
            "dino_loss": {"center": torch.randn(1, 64)}}


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_official_full_checkpoint(tmp_path, which):
    backbones = {"teacher": tiny_vit(seed=1), "student": tiny_vit(seed=2)}
    ckpt = official_checkpoint(backbones["teacher"], backbones["student"])
    assert any(k.startswith("module.backbone.") for k in ckpt["student"])
    assert any(k.startswith("head.") for k in ckpt["teacher"])
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    loaded = load_backbone(tmp_path / "checkpoint.pth", which=which, num_heads=3)
    assert_same_vit(backbones[which], loaded, 32)
    other = backbones["student" if which == "teacher" else "teacher"]
    assert not torch.allclose(loaded(images(32)), other(images(32)), atol=1e-3)


def test_official_checkpoint_without_the_requested_weights(tmp_path):
    torch.save({"teacher": tiny_vit().state_dict(), "epoch": 1}, tmp_path / "checkpoint.pth")
    with pytest.raises(KeyError, match="no 'student' weights"):
        load_backbone(tmp_path / "checkpoint.pth", which="student")


def test_timm_dino_vit(tmp_path, small):
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    theirs.load_state_dict(small.state_dict(), strict=True)  # our names are timm's
    x = images(224, n=1)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), small(x), atol=1e-5, rtol=0)  # timm: pooled final-norm CLS

    # timm's weights (plus a classifier, as in a fine-tuned timm checkpoint) load into ours.
    jitter(theirs, 3)
    sd = dict(theirs.state_dict(), **{"head.weight": torch.randn(10, 384), "head.bias": torch.randn(10)})
    torch.save(sd, tmp_path / "timm.pth")
    ours = load_backbone(tmp_path / "timm.pth")
    with torch.no_grad():
        assert not torch.allclose(theirs(x), small(x), atol=1e-3)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def hf_config(model: VisionTransformer):
    transformers = pytest.importorskip("transformers")
    a = model.arch()
    return transformers.ViTConfig(
        hidden_size=a["embed_dim"], num_hidden_layers=a["depth"], num_attention_heads=a["num_heads"],
        intermediate_size=int(a["embed_dim"] * a["mlp_ratio"]), patch_size=a["patch_size"],
        image_size=a["img_size"], layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")


def hf_vit(model: VisionTransformer, folder):
    """transformers' own ViTModel, reading our weights converted by `reference_to_hf` from a local folder."""
    from safetensors.torch import save_file
    from transformers import ViTModel
    hf_config(model).save_pretrained(folder)
    save_file(reference_to_hf(model.state_dict()), folder / "model.safetensors", metadata={"format": "pt"})
    hf, info = ViTModel.from_pretrained(folder, add_pooling_layer=False, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return hf.eval()


def test_hf_layout_matches_transformers(tmp_path):
    model = tiny_vit()
    sd = model.state_dict()
    back = hf_to_reference(reference_to_hf(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    hf = hf_vit(model, tmp_path)
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, model.forward_features(x),
                                   atol=1e-5, rtol=0)


def test_hf_save_pretrained_folder(tmp_path):
    model = tiny_vit()
    hf_vit(model, tmp_path / "converted").save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    # 48 dims is no standard size: the head count (3) must come from config.json.
    assert_same_vit(model, load_backbone(tmp_path / "hf"), 32)
    assert_same_vit(model, load_backbone(tmp_path / "hf" / "model.safetensors"), 32)


@pytest.mark.parametrize("names", ["hub", "in-memory", "classifier"])
def test_hf_pytorch_model_bin(tmp_path, names):
    model = tiny_vit()
    hf_config(model).save_pretrained(tmp_path)
    if names == "hub":  # the names of files on the Hub
        sd = reference_to_hf(model.state_dict())
    elif names == "in-memory":  # `torch.save(model.state_dict())`: transformers >= 5 names differ from files'
        sd = hf_vit(model, tmp_path / "converted").state_dict()
    else:  # ViTForImageClassification: the backbone under `vit.`, plus a classifier
        sd = {f"vit.{k}": v for k, v in reference_to_hf(model.state_dict()).items()}
        sd.update({"classifier.weight": torch.randn(5, 48), "classifier.bias": torch.randn(5)})
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert_same_vit(model, load_backbone(tmp_path), 32)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet(tmp_path, name):
    torch.manual_seed(0)
    reference = jitter(getattr(torchvision.models, name)(weights=None), 0)  # BatchNorm statistics included
    with_fc = reference.state_dict()
    torch.save(with_fc, tmp_path / "with-fc.pth")
    torch.save({k: v for k, v in with_fc.items() if not k.startswith("fc.")}, tmp_path / "no-fc.pth")
    reference.fc = torch.nn.Identity()
    x = images(64)
    for file in ("with-fc.pth", "no-fc.pth"):
        loaded = load_backbone(tmp_path / file)
        assert not loaded.training and isinstance(loaded.fc, torch.nn.Identity)
        assert type(loaded.layer1[0]) is type(reference.layer1[0])
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), reference(x), atol=1e-5, rtol=0)


class WritesAFile:
    """Unpickling this would create `path`: what a malicious checkpoint does."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle-2", "pickle-4"])
def test_refuses_pickle_that_runs_code(tmp_path, how):
    victim = tmp_path / "created-by-unpickling"
    payload = {"state_dict": tiny_vit().state_dict(), "trap": WritesAFile(victim)}
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=int(how[-1]))
    for load in (safe_load, load_backbone):
        with pytest.raises(UnsafeCheckpointError, match=r"refused.*io\.open") as e:
            load(path)
        assert "Nothing from it was executed" in str(e.value)
    assert not victim.exists()


class NotPlainArgs:
    lr = 0.1


def test_refuses_unknown_class_inside_official_checkpoint(tmp_path):
    ckpt = official_checkpoint(tiny_vit(1), tiny_vit(2))
    ckpt["args"] = NotPlainArgs()
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    with pytest.raises(UnsafeCheckpointError, match="NotPlainArgs"):
        load_backbone(tmp_path / "checkpoint.pth")


def test_broken_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(tiny_vit().state_dict(), good)
    data = good.read_bytes()
    cases = {
        "empty.pth": (b"", "empty or truncated"),
        "truncated.pth": (data[: len(data) // 2], "truncated or corrupt"),
        "text.pth": (b"this is not a checkpoint at all", "neither a PyTorch checkpoint nor a safetensors"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            load_backbone(tmp_path / name)
    for name, obj in {"list.pth": [1, 2], "tensor.pth": torch.zeros(3)}.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=f"holds a {type(obj).__name__}, not a state dict"):
            load_backbone(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no weight file"):
        load_backbone(tmp_path / "missing.pth")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        load_backbone(tmp_path / "empty-folder")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no ViT or ResNet backbone"):
        load_backbone(tmp_path / "other.pth")


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file
    save_file(tiny_vit().state_dict(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-100])  # the format is read from the bytes, not the name
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_backbone(tmp_path / "cut.bin")
