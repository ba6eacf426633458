"""`dinokit demo` end to end on a small folder: trains, evaluates beside pixels, writes its pictures."""
import json
import subprocess
import sys

from test_loop import write_fmnist_pngs


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path / "cache"))
    train_dir = write_fmnist_pngs(tmp_path / "train", "train", 256)
    test_dir = write_fmnist_pngs(tmp_path / "test", "test", 64)
    out = tmp_path / "demo"
    tiny = ["embed_dim=32", "depth=2", "num_heads=2", "out_dim=128", "head_hidden_dim=64", "bottleneck_dim=32",
            "batch_size=32", "save_every_steps=5"]
    r = subprocess.run([sys.executable, "-m", "dinokit", "demo", "--out", str(out), "--data", str(train_dir),
                        "--test", str(test_dir), "--time-budget", "25s", "--images", "2",
                        *[a for s in tiny for a in ("--set", s)]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "demo.json").read_text())
    assert result["steps"] > 0
    assert set(result["knn_top1"]) == {"10", "20", "100", "200"}
    assert all(0 <= v <= 100 for v in result["knn_top1"].values())
    assert result["pixels_knn_top1"]["20"] > 40  # 10 classes: pixels are far above chance even on 256 images
    for name in ("curves.png", "attention.png", "checkpoint.pt", "metrics.jsonl", "config.yaml"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "attention").glob("test*/attn-head*.png"))) == 2 * 2
    assert "raw pixels" in r.stdout and str(out / "attention.png") in r.stdout
