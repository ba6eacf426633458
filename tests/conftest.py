import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dinokit.models.vit import VisionTransformer

# precision=auto caches what it measured in the user's cache folder: the tests' runs, timed on a machine the
# tests load, write theirs to a folder of their own and leave the user's choices as they were.
@pytest.fixture(scope="session", autouse=True)
def own_tune_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DINOKIT_TUNE_CACHE", str(tmp_path_factory.mktemp("tune") / "autotune.json"))
        yield


# The reference implementation's outputs: ../shared/parity beside the repository (as CI lays it out), or
# wherever DINOKIT_PARITY points.
PARITY = Path(os.environ.get("DINOKIT_PARITY", Path(__file__).resolve().parents[2] / "shared" / "parity"))


def parity_dirs():
    return sorted(p for p in PARITY.glob("*") if (p / "meta.json").is_file())


def recipe_state_dict(keys_shapes, seed):
    """Seeded weights by the parity fixtures' recipe (shared/parity/README.md)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape in keys_shapes:
        x = rng.standard_normal(shape, dtype=np.float32)
        parts = name.split(".")
        if name.endswith("weight_g"):
            x = np.ones(shape, dtype=np.float32)
        elif len(parts) >= 2 and "norm" in parts[-2] and name.endswith(".weight"):
            x = 1 + 0.1 * x
        else:
            x = 0.02 * x
        sd[name] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return sd


@pytest.fixture(scope="session", params=parity_dirs() or [None], ids=lambda p: p.name if p else "missing")
def parity(request):
    if request.param is None:
        pytest.fail(f"no parity fixtures found under {PARITY}")
    meta = json.loads((request.param / "meta.json").read_text())
    arrays = np.load(request.param / "arrays.npz")
    return meta, {k: torch.from_numpy(arrays[k]) for k in arrays.files}


def jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Randomise the tensors that start constant (biases, norms, BatchNorm statistics), so that a misplaced
    tensor changes the output; weight matrices are random already."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5, generator=g)
            elif t.is_floating_point() and t.ndim <= 1:
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model.eval()


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return jitter(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3), seed)
