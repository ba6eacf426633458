"""One training configuration, from presets, YAML files and `--set key=value`, checked before anything runs.

Names follow the paper code's `main_dino.py` arguments where one exists.
"""
import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field, fields

import yaml

from ..models.convnets import CONVNETS
from ..models.vit import STEMS, VIT_SIZES


@dataclass
class Config:
    """Every setting of a training run, checked by `validate` before anything runs. Defaults are the paper
    code's (`main_dino.py`); `resolve` applies a preset, a YAML file and `--set` overrides on top.

    >>> cfg = Config(arch="vit", embed_dim=96, depth=3, num_heads=4, patch_size=4).validate()
    >>> cfg.backbone_arch()["embed_dim"], cfg.batch_size
    (96, 64)
    """
    # ---- data
    data: str = "fashion-mnist:train"  # image folder (read recursively) or fashion-mnist:train / fashion-mnist:test
    seed: int = 0  # data order, augmentation and initialisation
    num_workers: int = 0  # loader processes that read, decode and crop images
    decode: str = "auto"  # where images are decoded: workers (Pillow), device (JPEGs on the GPU), auto (device on GPUs)
    # ---- backbone
    arch: str = "vit_small"  # vit_tiny, vit_small, vit_base, vit (sizes below), or resnet18/34/50/101/152
    patch_size: int = 16  # ViT patch
    embed_dim: int = 384  # ViT width (arch vit)
    depth: int = 12  # ViT blocks (arch vit)
    num_heads: int = 6  # ViT attention heads (arch vit)
    drop_path_rate: float = 0.1  # stochastic depth of the student
    stem: str = "patch"  # ViT patch embedding: patch (the paper's), conv, conv-full or conv-full-relu (docs/recipe.md)
    mlp_ratio: float = 4.0  # ViT MLP hidden width over the embedding width (the paper's 4)
    # ---- head
    out_dim: int = 65536  # prototypes K
    head_hidden_dim: int = 2048  # the head's MLP width
    bottleneck_dim: int = 256  # the head's L2-normalised bottleneck
    norm_last_layer: bool = True  # keep the prototypes' weight-norm gain frozen at 1
    use_bn_in_head: bool = False  # BatchNorm in the head's MLP (the paper's ViTs: none)
    # ---- multi-crop
    global_crop_size: int = 224  # global views' side in pixels
    local_crop_size: int = 96  # local views' side in pixels
    local_crops_number: int = 8  # local views per image
    global_crops_scale: list = field(default_factory=lambda: [0.4, 1.0])  # area range of the global views
    local_crops_scale: list = field(default_factory=lambda: [0.05, 0.4])  # area range of the local views
    flip_p: float = 0.5  # probability of a horizontal flip of each view
    early_crops: list = field(default_factory=list)  # [global, local] sides of the first steps' views; []: none
    early_crops_share: float = 0.0  # share of the run's steps trained on views resized to early_crops
    # ---- loss
    teacher_temp: float = 0.04  # the teacher's temperature after its warm-up (sharpening)
    warmup_teacher_temp: float = 0.04  # the teacher's temperature at the start
    warmup_teacher_temp_epochs: float = 0  # epochs of the teacher temperature's linear warm-up
    student_temp: float = 0.1  # the student's temperature
    center_momentum: float = 0.9  # momentum of the running center of the teacher's outputs
    centering: bool = True  # subtract the center from the teacher's outputs (false: the paper's collapse ablation)
    sharpening: bool = True  # the teacher's temperature is teacher_temp (false: the student's, no sharpening)
    koleo_weight: float = 0.0  # DINOv2's KoLeo term on the student's global-view features; 0: off (the paper)
    patch_loss_weight: float = 0.0  # iBOT's masked-patch term (ViTs); 0: off (the paper)
    mask_ratio: float = 0.3  # share of a global view's patches masked for the student, with the patch term
    student_keep_ratio: float = 1.0  # share of each view's patch tokens the student sees, at random (MSN); 1: all
    # ---- teacher
    teacher: str = "ema"  # ema (the paper's), student (a copy every step), previous_epoch (a copy every epoch)
    momentum_teacher: float = 0.996  # EMA momentum at the start, cosine to 1
    # ---- optimisation
    optimizer: str = "adamw"  # adamw or sgd (momentum 0.9)
    lr: float = 0.0005  # peak learning rate at batch 256, scaled linearly with the global batch
    min_lr: float = 1e-6  # learning rate at the end of the cosine
    warmup_epochs: float = 10  # epochs of linear learning-rate warm-up
    weight_decay: float = 0.04  # at the start (none on biases and 1-D parameters)
    weight_decay_end: float = 0.4  # at the end of the cosine
    clip_grad: float = 3.0  # each parameter's gradient norm is clipped to this (0: no clipping)
    freeze_last_layer: float = 1  # epochs with the prototypes frozen
    epochs: int = 100  # length of the run (a time budget or --steps lays it out over another length)
    batch_size: int = 64  # global batch, over all processes
    precision: str = "auto"  # auto (measured on CPUs: train/autotune.py; bf16 on GPUs), bf16, fp16 (GPU) or fp32
    threads: int = 0  # CPU threads (0: with precision auto the measured best, else all cores)
    compile: bool = False  # torch.compile the student and the teacher
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda, cuda:1, mps
    fsdp: bool = False  # with several processes, shard the models (FSDP) instead of replicating them (DDP)
    # ---- output
    log_every: int = 10  # steps between rows of metrics.jsonl
    save_every_steps: int = 500  # steps between checkpoints
    keep_every_epochs: int = 0  # keep a copy of the checkpoint every this many epochs (0: only the latest two)

    def backbone_arch(self) -> dict:
        """The backbone's `build_backbone` description: a ViT's shape or a convnet's name."""
        if self.arch in CONVNETS:
            return {"name": self.arch}
        dim, depth, heads = VIT_SIZES.get(self.arch, (self.embed_dim, self.depth, self.num_heads))
        return {"name": "vit", "img_size": self.global_crop_size, "patch_size": self.patch_size, "embed_dim": dim,
                "depth": depth, "num_heads": heads, "mlp_ratio": self.mlp_ratio, "stem": self.stem}

    def validate(self) -> "Config":
        errors = []
        if self.arch not in (*VIT_SIZES, "vit", *CONVNETS):
            errors.append(f"arch {self.arch!r} is not one of {', '.join([*VIT_SIZES, 'vit', *CONVNETS])}")
        positive = ["patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "out_dim", "head_hidden_dim",
                    "bottleneck_dim", "global_crop_size", "local_crop_size", "epochs", "batch_size", "log_every",
                    "save_every_steps"]
        errors += [f"{k} must be > 0 (got {getattr(self, k)})" for k in positive if getattr(self, k) <= 0]
        nonneg = ["local_crops_number", "num_workers", "drop_path_rate", "warmup_epochs", "freeze_last_layer",
                  "warmup_teacher_temp_epochs", "lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad",
                  "keep_every_epochs", "koleo_weight", "patch_loss_weight", "threads", "seed"]
        errors += [f"{k} must be >= 0 (got {getattr(self, k)})" for k in nonneg if getattr(self, k) < 0]
        for k in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            if not 0 < getattr(self, k) <= 10:
                errors.append(f"{k} must be in (0, 10] (got {getattr(self, k)})")
        for k in ("center_momentum", "momentum_teacher", "flip_p"):
            if not 0 <= getattr(self, k) <= 1:
                errors.append(f"{k} must be in [0, 1] (got {getattr(self, k)})")
        for k in ("global_crops_scale", "local_crops_scale"):
            v = getattr(self, k)
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and 0 < v[0] <= v[1] <= 1):
                errors.append(f"{k} must be [low, high] with 0 < low <= high <= 1 (got {v})")
        if not self.drop_path_rate < 1:
            errors.append(f"drop_path_rate must be below 1 (got {self.drop_path_rate}): at 1 no block would run")
        if self.local_crops_number and self.local_crop_size > self.global_crop_size:
            errors.append(f"local_crop_size {self.local_crop_size} is larger than global_crop_size "
                          f"{self.global_crop_size}: local views are the small ones")
        if self.arch == "vit" and self.embed_dim % self.num_heads:
            errors.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        vit = self.arch in (*VIT_SIZES, "vit")
        if vit:
            width = VIT_SIZES.get(self.arch, (self.embed_dim,))[0]
            if 0 < self.mlp_ratio and int(width * self.mlp_ratio) < 1:
                errors.append(f"mlp_ratio {self.mlp_ratio} leaves the MLP of a width-{width} ViT no hidden unit")
            for k in ("global_crop_size", "local_crop_size"):
                if getattr(self, k) < self.patch_size:
                    errors.append(f"{k} {getattr(self, k)} is smaller than patch_size {self.patch_size}")
        if self.early_crops_share and not (isinstance(self.early_crops, (list, tuple)) and len(self.early_crops) == 2
                                           and all(v > 0 and float(v).is_integer() for v in self.early_crops)):
            errors.append(f"early_crops must be [global, local] sides in pixels (got {self.early_crops})")
        if not 0 <= self.early_crops_share < 1:
            errors.append(f"early_crops_share must be in [0, 1) (got {self.early_crops_share})")
        if not 0 < self.mask_ratio < 1:
            errors.append(f"mask_ratio must be in (0, 1) (got {self.mask_ratio})")
        if self.patch_loss_weight > 0 and not vit:
            errors.append("patch_loss_weight needs a ViT (patch tokens)")
        if not 0 < self.student_keep_ratio <= 1:
            errors.append(f"student_keep_ratio must be in (0, 1] (got {self.student_keep_ratio})")
        elif self.student_keep_ratio < 1 and not vit:
            errors.append("student_keep_ratio below 1 needs a ViT (patch tokens to drop)")
        elif self.student_keep_ratio < 1 and self.patch_loss_weight > 0:
            errors.append("student_keep_ratio below 1 and patch_loss_weight are two ways of masking the student's "
                          "patches: use one")
        if self.stem not in STEMS:
            errors.append(f"stem must be one of {', '.join(STEMS)} (got {self.stem!r})")
        elif self.stem != "patch" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            errors.append(f"stem {self.stem!r} needs a power-of-two patch_size (got {self.patch_size})")
        if self.optimizer not in ("adamw", "sgd"):
            errors.append(f"optimizer must be adamw or sgd (got {self.optimizer!r})")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            errors.append(f"precision must be auto, bf16, fp16 or fp32 (got {self.precision!r})")
        if self.teacher not in ("ema", "student", "previous_epoch"):
            errors.append(f"teacher must be ema, student or previous_epoch (got {self.teacher!r})")
        if self.decode not in ("auto", "workers", "device"):
            errors.append(f"decode must be auto, workers or device (got {self.decode!r})")
        if errors:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_table() -> str:
    """The Markdown table of every key, its default and its meaning, read from `Config`'s own field comments
    (docs/training.md holds it; a test keeps the two the same)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"\s+(\w+): \w+ = (.+?)  # (.+)$", line)
        if m:
            key, meaning = m.group(1), m.group(3)
            default = FIELDS[key].default if FIELDS[key].default is not dataclasses.MISSING \
                else FIELDS[key].default_factory()
            shown = str(default).lower() if isinstance(default, bool) else default
            rows.append(f"| {key} | {shown} | {meaning} |")
    return "\n".join(rows)


def auto_values(data: str, device: str, time_budget: float | None, log=print) -> tuple[dict, list[str]]:
    """`--preset auto`: the values `auto_preset` picks for this data, device and budget, and its reasons
    (logged)."""
    from ..data.sources import image_stats, open_source
    from ..device import pick_device
    from .presets import auto_preset

    values, reasons = auto_preset(image_stats(open_source(data)), pick_device(device).type, time_budget)
    for line in reasons:
        log(f"auto: {line}")
    return values, reasons


def resolve_precision(precision: str, device_type: str) -> str:
    """`auto` without a measurement (train/autotune.py measures it on CPUs): bf16 on GPUs, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cuda" else "fp32"


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
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; Python does not
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number (got {value!r})")
    if kind is list and isinstance(value, (list, tuple)):
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a list of numbers (got {value!r})") from None
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{key} must hold finite numbers (got {value!r})")
        return values
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


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in a mapping is an error, not the last one winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str) -> dict:
    """A YAML file of config keys; a malformed one (a key twice included) is a one-line error naming the file,
    line and column."""
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config keys")
    return data


def resolve(preset: str | dict | None = None, file: str | None = None, sets: list[str] = (), validate: bool = True,
            **direct) -> Config:
    """Defaults < preset (a name, or the values `auto` picked) < YAML file < --set < direct arguments (--data).
    `validate=False`: not checked as a whole, for reading where the data is before `auto` fills in the rest (a
    --set that needs `auto`'s values, such as `early_crops_share` alone, is valid only with them)."""
    from .presets import PRESETS

    config = Config()
    if isinstance(preset, dict):
        config = apply(config, preset)
    elif preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of auto, {', '.join(PRESETS)}")
        config = apply(config, PRESETS[preset])
    if file:
        config = apply(config, load_yaml(file))
    config = apply(config, parse_sets(list(sets)))
    config = apply(config, {k: v for k, v in direct.items() if v is not None})
    return config.validate() if validate else config
