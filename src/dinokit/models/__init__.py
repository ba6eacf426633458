from .convnets import convnet
from .heads import DINOHead, MultiCropOutput, MultiCropWrapper
from .vit import VisionTransformer, vit_base, vit_small, vit_tiny
from .weights import UnsafeCheckpointError, build_backbone, load_backbone, safe_load

__all__ = ["DINOHead", "MultiCropOutput", "MultiCropWrapper", "UnsafeCheckpointError", "VisionTransformer",
           "build_backbone", "convnet", "load_backbone", "safe_load", "vit_base", "vit_small", "vit_tiny"]
