"""One training configuration, from presets, YAML files and `--set key=value`, checked before anything runs.

Names follow the paper code's `main_dino.py` arguments where one exists.
"""
import dataclasses
from dataclasses import dataclass, field, fields

import yaml

from ..models.convnets import CONVNETS
from ..models.vit import VIT_SIZES


@dataclass
class Config:
    # data
    data: str = "fashion-mnist:train"
    seed: int = 0
    num_workers: int = 0
    decode: str = "auto"  # workers (Pillow, crops in loader workers) | device (JPEGs decoded and cropped on GPU) | auto
    # backbone: a named ViT, "vit" with the sizes below, or a torchvision convnet
    arch: str = "vit_small"
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    drop_path_rate: float = 0.1
    stem: str = "patch"  # ViT patches: "patch" (one strided conv, the paper's) or "conv" (3 x 3 conv stack)
    # head
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    use_bn_in_head: bool = False
    # multi-crop
    global_crop_size: int = 224
    local_crop_size: int = 96
    local_crops_number: int = 8
    global_crops_scale: list = field(default_factory=lambda: [0.4, 1.0])
    local_crops_scale: list = field(default_factory=lambda: [0.05, 0.4])
    # loss
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    koleo_weight: float = 0.0  # DINOv2's KoLeo term on the student's global-crop features; 0: off (the paper)
    patch_loss_weight: float = 0.0  # iBOT's masked-patch self-distillation term (ViTs); 0: off (the paper)
    mask_ratio: float = 0.3  # share of a global view's patches the student sees masked, with the patch term
    momentum_teacher: float = 0.996
    # optimisation
    optimizer: str = "adamw"
    lr: float = 0.0005  # at batch 256; scaled linearly with the global batch
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer: float = 1
    epochs: int = 100
    batch_size: int = 64  # global, over all processes
    precision: str = "auto"  # auto | bf16 | fp16 (GPU, with a grad scaler) | fp32; see resolve_precision
    compile: bool = False  # torch.compile student and teacher: ~10% faster on a 2-core CPU, after a compile
    device: str = "auto"
    fsdp: bool = False  # with several processes: shard the models (FSDP) instead of replicating them (DDP)
    # output
    log_every: int = 10
    save_every_steps: int = 500
    keep_every_epochs: int = 0  # 0: keep only the latest checkpoint (and the one before it)

    def validate(self) -> "Config":
        errors = []
        if self.arch not in (*VIT_SIZES, "vit", *CONVNETS):
            errors.append(f"arch {self.arch!r} is not one of {', '.join([*VIT_SIZES, 'vit', *CONVNETS])}")
        positive = ["patch_size", "embed_dim", "depth", "num_heads", "out_dim", "head_hidden_dim", "bottleneck_dim",
                    "global_crop_size", "local_crop_size", "epochs", "batch_size", "log_every", "save_every_steps"]
        errors += [f"{k} must be > 0 (got {getattr(self, k)})" for k in positive if getattr(self, k) <= 0]
        nonneg = ["local_crops_number", "num_workers", "drop_path_rate", "warmup_epochs", "freeze_last_layer",
                  "warmup_teacher_temp_epochs", "lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad",
                  "keep_every_epochs", "koleo_weight", "patch_loss_weight"]
        errors += [f"{k} must be >= 0 (got {getattr(self, k)})" for k in nonneg if getattr(self, k) < 0]
        for k in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            if not 0 < getattr(self, k) <= 10:
                errors.append(f"{k} must be in (0, 10] (got {getattr(self, k)})")
        for k in ("center_momentum", "momentum_teacher"):
            if not 0 <= getattr(self, k) <= 1:
                errors.append(f"{k} must be in [0, 1] (got {getattr(self, k)})")
        for k in ("global_crops_scale", "local_crops_scale"):
            v = getattr(self, k)
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and 0 < v[0] <= v[1] <= 1):
                errors.append(f"{k} must be [low, high] with 0 < low <= high <= 1 (got {v})")
        if self.arch == "vit" and self.embed_dim % self.num_heads:
            errors.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.arch in (*VIT_SIZES, "vit"):
            for k in ("global_crop_size", "local_crop_size"):
                if getattr(self, k) < self.patch_size:
                    errors.append(f"{k} {getattr(self, k)} is smaller than patch_size {self.patch_size}")
        if not 0 < self.mask_ratio < 1:
            errors.append(f"mask_ratio must be in (0, 1) (got {self.mask_ratio})")
        if self.patch_loss_weight > 0 and self.arch not in (*VIT_SIZES, "vit"):
            errors.append("patch_loss_weight needs a ViT (patch tokens)")
        if self.stem not in ("patch", "conv"):
            errors.append(f"stem must be 'patch' or 'conv' (got {self.stem!r})")
        elif self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            errors.append(f"stem 'conv' needs a power-of-two patch_size (got {self.patch_size})")
        if self.optimizer not in ("adamw", "sgd"):
            errors.append(f"optimizer must be adamw or sgd (got {self.optimizer!r})")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            errors.append(f"precision must be auto, bf16, fp16 or fp32 (got {self.precision!r})")
        if self.decode not in ("auto", "workers", "device"):
            errors.append(f"decode must be auto, workers or device (got {self.decode!r})")
        if errors:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 only with native support (AVX512-BF16 or AMX); emulated they are ~7x slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device_type: str) -> str:
    """`auto`: bf16 on GPUs and on CPUs with native bf16, fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device_type == "cuda" or (device_type == "cpu" and cpu_has_fast_bf16()):
        return "bf16"
    return "fp32"


def resolve_decode(decode: str, device_type: str) -> str:
    """`auto`: decode on the device with a GPU (nvJPEG), in the loader workers elsewhere."""
    if decode != "auto":
        return decode
    return "device" if device_type == "cuda" else "workers"


FIELDS = {f.name: f for f in fields(Config)}


def _coerce(key: str, value):
    """A value from YAML or the command line, converted to the field's type (or a clear error)."""
    if key not in FIELDS:
        close = [k for k in FIELDS if k.startswith(key[:4])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown config key {key!r}{hint}")
    default = FIELDS[key].default if FIELDS[key].default is not dataclasses.MISSING else FIELDS[key].default_factory()
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        value = yaml.safe_load(value)  # "0.1" -> 0.1, "true" -> True, "[0.4, 1]" -> [0.4, 1]
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false (got {value!r})")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list and isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{key} must be {kind.__name__} (got {value!r})")
    return value


def apply(config: Config, overrides: dict) -> Config:
    return dataclasses.replace(config, **{k: _coerce(k, v) for k, v in overrides.items()})


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set takes key=value (got {item!r})")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_yaml(path: str) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config keys")
    return data


def resolve(preset: str | None = None, file: str | None = None, sets: list[str] = (), **direct) -> Config:
    """Defaults < preset < YAML file < --set < direct arguments (such as --data)."""
    from .presets import PRESETS

    config = Config()
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        config = apply(config, PRESETS[preset])
    if file:
        config = apply(config, load_yaml(file))
    config = apply(config, parse_sets(list(sets)))
    config = apply(config, {k: v for k, v in direct.items() if v is not None})
    return config.validate()
