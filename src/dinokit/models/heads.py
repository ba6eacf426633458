"""DINO projection head: MLP, L2-normalised bottleneck, weight-normalised prototypes."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit import _init_weights


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| per output row.

    Keeps the parameter names (`weight_g`, `weight_v`) of PyTorch's old `weight_norm`, which official
    DINO checkpoints store.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=5 ** 0.5)  # nn.Linear's default, as in the reference

    @property
    def weight(self) -> torch.Tensor:
        # PyTorch's fused kernel, the one nn.utils.weight_norm (and so the paper's code) runs: one pass over
        # the big matrix forward and backward, 1.7x faster on a CPU than the same maths in separate ops
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x):
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers) if len(layers) > 1 else layers[0]
        self.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        # A frozen unit gain keeps the prototypes on the sphere: more stable, slightly worse for ViT-S.
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops: crops of one resolution share a backbone forward.

    With `mask_token`, it also serves the iBOT patch term (a ViT backbone): the leading group of same-size
    crops (the global views) can have patches masked, and their patch tokens go through the head too.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, mask_token: bool = False):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.mask_token = nn.Parameter(torch.zeros(backbone.num_features)) if mask_token else None

    def forward(self, crops, return_features: bool = False, masks: torch.Tensor | None = None,
                return_patches: bool = False):
        """Head outputs of every crop's [CLS], crop-major; then, as asked, the backbone's [CLS] features and
        the head outputs of the global views' patch tokens: those under `masks` (bool, views * B x patches,
        swapped for the mask token before the backbone), or all of them (views * B, patches, K)."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats, patches, start = [], None, 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            x = torch.cat(crops[start:end])
            if start == 0 and (return_patches or masks is not None):
                tokens = self.backbone.forward_features(x, masks, self.mask_token)
                feats.append(tokens[:, 0])
                patches = tokens[:, 1:] if masks is None else tokens[:, 1:][masks]
            else:
                feats.append(self.backbone(x))
            start = end
        feats = torch.cat(feats)
        out = [self.head(feats)] + ([feats] if return_features else []) + \
              ([self.head(patches)] if patches is not None else [])
        return out[0] if len(out) == 1 else tuple(out)
