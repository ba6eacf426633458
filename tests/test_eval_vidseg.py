"""`dinokit vidseg` and the synthetic DAVIS generator: metrics and propagation on hand-made cases, the
command end to end on generated videos."""
import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.eval.davis_synth import davis_palette, make_davis
from dinokit.eval.vidseg import (contour_accuracy, neighbourhood_mask, propagate, region_similarity,
                                 score_video)
from test_eval_common import _cache_in_tmp, run_cli, save_vit, tiny_vit  # noqa: F401


def square(top, left, n=20, shape=(100, 100)):
    m = np.zeros(shape, bool)
    m[top:top + n, left:left + n] = True
    return m


def test_region_similarity_by_hand():
    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[0:4, 0:4], b[2:6, 0:4] = True, True  # overlap 2 x 4 = 8, union 24
    assert region_similarity(a, b) == pytest.approx(1 / 3)
    assert region_similarity(a, a) == 1.0
    assert region_similarity(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0
    assert region_similarity(a, np.zeros_like(a)) == 0.0


def test_contour_accuracy_by_hand():
    gt = square(20, 20)
    assert contour_accuracy(gt, gt) == 1.0
    # Tolerance: ceil(0.008 x diagonal 141.4) = 2 pixels. One pixel off: every boundary pixel still matches.
    assert contour_accuracy(square(21, 21), gt) == 1.0
    assert contour_accuracy(square(60, 60), gt) == 0.0  # far apart
    assert contour_accuracy(np.zeros_like(gt), gt) == 0.0
    # The right square plus an equal far-away one: precision 1/2, recall 1, F = 2/3.
    assert contour_accuracy(gt | square(60, 60), gt) == pytest.approx(2 / 3)


def test_score_video_skips_first_and_last_frames():
    gts = [square(20, 20).astype(np.uint8)] * 4
    empty = np.zeros((100, 100), np.uint8)
    half = square(20, 20).astype(np.uint8)
    half[20:30] = 0  # IoU 1/2
    scores = score_video([empty, half, gts[0], empty], gts)  # frames 1 and 2 count
    j, f = scores[1]
    assert j == pytest.approx((0.5 + 1.0) / 2)
    assert 0.5 < f < 1.0


def test_neighbourhood_by_hand():
    m = neighbourhood_mask(3, 3, 1)
    assert m.sum(1).tolist() == [4, 6, 4, 6, 9, 6, 4, 6, 4]
    assert neighbourhood_mask(3, 4, 5).all()


def test_propagate_follows_matching_features():
    feats = torch.eye(6)  # orthogonal patch features: each target matches exactly one source
    labels = torch.tensor([[1.0, 1, 0, 0, 0, 1], [0, 0, 1, 1, 1, 0]])  # C = 2, P = 6
    same = propagate(feats, [feats], [labels])
    assert same.argmax(0).tolist() == labels.argmax(0).tolist()
    perm = torch.tensor([2, 0, 1, 5, 3, 4])  # target patch i looks like source patch perm[i]
    moved = propagate(feats[perm], [feats], [labels])
    assert moved.argmax(0).tolist() == labels.argmax(0)[perm].tolist()
    assert torch.allclose(moved.sum(0), torch.ones(6))  # soft labels: a distribution per patch
    # A neighbourhood that forbids the matching source: the other five tie (exp(0)), all kept, equal votes.
    far = ~torch.eye(6, dtype=torch.bool)
    expected = torch.stack([labels[:, far[i]].mean(1) for i in range(6)], 1)
    torch.testing.assert_close(propagate(feats, [feats], [labels], topk=1, mask=far), expected)


def test_synthetic_videos_layout(tmp_path):
    names = make_davis(tmp_path, videos=2, frames=4, size=(48, 64), objects=2, seed=0)
    assert (tmp_path / "ImageSets" / "2017" / "val.txt").read_text().split() == names
    for name in names:
        ann = sorted((tmp_path / "Annotations" / "480p" / name).glob("*.png"))
        jpg = sorted((tmp_path / "JPEGImages" / "480p" / name).glob("*.jpg"))
        assert [p.stem for p in ann] == [p.stem for p in jpg] == ["00000", "00001", "00002", "00003"]
        with Image.open(ann[0]) as im:
            assert im.mode == "P" and im.size == (64, 48)
            assert set(np.unique(np.asarray(im))) <= {0, 1, 2} and np.asarray(im).max() >= 1
            assert im.getpalette()[3:9] == [128, 0, 0, 0, 128, 0]  # DAVIS colours of objects 1 and 2
        first, last = (np.asarray(Image.open(p)) for p in (ann[0], ann[-1]))
        assert not np.array_equal(first, last)  # the objects move
    assert davis_palette()[3].tolist() == [128, 128, 0]


def test_vidseg_command_end_to_end(tmp_path, capsys):
    names = make_davis(tmp_path / "davis", videos=2, frames=5, size=(48, 64), objects=2, seed=1)
    weights = save_vit(tiny_vit(), tmp_path / "vit.safetensors")
    code, result, err = run_cli(["vidseg", "--weights", str(weights), "--davis", str(tmp_path / "davis"),
                                 "--out", str(tmp_path / "out"), "--size", "0", "--device", "cpu", "--json",
                                 "--quiet"], capsys)
    assert code == 0, err
    ious = []
    for name in names:
        preds = sorted((tmp_path / "out" / name).glob("*.png"))
        assert [p.name for p in preds] == [f"{t:05d}.png" for t in range(5)]
        gts = [np.asarray(Image.open(tmp_path / "davis" / "Annotations" / "480p" / name / p.name)) for p in preds]
        pred = [np.asarray(Image.open(p)) for p in preds]
        assert Image.open(preds[1]).mode == "P" and pred[1].shape == (48, 64)
        assert np.array_equal(pred[0], gts[0])  # the given first frame
        for k in (1, 2):
            js = []
            for t in (1, 2, 3):  # not the first nor the last frame
                inter = np.sum((pred[t] == k) & (gts[t] == k))
                union = np.sum((pred[t] == k) | (gts[t] == k))
                js.append(1.0 if union == 0 else inter / union)
            assert result["videos"][name][str(k)]["J"] == pytest.approx(np.mean(js))
            ious.append(np.mean(js))
    assert result["J_mean"] == pytest.approx(np.mean(ious))
    assert result["JF_mean"] == pytest.approx((result["J_mean"] + result["F_mean"]) / 2)


def test_score_video_objects_and_void_as_davis_counts_them():
    # davis2017-evaluation scores objects 1..max id of the first annotation (an id missing from it still
    # counts) and treats void pixels (255) as background.
    gt = square(20, 20).astype(np.uint8) * 2
    gt[0:5, 0:5] = 255
    pred = square(20, 20).astype(np.uint8) * 2
    scores = score_video([gt, pred, pred, gt], [gt, gt, gt, gt])
    assert sorted(scores) == [1, 2]
    assert scores[1] == (1.0, 1.0)  # empty in both: a perfect score, as the benchmark gives it
    assert scores[2] == (1.0, 1.0)  # the void corner is not a region of object 2's truth
