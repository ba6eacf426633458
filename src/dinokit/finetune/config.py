"""One fine-tuning configuration: the DeiT-style recipe the paper fine-tunes with, scaled to small data on a CPU.

Why each default is what it is: docs/finetune.md (the measurements behind them: BENCHMARKS.md).
"""
import dataclasses
from dataclasses import dataclass, field

LAYER_DECAY = 0.75  # fine-tuning's default; from random weights every layer learns at the full rate (1.0)


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run, checked by `validate` before anything runs.

    >>> FinetuneConfig(weights="w.pt", train="fashion-mnist:train").validate().layer_decay
    0.75
    """
    # ---- what it trains, on what
    weights: str = ""  # the backbone: any file load_backbone reads (its architecture; its weights unless from_scratch)
    which: str = "teacher"  # network taken from a DINO training checkpoint
    from_scratch: bool = False  # the same architecture from random weights (the comparison)
    train: str = ""  # labelled source: a folder of class folders, or fashion-mnist:train
    test: str = ""  # labelled source scored at the end (top-1, top-5); empty: none
    seed: int = 0  # data order, augmentation, the new head's initialisation
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda, cuda:1, mps
    num_workers: int = 0  # loader processes that decode and augment
    precision: str = "auto"  # auto (bf16 on GPUs, fp32 on CPUs), bf16, fp32
    image_size: int = 0  # side of the training crops; 0: the size evaluation gives these images (see docs)
    # ---- optimisation (DeiT's: AdamW, warm-up then cosine, per step)
    epochs: int = 30  # length of the run (a time budget or --steps lays it out over another length)
    batch_size: int = 64  # images per step
    lr: float = 0.003  # peak learning rate at batch 256, scaled linearly with the batch
    min_lr: float = 1e-6  # learning rate at the end of the cosine
    warmup_epochs: float = 3  # epochs of linear warm-up, scaled with the run's length like training's
    weight_decay: float = 0.05  # AdamW's, on weight matrices only
    layer_decay: float = LAYER_DECAY  # block i of n learns at lr * layer_decay ** (n + 1 - i); the head at lr
    # ---- regularisation
    drop_path: float = 0.1  # stochastic depth of a ViT's blocks (deeper blocks more)
    label_smoothing: float = 0.1  # the targets' share spread over all classes
    crop_scale: list = field(default_factory=lambda: [1.0, 1.0])  # RandomResizedCrop's area range (DeiT: 0.08 1)
    randaug_ops: int = 0  # RandAugment: operations per image (DeiT: 2); 0: off
    randaug_magnitude: int = 9  # RandAugment: strength, 0-30 (DeiT: 9)
    mixup: float = 0.0  # MixUp's Beta alpha (DeiT: 0.8); 0: off
    cutmix: float = 0.0  # CutMix's Beta alpha (DeiT: 1.0); 0: off; with mixup too, one of the two per batch
    # ---- output
    log_every: int = 20  # steps between rows of metrics.jsonl
    save_every_steps: int = 500  # steps between checkpoints

    def validate(self) -> "FinetuneConfig":
        errors = []
        if not self.weights:
            errors.append("weights: a backbone file is needed (its architecture, and its weights unless from_scratch)")
        if not self.train:
            errors.append("train: a labelled source is needed")
        positive = ["epochs", "batch_size", "log_every", "save_every_steps"]
        errors += [f"{k} must be > 0 (got {getattr(self, k)})" for k in positive if getattr(self, k) <= 0]
        nonneg = ["num_workers", "image_size", "lr", "min_lr", "warmup_epochs", "weight_decay", "drop_path", "mixup",
                  "cutmix", "randaug_ops"]
        errors += [f"{k} must be >= 0 (got {getattr(self, k)})" for k in nonneg if getattr(self, k) < 0]
        if not 0 < self.layer_decay <= 1:
            errors.append(f"layer_decay must be in (0, 1] (got {self.layer_decay})")
        if not 0 <= self.label_smoothing < 1:
            errors.append(f"label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        if self.drop_path >= 1:
            errors.append(f"drop_path must be below 1 (got {self.drop_path})")
        if not 0 <= self.randaug_magnitude <= 30:
            errors.append(f"randaug_magnitude must be in [0, 30] (got {self.randaug_magnitude})")
        v = self.crop_scale
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and 0 < v[0] <= v[1] <= 1):
            errors.append(f"crop_scale must be [low, high] with 0 < low <= high <= 1 (got {v})")
        if self.which not in ("teacher", "student"):
            errors.append(f"which must be teacher or student (got {self.which!r})")
        if self.precision not in ("auto", "bf16", "fp32"):
            errors.append(f"precision must be auto, bf16 or fp32 (got {self.precision!r})")
        if errors:
            raise ValueError("invalid fine-tuning configuration:\n  " + "\n  ".join(errors))
        self.crop_scale = [float(s) for s in self.crop_scale]
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "FinetuneConfig":
        """A saved configuration (a checkpoint's), checked like a new one; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown fine-tuning config keys: {', '.join(unknown)}")
        return cls(**values).validate()
