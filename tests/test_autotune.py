"""Settings chosen from measurements and data: `precision=auto` (train/autotune.py) and `--preset auto`
(train/presets.py)."""
import json
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dinokit.cli import main as cli_main
from dinokit.data.sources import image_stats, open_source
from dinokit.train import autotune
from dinokit.train.config import Config, resolve
from dinokit.train.presets import PRESETS, auto_preset

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("DINOKIT_TUNE_CACHE", str(path))
    monkeypatch.setattr(autotune, "others_load", lambda: 0.0)  # a quiet machine
    monkeypatch.setattr(autotune, "others_since", lambda sample: 0.0)
    threads = torch.get_num_threads()
    yield path
    torch.set_num_threads(threads)


def fake_clock(ms: dict):
    """A `measure` that reports the given milliseconds per (precision, threads) and records its calls."""
    calls = []

    def measure(cfg, give_up=None):
        calls.append((cfg.precision, cfg.threads))
        return ms[(cfg.precision, cfg.threads)] / 1000
    return measure, calls


def test_auto_precision_is_the_fastest_measured_and_is_cached(cache, monkeypatch):
    monkeypatch.setattr(autotune, "candidates", lambda cfg: [("fp32", 2), ("bf16", 2), ("fp32", 1)])
    cfg = Config(precision="auto").validate()
    measure, calls = fake_clock({("fp32", 2): 50, ("bf16", 2): 35, ("fp32", 1): 70})
    tuned, why = autotune.choose(cfg, CPU, 1, measure)
    assert (tuned.precision, tuned.threads) == ("bf16", 2) and torch.get_num_threads() == 2
    assert len(calls) == 6  # every candidate, twice, interleaved: a passing load spoils one round, not a choice
    assert "bf16" in autotune.describe(why) and "35 ms" in autotune.describe(why)
    # the next run of the same shape reads the cache: no measurement
    measure, calls = fake_clock({("fp32", 2): 10, ("bf16", 2): 99, ("fp32", 1): 99})
    tuned, why = autotune.choose(cfg, CPU, 1, measure)
    assert calls == [] and tuned.precision == "bf16" and "earlier" in why["reason"]
    # another shape (a wider model) is measured on its own
    tuned, _ = autotune.choose(Config(precision="auto", embed_dim=768).validate(), CPU, 1, measure)
    assert tuned.precision == "fp32" and len(calls) == 6
    assert len(json.loads(cache.read_text())[autotune.machine_id()]) == 2


def test_a_choice_cached_by_an_older_way_of_timing_is_measured_again(cache, monkeypatch):
    """Revision 1 cached choices made on timings that other processes had disturbed (its entries have no
    `|timing` part): they are not read, and the new measurement is cached beside them."""
    monkeypatch.setattr(autotune, "candidates", lambda cfg: [("fp32", 2), ("fp32", 1)])
    cfg = Config(precision="auto").validate()
    old = autotune.machine_id().rsplit("|timing", 1)[0]
    assert old != autotune.machine_id()
    cache.write_text(json.dumps({old: {autotune.shape_key(cfg, 1): {"precision": "fp32", "threads": 1}}}))
    measure, calls = fake_clock({("fp32", 2): 60, ("fp32", 1): 90})
    tuned, why = autotune.choose(cfg, CPU, 1, measure)
    assert (tuned.threads, len(calls)) == (2, 4) and "measured on this machine" in why["reason"]
    assert set(json.loads(cache.read_text())) == {old, autotune.machine_id()}


def test_a_candidate_far_slower_than_the_best_is_given_up_and_not_timed_again(cache, monkeypatch):
    """Emulated bf16 (a CPU without it natively) can take a minute a step on a large model: its timing stops at
    the first step past LOST_AT times the best so far, and the second round skips it."""
    monkeypatch.setattr(autotune, "candidates", lambda cfg: [("fp32", 2), ("bf16", 2), ("fp32", 1)])
    limits = []

    def measure(cfg, give_up=None):
        limits.append((cfg.precision, cfg.threads, give_up))
        seconds = {("fp32", 2): 0.05, ("bf16", 2): 2.0, ("fp32", 1): 0.07}[(cfg.precision, cfg.threads)]
        return seconds if give_up is None else min(seconds, 1.01 * give_up)  # stopped at the first slow step
    tuned, why = autotune.choose(Config(precision="auto").validate(), CPU, 1, measure)
    assert tuned.precision == "fp32" and tuned.threads == 2
    assert [(p, t) for p, t, _ in limits] == [("fp32", 2), ("bf16", 2), ("fp32", 1), ("fp32", 2), ("fp32", 1)]
    assert limits[0][2] is None and limits[1][2] == pytest.approx(autotune.LOST_AT * 0.05)


def test_seconds_per_step_gives_up_at_the_first_slow_step_after_the_first():
    from dinokit.train.loop import seconds_per_step

    class Batch:
        views = [0]
    slept = []

    def step(batch):  # the first step compiles (slow, not held against it), the third is the slow one
        slept.append(0.3 if len(slept) in (0, 2) else 0.0)
        time.sleep(slept[-1])
    t = seconds_per_step(step, [Batch()] * 8, CPU, warmup=2, give_up=0.2)
    assert len(slept) == 3 and t >= 0.3
    slept.clear()
    assert seconds_per_step(step, [Batch()] * 8, CPU, warmup=2) < 0.2 and len(slept) == 8


def test_a_choice_measured_on_a_busy_machine_is_not_cached(cache, monkeypatch):
    monkeypatch.setattr(autotune, "others_load", lambda: 1.8)
    measure, _ = fake_clock({("fp32", n): 50 for n in (1, 2, torch.get_num_threads())} |
                            {("bf16", n): 60 for n in (1, 2, torch.get_num_threads())})
    tuned, why = autotune.choose(Config(precision="auto").validate(), CPU, 1, measure)
    assert tuned.precision == "fp32" and "not cached" in why["reason"] and not cache.exists()


def test_a_timing_disturbed_by_other_processes_is_taken_again_and_not_trusted(cache, monkeypatch):
    """With every core in use, a core taken by another process for a few seconds slowed 2 threads 55-fold on
    2 cores (3.7 s a step against 66 ms): such a timing is taken again, and a choice made on one is not cached."""
    monkeypatch.setattr(autotune, "candidates", lambda cfg: [("fp32", 2), ("fp32", 1)])
    ms = {("fp32", 2): [3700, 57, 58], ("fp32", 1): [83, 84]}  # the first timing of 2 threads is disturbed
    calls = []

    def measure(cfg, give_up=None):
        calls.append((cfg.precision, cfg.threads))
        return ms[(cfg.precision, cfg.threads)].pop(0) / 1000
    others = iter([1.0, 0.0, 0.0, 0.0, 0.0])  # cores other processes took during each timing, in order
    monkeypatch.setattr(autotune, "others_since", lambda sample: next(others))
    tuned, why = autotune.choose(Config(precision="auto").validate(), CPU, 1, measure)
    assert calls == [("fp32", 2), ("fp32", 2), ("fp32", 1), ("fp32", 2), ("fp32", 1)]
    assert tuned.threads == 2 and why["ms_per_step"] == {"fp32/2": 57, "fp32/1": 83} and cache.exists()
    # disturbed again when timed again: the quieter timing is kept, and the choice holds for this run only
    cache.unlink()
    ms = {("fp32", 2): [90, 95, 57, 60], ("fp32", 1): [83, 84]}
    others = iter([1.5, 0.9, 0.0, 0.0, 0.0, 0.0])
    tuned, why = autotune.choose(Config(precision="auto").validate(), CPU, 1, measure)
    assert why["ms_per_step"]["fp32/2"] == 57 and "not cached" in why["reason"] and not cache.exists()


def test_other_processes_cpu_time_is_told_from_our_own():
    import subprocess
    import sys
    if autotune.cpu_sample() is None:
        pytest.skip("needs /proc")
    if autotune.others_load() > autotune.DISTURBED:
        pytest.skip("other processes are busy: our own work could not be told from theirs")
    a = torch.randn(512, 512)
    sample = autotune.cpu_sample()
    start = time.perf_counter()
    while time.perf_counter() - start < 0.5:  # our own work, on every core, is not another process's
        a @ a
    assert autotune.others_since(sample) < autotune.DISTURBED
    # a process that is not ours: its parent, a shell, leaves it running and exits
    spin = f"{sys.executable} -c 'import time\nt = time.time()\nwhile time.time() - t < 1.3: pass' &"
    subprocess.run(["sh", "-c", spin], check=True)
    time.sleep(0.2)
    sample = autotune.cpu_sample()
    time.sleep(1.0)
    assert autotune.others_since(sample) > autotune.DISTURBED
    time.sleep(0.2)  # it has ended


def test_a_short_time_budget_is_not_spent_measuring_unless_the_choice_is_cached(cache, monkeypatch):
    monkeypatch.setattr(autotune, "candidates", lambda cfg: [("fp32", 2), ("bf16", 2)])
    cfg = Config(precision="auto").validate()
    measure, calls = fake_clock({("fp32", 2): 50, ("bf16", 2): 35})
    tuned, why = autotune.choose(cfg, CPU, 1, measure, time_budget=20)
    assert calls == [] and tuned.precision == "fp32" and "not measured" in why["reason"] and not cache.exists()
    autotune.choose(cfg, CPU, 1, measure, time_budget=600)  # long enough: measured, and cached
    tuned, why = autotune.choose(cfg, CPU, 1, measure, time_budget=20)
    assert len(calls) == 4 and tuned.precision == "bf16" and "earlier" in why["reason"]


def test_an_explicit_precision_always_wins(cache):
    measure, calls = fake_clock({})
    tuned, why = autotune.choose(Config(precision="bf16", threads=1).validate(), CPU, 1, measure)
    assert (tuned.precision, tuned.threads, why["reason"], calls) == ("bf16", 1, "given", [])


def test_without_threads_a_run_uses_every_core_whatever_an_earlier_call_left(cache):
    """A run's thread count (and with it its float sums, and whether its resume is exact) must not depend on
    what the same process did before, e.g. an earlier run that measured one thread as the fastest."""
    torch.set_num_threads(1)
    tuned, _ = autotune.choose(Config(precision="fp32").validate(), CPU, 1, fake_clock({})[0])
    assert tuned.threads == autotune.all_cores() == torch.get_num_threads()


def test_a_run_records_its_choice_and_resumes_with_it(cache, tmp_path):
    from test_loop import TINY, write_fmnist_pngs
    data = write_fmnist_pngs(tmp_path / "data", "train", 32)
    cfg = Config(**{**TINY, "precision": "auto"}, data=str(data)).validate()
    from dinokit.train.loop import train
    train(cfg, tmp_path / "run", max_steps=2, progress=False)
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["precision"] in ("fp32", "bf16") and written["threads"] >= 1  # resolved, not "auto"
    assert set(written["resolved"]["precision_choice"]["ms_per_step"]) == \
        {f"{p}/{t}" for p, t in autotune.candidates(cfg)}


def write_folder(root, n, size, mode="RGB"):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(d / f"{i}.png")
    return root


def test_auto_preset_follows_the_data_and_reproduces_fmnist_cpu(tmp_path):
    stats = image_stats(open_source("fashion-mnist:train"))
    assert stats == {"images": 60000, "short_side": 28, "grey": True}
    values, reasons = auto_preset(stats, "cpu", time_budget=None)
    assert values == PRESETS["fmnist-cpu"]  # the named preset is what auto picks for it on a CPU
    assert any("20 px" in r for r in reasons)
    colour = image_stats(open_source(str(write_folder(tmp_path / "colour", 40, (32, 36)))))
    assert colour == {"images": 40, "short_side": 32, "grey": False}
    values, _ = auto_preset(colour, "cpu", 300)
    # K: 256 for 40 images
    assert (values["global_crop_size"], values["stem"], values["out_dim"]) == (20, "conv-full-relu", 256)
    crops = [(v["global_crop_size"], v["local_crop_size"]) for v in
             (auto_preset({"images": 10_000, "short_side": side, "grey": True}, "cpu", 300)[0] for side in (16, 64))]
    assert crops == [(12, 8), (20, 12)]  # 5/7 and 3/7 of the side, at most 5 x 5 and 3 x 3 tokens
    mid = {"images": 6000, "short_side": 96, "grey": False}
    on_cpu, why = auto_preset(mid, "cpu", 300)
    assert on_cpu == PRESETS["fmnist-cpu"]  # mid-size on a CPU: the small recipe, views brought down to 20 px
    assert any(line.startswith("images larger than 64 px on a CPU") for line in why)
    assert auto_preset(mid, "cuda", 300)[0]["patch_size"] == 8  # on a GPU: the mid-size ViT
    photos = {"images": 100_000, "short_side": 375, "grey": False}
    assert auto_preset(photos, "cuda")[0] == {"local_crops_number": 10, "out_dim": 16384}  # the paper's recipe
    assert auto_preset(photos, "cpu", 3600)[0] == PRESETS["fmnist-cpu"]  # a CPU: the small recipe at any size
    cpu_photos = auto_preset(photos, "cpu")[0]
    assert cpu_photos["epochs"] == 20_000 // (100_000 // 32)  # no budget: about 20,000 steps on a CPU
    resolve(cpu_photos).validate()  # every rule gives a valid configuration


def test_train_without_a_preset_uses_auto_and_says_why(tmp_path, capsys):
    data = write_folder(tmp_path / "data", 24, (30, 30), "L")
    out = tmp_path / "run"
    code = cli_main(["train", "--data", str(data), "--out", str(out), "--max-steps", "1", "--no-progress",
                     "--set", "batch_size=8", "--set", "precision=fp32",
                     "--set", "early_crops_share=0.75"])  # valid only with the early crops auto adds
    assert code == 0
    err = capsys.readouterr().err
    assert "auto: data: 24 images, median short side 30 px, grey" in err
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["global_crop_size"] == 20 and written["batch_size"] == 8  # --set still wins
    assert written["early_crops"] == [16, 8] and written["early_crops_share"] == 0.75
    assert written["resolved"]["auto"][0].startswith("data: 24 images")


def test_auto_fits_its_batch_to_a_folder_of_a_few_images():
    """Fewer images than the recipe's batch: a batch they fill (a power of two), said, and the step count said
    is the run's."""
    values, reasons = auto_preset({"images": 5, "short_side": 28, "grey": True}, "cpu")
    assert values["batch_size"] == 4 and any("batch 4: the data holds 5 images" in r for r in reasons)
    assert reasons[-1].startswith(f"no time budget: {values['epochs']} epochs, about {values['epochs']} steps")
    assert auto_preset({"images": 30, "short_side": 300, "grey": False}, "cuda")[0]["batch_size"] == 16
    assert auto_preset({"images": 60000, "short_side": 28, "grey": True}, "cpu")[0]["batch_size"] == 32
