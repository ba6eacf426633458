"""dinokit's evaluation protocols against the paper's own evaluation code: linear probe, video segmentation,
copy detection, retrieval. The expected numbers are outputs of the paper's functions on seeded inputs
(tests/fixtures/README.md says how they were made); nothing here runs the paper's code."""
import json
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import recipe_state_dict
from dinokit.data.sources import FolderSource
from dinokit.eval import vidseg
from dinokit.eval.copydetect import learn_whitening, square_transform
from dinokit.eval.features import cls_gem_features, extract_features, last_blocks_features
from dinokit.eval.linear import new_classifier, train_probe
from dinokit.eval.retrieve import (BenchmarkImages, average_precision, evaluate, multiscale_cls,
                                   positive_positions, shrink_to)
from dinokit.models.vit import VisionTransformer
from test_eval_common import _cache_in_tmp, run_cli  # noqa: F401

FIXTURES = Path(__file__).parent / "fixtures"
FEATURES_ATOL = 1e-4  # float32 features, computed in other batch shapes
METRIC_ATOL = 1e-6  # mAP, J, F


@pytest.fixture(scope="module")
def ref():
    meta = json.loads((FIXTURES / "protocols.json").read_text())
    with np.load(FIXTURES / "protocols.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


@pytest.fixture(scope="module")
def backbone(ref):
    spec = ref[0]["backbone"]
    model = VisionTransformer(**spec["arch"])
    assert list(model.state_dict()) == [k for k, _ in spec["state_dict"]], "parameter names or order differ"
    model.load_state_dict(recipe_state_dict(spec["state_dict"], spec["seed"]), strict=True)
    return model.eval()


def close(actual, expected, atol=FEATURES_ATOL):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=atol, rtol=0)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


# ---- linear probe ---------------------------------------------------------------------------------------------
def test_linear_probe_features_init_and_forward(ref, backbone):
    meta, arrays = ref
    x = torch.from_numpy(arrays["linear_input"].astype(np.float32))
    for case in meta["linear"]["cases"]:
        expected = arrays[f"linear_features_{case['name']}"]
        with torch.no_grad():
            feats = last_blocks_features(case["n_last_blocks"], case["avgpool"])(backbone, x)
        assert feats.shape == expected.shape
        close(feats, expected)
        torch.manual_seed(5)  # the seed the paper's LinearClassifier was built under
        linear = new_classifier(case["dim"], meta["linear"]["classes"])
        close(linear.weight, arrays[f"linear_init_weight_{case['name']}"], atol=0)
        with torch.no_grad():
            close(linear(torch.from_numpy(expected)), arrays[f"linear_logits_{case['name']}"])


def test_linear_probe_training_matches_the_papers_optimiser_and_schedule(ref, backbone):
    meta, arrays = ref
    spec = meta["linear"]["train"]
    x = torch.from_numpy(arrays["linear_input"].astype(np.float32))
    y = torch.from_numpy(arrays["linear_labels"]).long()
    with torch.no_grad():
        feats = last_blocks_features(spec["n_last_blocks"], spec["avgpool"])(backbone, x)
    torch.manual_seed(spec["init_seed"])
    linear = new_classifier(feats.shape[1], meta["linear"]["classes"])
    # The paper drew each epoch's order as torch.randperm(N, generator) from a generator seeded so.
    generator = torch.Generator().manual_seed(spec["order_seed"])
    loss = train_probe(linear, lambda epoch: (feats, y), spec["lr"], spec["epochs"], meta["linear"]["batch"],
                       generator)
    close(linear.weight, arrays["linear_trained_weight"], atol=1e-5)
    close(linear.bias, arrays["linear_trained_bias"], atol=1e-5)
    assert loss == pytest.approx(spec["epoch_mean_losses"][-1], abs=1e-5)  # equal batches: same mean


# ---- video segmentation ----------------------------------------------------------------------------------------
def test_vidseg_frame_size_rule(ref):
    for oh, ow, th, tw in ref[0]["vidseg"]["read_frame_sizes"]:
        assert vidseg.frame_size(oh, ow, 480, 16) == (th, tw), (oh, ow)


def test_vidseg_frame_preprocessing(ref, tmp_path):
    """The reference resizes 8-bit frames with OpenCV, whose fixed-point bilinear weights round a little
    differently: equal within one grey level, and on average much closer (0.13 levels here; resizing without
    rounding to whole levels is 0.27 levels off, with antialiasing or corner alignment far more)."""
    meta, arrays = ref
    path = write_png(tmp_path / "frame.png", arrays["vidseg_frame_input"])
    expected = torch.from_numpy(arrays["vidseg_frame_output"].astype(np.float32))
    frame = vidseg.load_frame(path, tuple(expected.shape[-2:]))
    diff = (frame - expected).abs()
    one_level = 1 / 255 / 0.224
    assert diff.max() < one_level + 3e-3  # + float16 storage of the expected frame
    assert diff.mean() < 0.2 * one_level


class FixedFeatures(torch.nn.Module):
    """Stands in for the backbone, as in the fixture: frame i's given patch features on its i-th call."""

    def __init__(self, feats: torch.Tensor, patch: int):
        super().__init__()
        self.feats, self.patch_size, self.calls = feats, patch, 0

    def get_intermediate_layers(self, x, n=1):
        f = self.feats[self.calls]
        self.calls += 1
        assert (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size) == len(f)
        return [torch.cat([torch.zeros(1, 1, f.shape[1]), f[None]], dim=1)]

    def get_last_selfattention(self, x):
        raise AssertionError("not used by video segmentation")


@pytest.mark.parametrize("config", [0, 1, 2])
def test_vidseg_propagation_masks_and_davis_scores(ref, tmp_path, capsys, monkeypatch, config):
    meta, arrays = ref
    spec, cfg = meta["vidseg"], meta["vidseg"]["configs"][config]
    gt = arrays["vidseg_gt"]
    h, w = spec["frame_size"]
    root = tmp_path / "davis"
    frames, annotations = root / "JPEGImages" / "480p" / "synth", root / "Annotations" / "480p" / "synth"
    frames.mkdir(parents=True)
    annotations.mkdir(parents=True)
    for t in range(spec["frames"]):  # the frames' pixels do not matter: the features are given
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(frames / f"{t:05d}.jpg")
        vidseg.save_indexed(annotations / f"{t:05d}.png", gt[t])
    feats = torch.from_numpy(arrays["vidseg_features"].astype(np.float32))
    monkeypatch.setattr(vidseg, "load_model", lambda *a, **k: FixedFeatures(feats, spec["patch"]))
    code, result, err = run_cli(["vidseg", "--weights", "fixed-features", "--davis", str(root), "--out",
                                 str(tmp_path / "out"), "--n-last-frames", str(cfg["n_last_frames"]),
                                 "--neighbourhood", str(cfg["size_mask_neighborhood"]), "--topk", str(cfg["topk"]),
                                 "--device", "cpu", "--json", "--quiet"], capsys)
    assert code == 0, err
    preds = np.stack([np.asarray(Image.open(tmp_path / "out" / "synth" / f"{t:05d}.png"))
                      for t in range(spec["frames"])])
    expected = arrays[f"vidseg_pred{config}"]
    assert (preds != expected).sum() == 0, f"{(preds != expected).sum()} pixels differ"
    for k in (1, 2):
        assert result["videos"]["synth"][str(k)]["J"] == pytest.approx(cfg["J_per_object"][f"synth_{k}"],
                                                                       abs=METRIC_ATOL)
        assert result["videos"]["synth"][str(k)]["F"] == pytest.approx(cfg["F_per_object"][f"synth_{k}"],
                                                                       abs=METRIC_ATOL)
    for key in ("J_mean", "F_mean", "JF_mean"):
        assert result[key] == pytest.approx(cfg[key], abs=METRIC_ATOL)


# ---- copy detection --------------------------------------------------------------------------------------------
def copydays_layout(arrays, root: Path) -> Path:
    for key, a in arrays.items():
        if key.startswith("copydetect_image/"):
            write_png(root / f"{key[len('copydetect_image/'):]}.png", a)
    return root


def test_copydetect_descriptors(ref, backbone, tmp_path):
    meta, arrays = ref
    root = copydays_layout(arrays, tmp_path / "cd")
    for block in ("original", "strong", "distractors", "whitening"):
        feats, kept, skipped = extract_features(backbone, FolderSource(root / block), batch_size=7,
                                                feature_fn=cls_gem_features(meta["copydetect"]["gem_p"]),
                                                transform=partial(square_transform, size=meta["copydetect"]["imsize"]),
                                                progress=False)
        assert not skipped
        close(feats, arrays[f"copydetect_descriptor_{block}"])


def test_copydetect_whitening(ref):
    _, arrays = ref
    mean, projection = learn_whitening(torch.from_numpy(arrays["whitening_train"].astype(np.float32)))
    white = (torch.from_numpy(arrays["whitening_apply_to"]) - mean) @ projection
    expected = torch.from_numpy(arrays["whitening_result"])
    white = white * torch.sign((white * expected).sum(0))  # each component's sign is the eigen-solver's choice
    # The reference eigendecomposes in float32 (2e-5 of a component's scale off the exact result: 4e-4 where
    # the smallest eigenvalue scales a component up to 8); dinokit in float64. Compared relative to each
    # component's scale, and as the search uses them, L2-normalised.
    assert ((white - expected).abs() / expected.abs().amax(0)).max() < 1e-4
    close(torch.nn.functional.normalize(white, dim=1), torch.nn.functional.normalize(expected, dim=1))


def test_copydetect_map(ref, backbone, tmp_path, capsys, monkeypatch):
    meta, arrays = ref
    root = copydays_layout(arrays, tmp_path / "cd")
    monkeypatch.setattr("dinokit.eval.copydetect.load_model", lambda *a, **k: backbone)
    code, result, err = run_cli(["copydetect", "--weights", "seeded", "--data", str(root), "--image-size",
                                 str(meta["copydetect"]["imsize"]), "--no-cache", "--device", "cpu", "--json",
                                 "--quiet"], capsys)
    assert code == 0, err
    assert result["whitened"] and result["n_database"] == 21
    assert result["mAP"]["strong"] == pytest.approx(meta["copydetect"]["strong_mAP"], abs=METRIC_ATOL)


# ---- retrieval -----------------------------------------------------------------------------------------------
def test_retrieval_metric_on_fixed_rankings(ref):
    meta, arrays = ref
    spec = meta["retrieval_fixed"]
    rankings = arrays["retrieval_fixed_ranks"].T  # the paper's ranks are (database, queries)
    gnd = [{**g, "bbx": None} for g in spec["gnd"]]
    results = evaluate(rankings, gnd, ks=(1, 5, 10))
    settings = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
                "hard": (("hard",), ("junk", "easy"))}
    for setting, (ok, junk) in settings.items():
        expected = spec[setting]
        for k in ("mAP", "mP@1", "mP@5", "mP@10"):
            assert results[setting][k] == pytest.approx(expected[k], abs=METRIC_ATOL), (setting, k)
        for q, g in enumerate(gnd):
            positives = [i for label in ok for i in g[label]]
            if expected["aps"][q] is None:
                assert not positives
                continue
            pos = positive_positions(rankings[q], positives, [i for label in junk for i in g[label]])
            assert average_precision(pos, len(positives)) == pytest.approx(expected["aps"][q], abs=METRIC_ATOL)


def retrieval_layout(meta, arrays, root: Path) -> Path:
    spec = meta["retrieval"]
    for name in spec["imlist"] + spec["qimlist"]:
        write_png(root / "jpg" / f"{name}.jpg", arrays[f"retrieval_image/{name}"])  # PNG bytes, the name it is read by
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({k: spec[k] for k in ("imlist", "qimlist", "gnd")}))
    return root


def test_retrieval_inputs_and_features(ref, backbone, tmp_path):
    meta, arrays = ref
    spec = meta["retrieval"]
    root = retrieval_layout(meta, arrays, tmp_path / "roxford5k")
    for name in spec["imlist"] + spec["qimlist"]:
        img = torch.from_numpy(arrays[f"retrieval_image/{name}"]).permute(2, 0, 1)
        close(shrink_to(img, spec["imsize"]), arrays[f"retrieval_input/{name}"], atol=1e-6)
    for tag, fn in (("single", lambda m, x: m(x)), ("multiscale", multiscale_cls)):
        for split, names in (("db", spec["imlist"]), ("query", spec["qimlist"])):
            source = BenchmarkImages(split, root / "jpg", names)
            feats, kept, _ = extract_features(backbone, source, batch_size=1, feature_fn=fn,
                                              transform=partial(shrink_to, imsize=spec["imsize"]), progress=False)
            close(torch.nn.functional.normalize(feats, dim=1), arrays[f"retrieval_{split}_features_{tag}"])


@pytest.mark.parametrize("multiscale", [False, True])
def test_retrieval_map_end_to_end(ref, backbone, tmp_path, capsys, monkeypatch, multiscale):
    meta, arrays = ref
    root = retrieval_layout(meta, arrays, tmp_path / "roxford5k")
    monkeypatch.setattr("dinokit.eval.retrieve.load_model", lambda *a, **k: backbone)
    code, result, err = run_cli(["retrieve", "--weights", "seeded", "--data", str(root), "--imsize",
                                 str(meta["retrieval"]["imsize"]), "--device", "cpu", "--json", "--quiet"]
                                + (["--multiscale"] if multiscale else []), capsys)
    assert code == 0, err
    expected = meta["retrieval"]["runs"]["multiscale" if multiscale else "single"]
    for setting in ("easy", "medium", "hard"):
        for k in ("mAP", "mP@1", "mP@5", "mP@10"):
            assert result["results"][setting][k] / 100 == pytest.approx(expected[setting][k], abs=METRIC_ATOL)
