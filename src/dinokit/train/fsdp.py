"""Sharded data parallelism (FSDP2): sharding the models, whole-tensor norms from shards, and the full state
that a checkpoint holds (gathered to rank 0, loadable by any process count, sharded or not)."""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

try:  # torch >= 2.6
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # torch 2.4 and 2.5 (the project supports torch >= 2.4)
    from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed._tensor import DTensor


def shard_(model: nn.Module):
    """Every parameter split over the processes; each block, the head and the rest are gathered only while
    they run. `model` is a MultiCropWrapper."""
    for block in getattr(model.backbone, "blocks", []):
        fully_shard(block)
    fully_shard(model.head)
    fully_shard(model)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP (DTensor) parameter or gradient; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's L2 norm, stacked; for sharded tensors the whole tensor's, from every process's shard."""
    if not isinstance(tensors[0], DTensor):
        return torch.stack(torch._foreach_norm(tensors))
    squares = torch.stack(torch._foreach_norm([t.to_local() for t in tensors])) ** 2
    dist.all_reduce(squares)
    return squares.sqrt()


def full_state(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """Full student, teacher and optimizer state dicts on rank 0 (every process must call this)."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    student_sd, teacher_sd = (get_model_state_dict(m, options=full) for m in (student, teacher))
    return student_sd, teacher_sd, optimizer_by_index(get_optimizer_state_dict(student, optimizer, options=full))


def load_full_state(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict):
    """Every process read the full checkpoint; each keeps its shards."""
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(student, ckpt["student"], options=full)
    set_model_state_dict(teacher, ckpt["teacher"], options=full)
    # Not strict: parameters that have not moved yet (the prototypes in the first epoch) have no state.
    set_optimizer_state_dict(student, optimizer, optimizer_by_name(ckpt["optimizer"], optimizer, student),
                             options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_by_index(state: dict) -> dict:
    """A full optimizer state keyed by parameter names (FSDP's) -> keyed by position, as a plain optimizer
    keys it: a checkpoint then loads with any process count, sharded or not."""
    if not state:  # ranks other than 0 get nothing
        return {}
    names = [n for g in state["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def optimizer_by_name(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """The inverse of optimizer_by_index, for this optimizer and model."""
    name_of = {p: n for n, p in model.named_parameters()}
    names = [name_of[p] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
