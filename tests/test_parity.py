"""Our models and functions against the reference implementation's outputs (shared/parity/)."""
import numpy as np
import pytest
import torch

import dinokit
from dinokit.train.schedules import warmup_then_constant
from conftest import recipe_state_dict

ATOL = 1e-4


def build_vit(meta):
    model = getattr(dinokit, meta["arch"])(patch_size=meta["patch_size"])
    sd = recipe_state_dict(meta["state_dict"], meta["seed"])
    assert list(model.state_dict()) == [k for k, _ in meta["state_dict"]], "parameter names or order differ"
    model.load_state_dict(sd, strict=True)
    return model.eval()


def test_backbone_cls_attention_and_intermediate_layers(parity):
    meta, arrays = parity
    model = build_vit(meta)
    with torch.no_grad():
        for i in range(len(meta["inputs"])):
            x = arrays[f"input{i}"]
            torch.testing.assert_close(model(x), arrays[f"cls{i}"], atol=ATOL, rtol=0)
            torch.testing.assert_close(model.get_last_selfattention(x), arrays[f"last_attn{i}"], atol=ATOL, rtol=0)
            last4 = torch.stack(model.get_intermediate_layers(x, 4), dim=1)
            torch.testing.assert_close(last4, arrays[f"last4_{i}"], atol=ATOL, rtol=0)


def test_head_output(parity):
    meta, arrays = parity
    h = meta["head"]
    head = dinokit.DINOHead(h["in_dim"], h["out_dim"], hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True)
    assert list(head.state_dict()) == [k for k, _ in h["state_dict"]]
    head.load_state_dict(recipe_state_dict(h["state_dict"], h["seed"]), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(head(arrays["cls0"]), arrays["head_out"], atol=ATOL, rtol=0)


def test_loss_values_and_centers(parity):
    meta, arrays = parity
    cfg = meta["loss"]
    loss_fn = dinokit.DINOLoss(cfg["out_dim"], cfg["ncrops"], cfg["student_temp"], cfg["center_momentum"])
    # the paper keeps one temperature per epoch: training's schedule, laid out over epochs
    temps = warmup_then_constant(cfg["warmup_teacher_temp"], cfg["teacher_temp"],
                                 cfg["warmup_teacher_temp_epochs"], cfg["epochs"])
    for j, step in enumerate(cfg["steps"]):
        loss = loss_fn(arrays[f"loss_student{j}"], arrays[f"loss_teacher{j}"], float(temps[step["epoch"]]))
        assert loss.item() == pytest.approx(step["loss"], rel=1e-3)
        loss_fn.update_center(arrays[f"loss_teacher{j}"])
        torch.testing.assert_close(loss_fn.center, arrays[f"loss_center{j}"], atol=ATOL, rtol=0)


def test_cosine_schedules(parity):
    meta, _ = parity
    for s in meta["schedules"]:
        ours = dinokit.cosine_schedule(*s["args"])
        np.testing.assert_allclose(ours, s["values"], rtol=1e-12, atol=1e-15)


def test_knn_top1_top5(parity):
    meta, arrays = parity
    for case in meta["knn"]:
        top1, top5 = dinokit.knn_classify(arrays["knn_train"], arrays["knn_train_labels"], arrays["knn_test"],
                                          arrays["knn_test_labels"], case["k"], case["T"], case["num_classes"])
        assert (top1, top5) == pytest.approx(tuple(case["top1_top5"]), abs=1e-9)
