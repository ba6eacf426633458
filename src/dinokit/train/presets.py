"""Named starting points, and `auto`: the one chosen from the data, the device and the time budget.

Each named preset is a set of overrides of `Config`'s defaults (which are the paper code's). Why each
small-scale value is what it is, and the measurements behind `auto`'s rules: docs/recipe.md.
"""
import math

from .config import Config

# The small-image recipe's largest crops, global and local: 5 x 5 and 3 x 3 tokens of 4 px (docs/recipe.md).
MAX_SMALL_CROPS = (20, 12)
# The small-image recipe, measured on Fashion-MNIST and checked on other small folders (docs/recipe.md):
# a narrow ViT of two blocks (its MLP half the paper's ratio) with a ReLU convolutional stem from full resolution,
# two views, KoLeo, a small head with BatchNorm and a fast-following teacher; `auto` adds smaller views for the
# first half of the run where the crops have 5 tokens a side.
SMALL = {
    "arch": "vit", "stem": "conv-full-relu", "patch_size": 4, "embed_dim": 96, "depth": 2, "num_heads": 4,
    "mlp_ratio": 2.0, "drop_path_rate": 0.0, "out_dim": 1024, "head_hidden_dim": 256, "bottleneck_dim": 64,
    "use_bn_in_head": True, "local_crops_number": 0, "global_crops_scale": [0.6, 1.0],
    "local_crops_scale": [0.25, 0.6], "warmup_teacher_temp": 0.04, "teacher_temp": 0.04, "momentum_teacher": 0.98,
    "koleo_weight": 0.3, "lr": 0.005, "warmup_epochs": 1, "min_lr": 1e-5, "batch_size": 32, "freeze_last_layer": 0,
    "epochs": 10, "log_every": 20, "save_every_steps": 500,
}

PRESETS = {
    # The paper code's defaults: ViT-S/16, 2 x 224 + 8 x 96 crops, K = 65536, 100 epochs.
    "paper": {},
    # A small ViT for 28 x 28 images (Fashion-MNIST) on a CPU: what `auto` picks for Fashion-MNIST on a CPU.
    "fmnist-cpu": {**SMALL, "global_crop_size": MAX_SMALL_CROPS[0], "local_crop_size": MAX_SMALL_CROPS[1],
                   "early_crops": [MAX_SMALL_CROPS[0] - 4, MAX_SMALL_CROPS[1] - 4], "early_crops_share": 0.5},
    # The paper code's recipe at the scale of issue benchmarks: ViT dim 192, depth 4, patch 4, 2 x 28 + 4 x 12.
    "bench-cpu": {
        "arch": "vit", "patch_size": 4, "embed_dim": 192, "depth": 4, "num_heads": 3,
        "global_crop_size": 28, "local_crop_size": 12, "local_crops_number": 4, "batch_size": 64,
    },
}

CPU_STEPS = 20_000  # a run without a time budget on a CPU: about this many steps (15-30 minutes at small scale)


def crop_size(side: int, fraction: float, multiple: int) -> int:
    """`fraction` of an image side, to the nearest multiple of the patch (at least one patch)."""
    return max(multiple, multiple * round(side * fraction / multiple))


def auto_preset(stats: dict, device_type: str, time_budget: float | None = None) -> tuple[dict, list[str]]:
    """The overrides `--preset auto` picks, and one line of reason for each choice.

    `stats`: `image_stats` of the training source (images, median short side, grey).

    >>> values, why = auto_preset({"images": 60000, "short_side": 28, "grey": True}, "cpu", 900)
    >>> values == PRESETS["fmnist-cpu"]
    True
    """
    n, side = stats["images"], stats["short_side"]
    reasons = [f"data: {n} images, median short side {side} px, {'grey' if stats['grey'] else 'colour'}; "
               f"device: {device_type}; " + (f"time budget {time_budget:.0f} s" if time_budget else "no time budget")]
    # On a CPU the larger ViTs below train too few steps to learn (colour shapes in 5 minutes: at 96 px 97 steps,
    # 21.0% k-NN against 25.6 for pixels); the small recipe on views brought down to its crops learns (69.5%).
    small_recipe = side <= 64 or device_type == "cpu"
    if small_recipe:
        values = dict(SMALL)
        # a step's cost follows its tokens: capped, not a fixed fraction of the side
        values["global_crop_size"] = min(crop_size(side, 5 / 7, 4), MAX_SMALL_CROPS[0])
        values["local_crop_size"] = min(crop_size(side, 3 / 7, 4), MAX_SMALL_CROPS[1])
        if values["global_crop_size"] >= 5 * 4:  # the first half of the run one token a side smaller
            values["early_crops"] = [values["global_crop_size"] - 4, max(4, values["local_crop_size"] - 4)]
            values["early_crops_share"] = 0.5
        reasons += [
            f"small images: the small-image recipe (ViT width {SMALL['embed_dim']}, depth {SMALL['depth']}, MLP ratio "
            f"{SMALL['mlp_ratio']:g}, ReLU convolutional stem from full resolution, patch {SMALL['patch_size']}, KoLeo "
            f"{SMALL['koleo_weight']:g}, K {values['out_dim']}, BatchNorm in the head, batch {SMALL['batch_size']}, lr "
            f"{SMALL['lr']:g}, teacher momentum {SMALL['momentum_teacher']:g}), measured on Fashion-MNIST, the digits "
            "and colour shapes",
            f"training crops {values['global_crop_size']} px, 5/7 of the side and at most {MAX_SMALL_CROPS[0]} px (on "
            f"Fashion-MNIST 20 of 28 px gave the same k-NN per step as 28 at 0.63 of the cost, on 32-px colour "
            f"shapes 20 px beat 24 by 5 points in 5 minutes); evaluation at the same size",
            "two views, no local crops: at minutes-long budgets the steps they cost are worth more than multi-crop"]
        if side > 64:  # on a CPU
            reasons.append(f"images larger than 64 px on a CPU: the small-image recipe, its views brought down to "
                           f"{values['global_crop_size']} px (colour shapes in 5 minutes, 96 px: 69.5% k-NN against "
                           "21.0 for a ViT of width 192 at 72 px, which trained 97 steps; 192 px: 69.1 against "
                           "19.0 for ViT-Ti/16 at 96 px; pixels 25.6 and 25.3)")
        if "early_crops" in values:
            reasons.append(f"the first half of the steps on {values['early_crops'][0]}-px views, one token a side "
                           "fewer (progressive resizing: 0.76 of the step's cost, +0.5 and +0.8 k-NN in 5 minutes on "
                           "Fashion-MNIST and the digits)")
        if device_type == "cuda":
            values["batch_size"] = 256
            reasons.append("GPU: batch 256 (lr scales with it)")
    elif side < 160:  # on a GPU (not measured yet); a CPU takes the small recipe above
        patch = 8
        values = {"arch": "vit", "patch_size": patch, "embed_dim": 192, "depth": 6, "num_heads": 3,
                  "global_crop_size": crop_size(side, 0.75, patch), "local_crop_size": crop_size(side, 0.375, patch),
                  "local_crops_number": 4, "out_dim": 4096, "head_hidden_dim": 1024, "bottleneck_dim": 128,
                  "koleo_weight": 0.1, "momentum_teacher": 0.99, "lr": 0.002, "warmup_epochs": 1, "epochs": 10,
                  "freeze_last_layer": 0, "batch_size": 256}
        reasons.append(f"mid-size images: ViT width 192, depth 6, patch 8, crops {values['global_crop_size']} / "
                       f"{values['local_crop_size']} px with 4 local views, K 4096 (scaled between the small recipe "
                       "and the paper's; not yet measured at this size)")
    else:  # on a GPU (not measured yet); a CPU takes the small recipe above
        values = {"local_crops_number": 10}
        reasons.append("photo-size images: the paper's recipe (ViT-S/16, 2 x 224 + 10 x 96 crops, K 65536)")
    values["out_dim"] = min(values.get("out_dim", 65536), max(256, 2 ** round(math.log2(max(n, 1) / 6))))
    if values["out_dim"] < (SMALL["out_dim"] if small_recipe else 65536):
        reasons.append(f"K {values['out_dim']}: about one prototype per 6 images of a small data set")
    batch = values.get("batch_size", Config.batch_size)  # the default, where the recipe keeps it
    if n < batch:  # a few images: batches they can fill (a power of two, at least 2 for BatchNorm and centering)
        values["batch_size"] = 2 ** int(math.log2(max(n, 2)))
        reasons.append(f"batch {values['batch_size']}: the data holds {n} images, fewer than a batch of {batch}")
    if not time_budget and device_type == "cpu":  # the small recipe
        per_epoch = max(1, n // values["batch_size"])
        values["epochs"] = max(1, min(100, CPU_STEPS // per_epoch))
        reasons.append(f"no time budget: {values['epochs']} epochs, about {values['epochs'] * per_epoch} steps "
                       "(--time-budget to fit a deadline instead)")
    return values, reasons
