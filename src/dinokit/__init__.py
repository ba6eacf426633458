"""dinokit: DINO self-distillation for vision transformers, compatible with the paper's checkpoints."""
from .eval.knn import knn_classify
from .loss import DINOLoss
from .models import (DINOHead, MultiCropWrapper, UnsafeCheckpointError, VisionTransformer, build_backbone,
                     convnet, load_backbone, safe_load, vit_base, vit_small, vit_tiny)
from .train.schedules import cosine_schedule

__version__ = "0.1.0"
__all__ = ["DINOHead", "DINOLoss", "MultiCropWrapper", "UnsafeCheckpointError", "VisionTransformer",
           "build_backbone", "convnet", "cosine_schedule", "knn_classify", "load_backbone", "safe_load",
           "vit_base", "vit_small", "vit_tiny"]
