from .convnets import convnet
from .heads import DINOHead, MultiCropWrapper
from .vit import VisionTransformer, vit_base, vit_small, vit_tiny
from .weights import UnsafeCheckpointError, build_backbone, load_backbone, safe_load
