"""`dinokit maskeval`: the Jaccard index on hand-made masks, true masks in every PNG mode, the geometry, the
command end to end with known answers, and bad input."""
import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_common import run_cli, save_vit, tiny_vit, write_images

from dinokit.data.normalize import normalize
from dinokit.eval.attention import cls_attention, mass_mask, prepare
from dinokit.eval.davis_synth import save_indexed
from dinokit.eval.maskeval import (
    jaccard,
    read_true_mask,
    summarise,
    true_mask_on_pixels,
)


def m(rows: list[str]) -> torch.Tensor:
    """A bool mask drawn with '#' (foreground) and '.'."""
    return torch.tensor([[c == "#" for c in row] for row in rows])


def test_jaccard_on_hand_made_masks():
    true = m(["##..",
              "##..",
              "....",
              "...."])
    assert jaccard(true, true).item() == 1.0
    assert jaccard(~true, true).item() == 0.0
    half = m(["#...",
              "#...",
              "....",
              "...."])  # inside: 2 / 4
    wide = m(["###.",
              "###.",
              "###.",
              "...."])  # covers: 4 / 9
    shifted = m([".##.",
                 ".##.",
                 "....",
                 "...."])  # 2 shared of 6
    heads = torch.stack([half, wide, shifted, torch.zeros(4, 4, dtype=torch.bool)])
    assert jaccard(heads, true).tolist() == pytest.approx([2 / 4, 4 / 9, 2 / 6, 0.0])
    empty = torch.zeros(2, 2, dtype=torch.bool)
    assert jaccard(empty, empty).item() == 1.0  # nothing to find, nothing found


def test_summary_means_best_head_and_per_image_best():
    per_image = torch.tensor([[0.2, 0.6, 0.4],
                              [0.4, 0.2, 0.9]])
    s = summarise(per_image)
    assert s["per_head"] == pytest.approx([30.0, 40.0, 65.0])
    assert s["mean_over_heads"] == pytest.approx(45.0)
    assert s["best_head"] == 2 and s["best_head_jaccard"] == pytest.approx(65.0)
    assert s["per_image_best"] == pytest.approx(75.0)  # (0.6 + 0.9) / 2


def test_true_masks_in_any_png_mode(tmp_path):
    labels = np.array([[0, 1, 2], [0, 0, 3]], np.uint8)
    save_indexed(tmp_path / "indexed.png", labels)  # DAVIS: palette indices, 0 background
    Image.fromarray(labels * 85).save(tmp_path / "grey.png")
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 1, 2] = 1  # a faint blue is foreground too
    rgb[0, 2] = 255
    rgb[1, 2, 0] = 7
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    expected = labels > 0
    for name in ("indexed.png", "grey.png", "rgb.png"):
        np.testing.assert_array_equal(read_true_mask(tmp_path / name).numpy(), expected, err_msg=name)


def test_true_mask_follows_the_image_resize_and_crop():
    true = m(["#..",
              ".#.",
              "..#"])
    # shorter side 3 -> 6: each pixel becomes 2 x 2 (nearest), then cropped to 4 x 4 (whole patches of 4)
    on_pixels = true_mask_on_pixels(true, (3, 3), 6, (4, 4))
    assert torch.equal(on_pixels, true.repeat_interleave(2, 0).repeat_interleave(2, 1)[:4, :4])
    assert torch.equal(true_mask_on_pixels(true, (3, 3), 0, (2, 2)), true[:2, :2])  # no resize: the crop only


def model_masks(model, img: np.ndarray, image_size: int) -> torch.Tensor:
    """Each head's 60%-mass patch mask of an image, as `dinokit attention` computes it (tested there)."""
    x = prepare(torch.from_numpy(img.copy()).permute(2, 0, 1), image_size, model.patch_size)
    with torch.no_grad():
        return mass_mask(cls_attention(model, normalize(x)), 0.6)


def on_pixels(patch_masks: torch.Tensor, size: int) -> np.ndarray:
    return patch_masks.repeat_interleave(size, -2).repeat_interleave(size, -1).numpy()


def test_command_scores_known_masks(tmp_path, capsys):
    rng = np.random.default_rng(0)
    model = tiny_vit()
    weights = save_vit(model, tmp_path / "vit.safetensors")
    odd = rng.integers(0, 256, (45, 37, 3), dtype=np.uint8)  # --image-size 0: cropped to 40 x 32 (patch 8)
    small = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # resized to 40 x 60 and cropped to 40 x 56
    write_images(tmp_path / "img", {"v/odd.png": odd, "v/small.jpg": small, "v/nomask.png": small,
                                    "v/empty.png": small, "v/wrongsize.png": small})
    (tmp_path / "masks" / "v").mkdir(parents=True)

    # odd: the true mask is head 0's mask exactly; outside the crop it is all foreground (must be ignored)
    heads = model_masks(model, odd, 0)
    true_odd = np.ones((45, 37), bool)
    true_odd[:40, :32] = on_pixels(heads[0], 8)
    save_indexed(tmp_path / "masks" / "v" / "odd.png", true_odd.astype(np.uint8))
    # small: the true mask is the complement of head 0's, drawn at the image's own scale (a patch: 4 pixels)
    small_jpeg = np.asarray(Image.open(tmp_path / "img" / "v" / "small.jpg").convert("RGB"))
    heads_small = model_masks(model, small_jpeg, 40)
    true_small = np.zeros((20, 30), bool)
    true_small[:, :28] = ~on_pixels(heads_small[0], 4)
    Image.fromarray(true_small.astype(np.uint8) * 255).save(tmp_path / "masks" / "v" / "small.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "masks" / "v" / "empty.png")
    Image.fromarray(np.full((10, 30), 255, np.uint8)).save(tmp_path / "masks" / "v" / "wrongsize.png")

    code, result, err = run_cli(["maskeval", "--weights", str(weights), "--images", str(tmp_path / "img"),
                                 "--masks", str(tmp_path / "masks"), "--image-size", "0", "--json",
                                 "--device", "cpu"], capsys)
    assert code == 0, err
    assert result["n_images"] == 2  # odd and small
    reasons = {r["image"].rsplit("/", 1)[1]: r["reason"] for r in result["skipped"]}
    assert set(reasons) == {"nomask.png", "empty.png", "wrongsize.png"}
    assert "no true mask" in reasons["nomask.png"] and "no foreground" in reasons["empty.png"]
    assert "10x30" in reasons["wrongsize.png"]
    odd_scores = result["per_image"][str(tmp_path / "img" / "v" / "odd.png")]
    assert odd_scores[0] == pytest.approx(100.0)
    for h in (1, 2):  # the other heads against head 0's mask, counted here
        a, b = on_pixels(heads[h], 8), on_pixels(heads[0], 8)
        assert odd_scores[h] == pytest.approx(100 * (a & b).sum() / (a | b).sum(), abs=1e-4)

    code, result, err = run_cli(["maskeval", "--weights", str(weights), "--images", str(tmp_path / "img"),
                                 "--masks", str(tmp_path / "masks"), "--image-size", "40", "--json"], capsys)
    assert code == 0, err
    small_scores = result["per_image"][str(tmp_path / "img" / "v" / "small.jpg")]
    assert small_scores[0] == pytest.approx(0.0)  # the complement: nothing shared
    both = np.array(list(result["per_image"].values())) / 100
    assert result["per_head"] == pytest.approx(list(both.mean(0) * 100), abs=1e-4)
    assert result["per_image_best"] == pytest.approx(both.max(1).mean() * 100, abs=1e-4)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    weights = save_vit(tiny_vit(), tmp_path / "vit.safetensors")
    write_images(tmp_path / "img", {"a.png": np.zeros((16, 16, 3), np.uint8)})
    (tmp_path / "masks").mkdir()
    base = ["maskeval", "--weights", str(weights), "--images", str(tmp_path / "img")]
    code, _, err = run_cli(base + ["--masks", str(tmp_path / "nope")], capsys)
    assert code == 2 and "--masks" in err and "no such folder" in err
    code, _, err = run_cli(base + ["--masks", str(tmp_path / "masks")], capsys)
    assert code == 2 and "no image under" in err and "a.png" in err
    code, _, err = run_cli(base + ["--masks", str(tmp_path / "masks"), "--threshold", "1.5"], capsys)
    assert code == 2 and "--threshold" in err
    (tmp_path / "masks" / "a.png").write_bytes(b"not a png")
    code, _, err = run_cli(base + ["--masks", str(tmp_path / "masks")], capsys)
    assert code == 2 and "none of the 1 images" in err and "unreadable" in err
