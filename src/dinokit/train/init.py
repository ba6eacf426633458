"""`dinokit train --init WEIGHTS [--init-head]`: start a run from pretrained weights instead of random ones.

With a backbone (any format `load_backbone` reads: the paper's, timm's, Hugging Face's, ours), student and
teacher both start from it and the head is fresh. With `--init-head` and a full training checkpoint (the
paper's `checkpoint.pth`, or a dinokit run's), the student and teacher each take their own backbone and head,
and the teacher's center: the self-supervised training goes on from where that run was. The optimizer state
stays fresh, unless the checkpoint is a dinokit run's with the same parameter shapes and optimizer.
Every mismatch (patch size, width, depth, K, ...) is refused before anything runs, with its name.
"""
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.weights import backbone_weights, read_weight_file


@dataclass
class InitWeights:
    path: str
    student: dict  # backbone tensors, reference names
    teacher: dict
    student_head: dict | None = None  # head tensors (with --init-head)
    teacher_head: dict | None = None
    center: torch.Tensor | None = None
    optimizer: dict | None = None


def head_weights(obj: dict, which: str) -> dict:
    """The projection head's tensors of a full checkpoint's student or teacher, named as DINOHead names them."""
    sd = obj[which]
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        if k.startswith("head.") and isinstance(v, torch.Tensor):
            out[k[len("head."):]] = v
    return out


def differences(expected: dict, found: dict, names: dict) -> list[str]:
    return [f"{label}: the weights have {found.get(key)}, the configuration {expected.get(key)}"
            for key, label in names.items() if key in found and expected.get(key) != found.get(key)]


def read_init(path: str, cfg, with_head: bool = False) -> InitWeights:
    """Read and check `path` against a training `Config`; ValueError naming every mismatch."""
    if not Path(path).exists():
        raise FileNotFoundError(f"--init {path}: no such file or folder")
    obj, hf_config = read_weight_file(path)
    has_both = isinstance(obj.get("student"), dict) and isinstance(obj.get("teacher"), dict)
    if with_head and not has_both:
        raise ValueError(f"--init-head needs a full training checkpoint (student and teacher with their heads); "
                         f"{path} holds a backbone only")
    expected = cfg.backbone_arch()
    # a bare state dict cannot show its heads or its conv stem's activation: the configuration's then
    heads = expected.get("num_heads")
    teacher, arch = backbone_weights(obj, "teacher", heads, hf_config, str(path), expected.get("stem"))
    student = backbone_weights(obj, "student", heads, hf_config, str(path))[0] if with_head else teacher
    if arch.get("name") == "vit":
        arch = {"stem": "patch", **arch}
    problems = differences(expected, arch, {"name": "backbone", "patch_size": "patch size",
                                            "embed_dim": "embedding width", "depth": "depth",
                                            "num_heads": "attention heads", "stem": "patch embedding stem"})
    if arch.get("name") == "vit" == expected["name"]:  # compared as hidden widths: a ratio is a float
        hidden = [int(a.get("embed_dim", 0) * a.get("mlp_ratio", 4.0)) for a in (arch, expected)]
        if hidden[0] != hidden[1]:
            problems.append(f"MLP hidden width: the weights have {hidden[0]}, the configuration {hidden[1]} "
                            f"(mlp_ratio {expected['mlp_ratio']})")
    init = InitWeights(str(path), student, teacher)
    if with_head:
        init.student_head, init.teacher_head = head_weights(obj, "student"), head_weights(obj, "teacher")
        problems += head_differences(init.teacher_head, cfg)
        center = (obj.get("dino_loss") or {}).get("center")
        if isinstance(center, torch.Tensor) and center.shape == (1, cfg.out_dim):
            init.center = center
        saved = (obj.get("dinokit") or {}).get("config")
        if isinstance(saved, dict) and same_shapes(saved, cfg):
            init.optimizer = obj.get("optimizer")
    if problems:
        raise ValueError(f"--init {path} does not fit this run's configuration:\n  " + "\n  ".join(problems))
    return init


def head_differences(head: dict, cfg) -> list[str]:
    """What differs between a checkpoint's head and the head `cfg` builds, by name."""
    if "last_layer.weight_v" not in head:
        return ["head: the checkpoint's teacher has no DINO head (last_layer.weight_v)"]
    linear = sorted((int(k.split(".")[1]), v.shape) for k, v in head.items()
                    if k.startswith("mlp.") and k.endswith(".weight") and v.ndim == 2)
    found = {"out_dim": head["last_layer.weight_v"].shape[0], "bottleneck_dim": head["last_layer.weight_v"].shape[1],
             "head_hidden_dim": linear[0][1][0] if len(linear) > 1 else None,
             "use_bn_in_head": any(k.endswith("running_mean") for k in head)}
    expected = {"out_dim": cfg.out_dim, "bottleneck_dim": cfg.bottleneck_dim,
                "head_hidden_dim": cfg.head_hidden_dim if len(linear) > 1 else None,
                "use_bn_in_head": cfg.use_bn_in_head}
    return differences(expected, found, {"out_dim": "K (out_dim)", "bottleneck_dim": "head bottleneck",
                                         "head_hidden_dim": "head hidden width", "use_bn_in_head": "head BatchNorm"})


def same_shapes(saved: dict, cfg) -> bool:
    """Whether a dinokit run's saved configuration builds the same parameters and optimizer as `cfg`."""
    keys = ("arch", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "stem", "out_dim",
            "head_hidden_dim", "bottleneck_dim", "norm_last_layer", "use_bn_in_head", "optimizer", "global_crop_size")
    # a key missing from a configuration saved before it existed had its default then (mlp_ratio: the paper's 4)
    defaults = {f.name: f.default for f in fields(cfg)}
    mask_token = lambda c: (c.get("patch_loss_weight", 0) if isinstance(c, dict) else c.patch_loss_weight) > 0
    return all(saved.get(k, defaults[k]) == getattr(cfg, k) for k in keys) and mask_token(saved) == mask_token(cfg)


def resize_pos_embed(sd: dict, model: torch.nn.Module) -> dict:
    """Position embeddings made for another image size, resampled (bicubic) to the model's grid."""
    want = getattr(model, "pos_embed", None)
    have = sd.get("pos_embed")
    if want is None or have is None or have.shape == want.shape:
        return sd
    old, new = int(round((have.shape[1] - 1) ** 0.5)), int(round((want.shape[1] - 1) ** 0.5))
    grid = have[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return {**sd, "pos_embed": torch.cat([have[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], 1)}


@torch.no_grad()
def apply_init(student: torch.nn.Module, teacher: torch.nn.Module, init: InitWeights):
    """Load `init`'s backbones (and heads) into freshly built student and teacher wrappers, before they are
    moved, compiled or sharded. The center and the optimizer state are the trainer's to take."""
    student.backbone.load_state_dict(resize_pos_embed(init.student, student.backbone), strict=True)
    teacher.backbone.load_state_dict(resize_pos_embed(init.teacher, teacher.backbone), strict=True)
    if init.student_head is not None:
        student.head.load_state_dict(init.student_head, strict=True)
        teacher.head.load_state_dict(init.teacher_head, strict=True)
    else:  # a fresh head, the same in both
        teacher.head.load_state_dict(student.head.state_dict())


def describe(init: InitWeights) -> str:
    parts = ["backbones"] + (["heads"] if init.student_head is not None else []) + \
        (["center"] if init.center is not None else []) + (["optimizer state"] if init.optimizer is not None else [])
    return f"initialised from {init.path}: {', '.join(parts)}"
