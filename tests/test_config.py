"""The training configuration: refused keys and values, presets, files, and its documentation."""
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from dinokit.train.config import Config, config_table, resolve
from dinokit.train.presets import PRESETS


def test_config_refuses_bad_keys_and_values(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        resolve(sets=["learning_rate=0.1"])
    with pytest.raises(ValueError, match="teacher_temp"):
        resolve(sets=["teacher_temp=-1"])
    with pytest.raises(ValueError, match="batch_size must be int"):
        resolve(sets=["batch_size=many"])
    with pytest.raises(ValueError, match="unknown preset"):
        resolve(preset="nope")
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.01\nepochs: 3\n")
    cfg = resolve(preset="fmnist-cpu", file=str(f), sets=["epochs=4"])
    assert cfg.lr == 0.01 and cfg.epochs == 4 and cfg.embed_dim == PRESETS["fmnist-cpu"]["embed_dim"]


def test_numbers_as_people_write_them_and_values_that_cannot_train(tmp_path):
    """1e-3 is a float (YAML 1.1 reads it as a string); NaN, infinities and impossible sizes are refused."""
    assert resolve(sets=["lr=1e-3", "min_lr=1E-6"]).lr == 1e-3
    f = tmp_path / "c.yaml"
    f.write_text("lr: 5e-4\nglobal_crops_scale: [4e-1, 1]\n")
    cfg = resolve(file=str(f))
    assert cfg.lr == 5e-4 and cfg.global_crops_scale == [0.4, 1.0]
    for bad, message in (("lr=.nan", "finite"), ("weight_decay=inf", "finite"), ("clip_grad=.inf", "finite"),
                         ("global_crops_scale=[0.4, .nan]", "finite"), ("drop_path_rate=1.5", "drop_path_rate"),
                         ("local_crop_size=64", "local_crop_size 64 is larger"), ("seed=-1", "seed must be >= 0")):
        with pytest.raises(ValueError, match=message):
            resolve(sets=[bad, "global_crop_size=32", "local_crops_number=2"])


def test_a_malformed_config_file_is_one_line_naming_file_line_and_column(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lr: 0.01\nepochs: [3\nbatch_size: 4\n")  # an unclosed list
    with pytest.raises(ValueError, match=rf"^{f}:\d+:\d+: not valid YAML"):
        resolve(file=str(f))
    twice = tmp_path / "twice.yaml"
    twice.write_text("lr: 0.01\nbatch_size: 4\nbatch_size: 8\n")  # which one was meant?
    with pytest.raises(ValueError, match=rf"^{twice}:3:1: not valid YAML \('batch_size' is given twice\)"):
        resolve(file=str(twice))
    r = subprocess.run([sys.executable, "-m", "dinokit", "train", "--config", str(f), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.fullmatch(rf"dinokit train: error: {f}:3:11: not valid YAML \(.*\)\n", r.stderr), r.stderr


def test_docs_list_every_config_key_with_its_default_and_meaning():
    """docs/training.md's table is the one Config's own field comments give: it cannot drift."""
    table = config_table()
    assert len(table.splitlines()) == 2 + len(fields(Config))  # every key has a comment
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    assert table in docs, "regenerate: python -c 'from dinokit.train.config import config_table; print(config_table())'"
