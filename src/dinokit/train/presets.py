"""Named starting points. Each is a set of overrides of `Config`'s defaults (which are the paper code's).

Why each small-scale value is what it is: docs/recipe.md.
"""
PRESETS = {
    # The paper code's defaults: ViT-S/16, 2 x 224 + 8 x 96 crops, K = 65536, 100 epochs.
    "paper": {},
    # A small ViT for 28 x 28 images (Fashion-MNIST) on a CPU.
    "fmnist-cpu": {
        "arch": "vit", "patch_size": 4, "embed_dim": 192, "depth": 4, "num_heads": 3, "drop_path_rate": 0.0,
        "out_dim": 4096, "head_hidden_dim": 1024, "bottleneck_dim": 128,
        "global_crop_size": 28, "local_crop_size": 12, "local_crops_number": 4,
        "global_crops_scale": [0.25, 1.0], "local_crops_scale": [0.05, 0.25],
        "warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 1,
        "momentum_teacher": 0.99, "lr": 0.002, "warmup_epochs": 1, "min_lr": 1e-5,
        "epochs": 10, "batch_size": 128, "freeze_last_layer": 0, "log_every": 10, "save_every_steps": 200,
    },
    # The paper code's recipe at the scale of issue benchmarks: ViT dim 192, depth 4, patch 4, 2 x 28 + 4 x 12.
    "bench-cpu": {
        "arch": "vit", "patch_size": 4, "embed_dim": 192, "depth": 4, "num_heads": 3,
        "global_crop_size": 28, "local_crop_size": 12, "local_crops_number": 4, "batch_size": 64,
    },
}
