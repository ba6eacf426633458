"""No host synchronisation in a steady-state training step (issue 15): every op that would make the host wait
for a GPU (reading a value: .item(), float(), bool(), int(); shapes that depend on values: nonzero, boolean-
mask indexing, masked_select, unique) is recorded while `Trainer.train_step` runs, on whatever device the
test runs on: the CPU here, the GPU too where there is one."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dinokit.train.config import Config
from dinokit.train.step import Trainer

aten = torch.ops.aten
READS_A_VALUE = {aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.allclose}
VALUE_SHAPED = {aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive,
                aten.bincount, aten.histc}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class SyncRecorder(TorchDispatchMode):
    """Records the ops on `device`'s tensors that make the host wait for the device (on a GPU)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device_type, self.found = device.type, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_device = any(t.device.type == self.device_type for t in tensors)
        packet = func.overloadpacket
        if on_device:
            if packet in READS_A_VALUE or packet in VALUE_SHAPED:
                self.found.append(packet.__name__)
            elif packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor \
                    and kwargs.get("output_size") is None:
                self.found.append("repeat_interleave")
            elif packet in INDEXING and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                            for i in args[1] if i is not None):
                self.found.append(f"{packet.__name__} with a boolean mask")
        return func(*args, **kwargs)


TINY = dict(arch="vit", patch_size=4, embed_dim=32, depth=2, num_heads=2, out_dim=64, head_hidden_dim=48,
            bottleneck_dim=16, global_crop_size=16, local_crop_size=8, local_crops_number=2, batch_size=8,
            epochs=1, warmup_epochs=0, freeze_last_layer=0, precision="fp32", drop_path_rate=0.1)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


def steady_step_syncs(device: str, trainer_hook=None, **recipe) -> list[str]:
    """The sync ops of the third step (the first two create the optimizer's state) of a tiny run."""
    torch.manual_seed(0)
    cfg = Config(**{**TINY, **recipe}, device=device).validate()
    trainer = Trainer(cfg, torch.device(device), steps_per_epoch=10, total_steps=10)
    if trainer_hook:
        trainer_hook(trainer)
    views = [torch.randn(8, 3, 16, 16, device=device) for _ in range(2)] + \
            [torch.randn(8, 3, 8, 8, device=device) for _ in range(2)]
    for _ in range(2):
        trainer.train_step(views)
    recorder = SyncRecorder(torch.device(device))
    with recorder:
        loss, stats = trainer.train_step(views, with_stats=False)
    assert stats == {} and loss.device.type == device and trainer.step == 3
    return recorder.found


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", [{}, {"koleo_weight": 0.1}, {"student_keep_ratio": 0.5}],
                         ids=["paper", "koleo", "keep"])
def test_a_steady_step_never_waits_for_the_device(device, recipe):
    assert steady_step_syncs(device, **recipe) == []


@pytest.mark.parametrize("device", DEVICES)
def test_the_patch_term_syncs_where_it_selects_masked_patches(device):
    """Known and documented (docs/training.md): iBOT's patch term picks the masked patches with a boolean mask,
    a number of rows only the device knows: in the student's head (models/heads.py), for the teacher's
    patches (loss.py), and in the backward of the first; and it divides by their count, read with int().
    Nothing else in its step syncs."""
    found = steady_step_syncs(device, patch_loss_weight=1.0)
    assert sorted(found) == sorted(["index with a boolean mask"] * 2 + ["index_put with a boolean mask",
                                                                        "_local_scalar_dense"]), found


def test_the_recorder_catches_a_value_read_and_a_mask():
    def reads_the_loss(trainer):
        terms = trainer.loss_terms

        def loss_terms(*args):
            out = terms(*args)
            float(out["dino"].detach())  # a deliberate .item()
            row = out["dino"].reshape(1)
            out["dino"] = out["dino"] + row[row > 0].sum()  # and a boolean mask
            return out
        trainer.loss_terms = loss_terms

    found = steady_step_syncs("cpu", trainer_hook=reads_the_loss)
    assert "_local_scalar_dense" in found and "index with a boolean mask" in found
