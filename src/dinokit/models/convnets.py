"""torchvision convnets as DINO backbones: the classifier becomes the identity."""
import torch.nn as nn
import torchvision

CONVNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def convnet(name: str) -> nn.Module:
    if name not in CONVNETS:
        raise ValueError(f"unknown convnet {name!r}; choose one of {', '.join(CONVNETS)}")
    model = getattr(torchvision.models, name)(weights=None)
    model.num_features = model.fc.in_features
    model.arch_name = name
    model.fc = nn.Identity()
    return model
