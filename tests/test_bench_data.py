"""The small labelled folders of bench/ that presets are checked on: they write what they say."""
import subprocess
import sys
from pathlib import Path

from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench"


def make(script: str, out: Path, *args: str):
    r = subprocess.run([sys.executable, str(BENCH / script), str(out), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def test_shapes_and_glyphs_write_class_folders_and_never_overwrite(tmp_path):
    make("make_shapes.py", tmp_path / "shapes", "--train", "3", "--test", "1")
    make("make_glyphs.py", tmp_path / "glyphs", "--train", "2", "--test", "1")
    for name, size, mode, classes in (("shapes", 32, "RGB", 10), ("glyphs", 28, "L", 10)):
        train = sorted((tmp_path / name / "train").glob("*/*.png"))
        assert len(train) == classes * (3 if name == "shapes" else 2)
        assert len(list((tmp_path / name / "test").glob("*/*.png"))) == classes
        with Image.open(train[0]) as im:
            assert im.size == (size, size) and im.mode == mode
    r = subprocess.run([sys.executable, str(BENCH / "make_shapes.py"), str(tmp_path / "shapes")], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "is not empty" in r.stderr
