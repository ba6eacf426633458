"""Named starting points. Each is a set of overrides of `Config`'s defaults (which are the paper code's).

Why each small-scale value is what it is: docs/recipe.md.
"""
PRESETS = {
    # The paper code's defaults: ViT-S/16, 2 x 224 + 8 x 96 crops, K = 65536, 100 epochs.
    "paper": {},
    # A small ViT for 28 x 28 images (Fashion-MNIST) on a CPU.
    "fmnist-cpu": {
        "arch": "vit", "stem": "conv", "patch_size": 4, "embed_dim": 96, "depth": 3, "num_heads": 4,
        "drop_path_rate": 0.0, "out_dim": 1024, "head_hidden_dim": 256, "bottleneck_dim": 64,
        # two global views only: in 14 minutes the steps they save beat multi-crop (docs/recipe.md);
        # the local sizes apply when local_crops_number is set above 0
        "global_crop_size": 20, "local_crop_size": 12, "local_crops_number": 0,
        "global_crops_scale": [0.6, 1.0], "local_crops_scale": [0.25, 0.6],
        "warmup_teacher_temp": 0.04, "teacher_temp": 0.04, "momentum_teacher": 0.99, "koleo_weight": 0.1,
        "lr": 0.005, "warmup_epochs": 1, "min_lr": 1e-5, "epochs": 10, "batch_size": 32, "freeze_last_layer": 0,
        "log_every": 20, "save_every_steps": 500,
    },
    # The paper code's recipe at the scale of issue benchmarks: ViT dim 192, depth 4, patch 4, 2 x 28 + 4 x 12.
    "bench-cpu": {
        "arch": "vit", "patch_size": 4, "embed_dim": 192, "depth": 4, "num_heads": 3,
        "global_crop_size": 28, "local_crop_size": 12, "local_crops_number": 4, "batch_size": 64,
    },
}
