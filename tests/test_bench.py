"""`dinokit bench`: the report's fields, and a timed step that is the training step."""
import json

import pytest
import torch
from PIL import Image

from dinokit.cli import main as cli_main
from dinokit.data.multicrop import MultiCrop
from dinokit.data.sources import open_source
from dinokit.train.bench import PARTS, timed_step
from dinokit.train.config import Config
from dinokit.train.engine import Trainer

TINY = dict(arch="vit", patch_size=4, embed_dim=32, depth=2, num_heads=2, out_dim=64, head_hidden_dim=48,
            bottleneck_dim=16, global_crop_size=16, local_crop_size=8, local_crops_number=2, batch_size=8,
            epochs=2, warmup_epochs=1, precision="fp32")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    src = open_source("fashion-mnist:train")
    for i in range(24):
        Image.fromarray(src.images[i, 0].numpy()).save(root / f"{i:03d}.png")
    return root


def test_bench_reports_every_field_and_parts_sum_to_total(folder, tmp_path):
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--data", str(folder), "--steps", "2", "--warmup", "1", "--json", str(out), *sets]) == 0
    r = json.loads(out.read_text())
    assert set(r["ms_per_step"]) == set(PARTS) == set(r["percent"])
    assert all(v >= 0 for v in r["ms_per_step"].values())
    assert sum(r["percent"].values()) == pytest.approx(100)
    assert sum(r["ms_per_step"].values()) == pytest.approx(r["ms_per_step_total"], rel=0.1)
    assert r["images_per_s"] == pytest.approx(2 * 8 / r["seconds"])
    assert r["flops_per_image"] > 0 and r["peak_memory_mib"] > 0
    assert r["matmul_peak_flops"]["fp32"] > 0 and r["mfu_against"] == "fp32"
    assert r["mfu"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / r["matmul_peak_flops"]["fp32"])
    assert r["config"]["embed_dim"] == 32 and r["steps"] == 2


def test_timed_step_is_the_training_step():
    cfg = Config(**TINY, drop_path_rate=0.0).validate()
    multicrop = MultiCrop(16, 8, 2, seed=0)
    images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    index = torch.arange(8)
    trained, timed = [Trainer(cfg, torch.device("cpu"), 4, 8) for _ in range(2)]
    timed.student.load_state_dict(trained.student.state_dict())
    timed.teacher.load_state_dict(trained.teacher.state_dict())
    for _ in range(3):
        crops = multicrop.geometric(images, index, 0)
        trained.train_step(multicrop.photometric(crops, index, 0))
        parts, n = timed_step(timed, iter([(0, index, crops)]), multicrop)
        assert n == 8 and set(parts) == set(PARTS)
    assert timed.step == trained.step == 3
    for a, b in zip(trained.teacher.state_dict().values(), timed.teacher.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(trained.loss.center, timed.loss.center, rtol=0, atol=0)
