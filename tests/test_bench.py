"""`dinokit bench`: the report's fields, and a timed step that is the training step."""
import json

import pytest
from PIL import Image

from dinokit.cli import main as cli_main
from dinokit.data.sources import open_source
from dinokit.train.bench import PARTS, benchmark
from dinokit.train.config import Config
from dinokit.train.loop import train

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
    assert 0 <= r["data_wait"] < 1 and r["data_wait"] == pytest.approx(r["percent"]["data"] / 100)
    assert r["mfu"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / r["matmul_peak_flops"]["fp32"])
    assert r["config"]["embed_dim"] == 32 and r["steps"] == 2


def test_bench_times_the_training_step_itself(folder, tmp_path):
    """`dinokit bench` runs the training loop and step: from the same seed, the same loss after the same
    steps as `dinokit train` (KoLeo on, drop path on: every part of the step counts)."""
    cfg = Config(**TINY, data=str(folder), koleo_weight=0.5, drop_path_rate=0.1, freeze_last_layer=0).validate()
    bench = benchmark(cfg, steps=2, warmup=1)
    trained = train(cfg, tmp_path / "run", max_steps=4, progress=False)  # bench: warm-up + timed + one more
    assert bench["loss"] == trained["loss"]
    assert bench["loss"] != train(Config(**{**cfg.to_dict(), "koleo_weight": 0.0}), tmp_path / "other",
                                  max_steps=4, progress=False)["loss"]  # the comparison can fail


def test_bench_times_the_configured_views_not_the_early_ones(folder, tmp_path):
    """A preset's smaller early views (`early_crops`) are left out of the timing: bench's steps are those of
    the same run without them."""
    cfg = Config(**TINY, data=str(folder), freeze_last_layer=0, early_crops=[8, 4], early_crops_share=0.5).validate()
    bench = benchmark(cfg, steps=2, warmup=1)
    full = train(Config(**{**cfg.to_dict(), "early_crops_share": 0.0}), tmp_path / "full", max_steps=4, progress=False)
    assert bench["loss"] == full["loss"]
    assert bench["loss"] != train(cfg, tmp_path / "early", max_steps=4, progress=False)["loss"]
