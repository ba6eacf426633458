"""dinokit: DINO self-distillation for vision transformers, compatible with the paper's checkpoints.

>>> from dinokit import Config, pretrain
>>> summary = pretrain(Config(data="photos/", arch="vit_small"), "runs/x", time_budget=3600)  # doctest: +SKIP

(`pretrain` is `dinokit.train.loop.train`, exported under another name so that `dinokit.train` stays the
package: `import dinokit.train.loop` works.)
"""
from .data.multicrop import MultiCrop
from .eval.knn import knn_classify
from .loss import DINOLoss
from .models import (DINOHead, MultiCropWrapper, UnsafeCheckpointError, VisionTransformer, build_backbone,
                     convnet, load_backbone, safe_load, vit_base, vit_small, vit_tiny)
from .train.config import Config
from .train.loop import train as pretrain
from .train.schedules import cosine_schedule
from .train.step import Trainer, ema_update_

__version__ = "0.2.0"
__all__ = ["Config", "DINOHead", "DINOLoss", "MultiCrop", "MultiCropWrapper", "Trainer", "UnsafeCheckpointError",
           "VisionTransformer", "build_backbone", "convnet", "cosine_schedule", "ema_update_", "knn_classify",
           "load_backbone", "pretrain", "safe_load", "vit_base", "vit_small", "vit_tiny"]
