"""The fine-tuned network: a backbone that `load_backbone` reads and a new linear head, and its optimiser's
parameter groups with layer-wise learning-rate decay.

Its state dict is the backbone's under `backbone.` and the head's under `head.`: `load_backbone` reads a
fine-tuning checkpoint as it reads any other (the head is left out), so `dinokit export`, `knn` and the rest
take it as they are.
"""
import re

import torch
from torch import nn

from ..models.vit import VisionTransformer
from ..models.weights import backbone_arch, build_backbone, load_backbone


class Classifier(nn.Module):
    """Backbone features (a ViT's final-norm [CLS], a convnet's pooled output) -> class scores.

    >>> from dinokit.models.vit import VisionTransformer
    >>> net = Classifier(VisionTransformer(16, 4, embed_dim=32, depth=2, num_heads=2), num_classes=10)
    >>> net(torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 10])
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # DeiT's initialisation of its head
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_classifier(weights: str, num_classes: int, which: str = "teacher", from_scratch: bool = False,
                     drop_path: float = 0.0) -> Classifier:
    """The backbone of `weights` (its architecture; its weights too unless `from_scratch`), with drop path
    (ViTs), and a new head. The random draws come from torch's global generator: seed it first."""
    pretrained = load_backbone(weights, which=which)
    arch = backbone_arch(pretrained)
    if drop_path and arch["name"] != "vit":
        drop_path = 0.0  # torchvision's ResNets have no stochastic depth
    backbone = build_backbone(arch, drop_path)  # random weights, every layer initialised as for training
    if not from_scratch:
        backbone.load_state_dict(pretrained.state_dict())
    return Classifier(backbone.train(), num_classes)


def layer_of(name: str, backbone: nn.Module) -> tuple[int, int]:
    """(layer id, layer count) of a parameter of the `Classifier`: for a ViT the embeddings are layer 0, block
    i is layer i + 1, the final norm and the head the top; for a ResNet the stem is 0, its stage k is k, the
    head the top. Layer-wise decay scales layer l's rate by decay ** (top - l)."""
    if isinstance(backbone, VisionTransformer):
        top = len(backbone.blocks) + 1
        if name.startswith(("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed")):
            return 0, top
        m = re.match(r"backbone\.blocks\.(\d+)\.", name)
        return (int(m.group(1)) + 1 if m else top), top
    m = re.match(r"backbone\.layer(\d+)\.", name)
    if m:
        return int(m.group(1)), 5
    return (5 if name.startswith("head.") else 0), 5


def param_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW's groups: one per (layer, decayed or not), each with its `lr_scale`. Weight decay applies to weight
    matrices only: not to biases, norms and other 1-D tensors, nor to a ViT's [CLS] token and position
    embeddings (as DeiT excludes them)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, top = layer_of(name, model.backbone)
        decayed = not (p.ndim <= 1 or name.endswith(".bias") or name in ("backbone.cls_token", "backbone.pos_embed"))
        group = groups.setdefault((layer, decayed), {"params": [], "weight_decay": weight_decay if decayed else 0.0,
                                                     "lr_scale": layer_decay ** (top - layer)})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]
