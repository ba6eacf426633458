"""The ImageNet colour statistics that DINO models are trained and evaluated with, in one place."""
import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def mean_std(device: torch.device, batched: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD as tensors shaped to broadcast over (B, 3, H, W) images (or (3, H, W) ones), on `device`."""
    shape = (1, 3, 1, 1) if batched else (3, 1, 1)
    return (torch.tensor(MEAN).view(shape).to(device, non_blocking=True),
            torch.tensor(STD).view(shape).to(device, non_blocking=True))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images, (3, H, W) or (B, 3, H, W), on any device -> ImageNet-normalised.

    >>> normalize(torch.full((3, 2, 2), 0.485))[0].abs().max().item() < 1e-6
    True
    """
    mean, std = mean_std(x.device, batched=x.dim() == 4)
    return (x - mean) / std
