"""Model and optimizer state across stages, keyed by parameter name so it does not depend on K."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["gather_to_first", "optimizer_state_by_name", "merge_optimizer_states", "optimizer_state_for"]

#: Marks an optimizer state whose ``state`` and ``param_groups`` name parameters instead of numbering them.
BY_NAME = "gpipe_by_name"


def gather_to_first(local: Any, stage: int, k: int) -> list[Any]:
    """Every stage's ``local`` object on global rank 0 (``[]`` elsewhere), one stage at a time.

    Rank 0 never holds more than its own object plus the ones already received; the other ranks
    only ever hold their own. Tensors travel on the CPU.
    """
    local = apply_to_collection(local, Tensor, lambda t: t.detach().cpu())
    if k == 1:
        return [local]
    if stage != 0:
        dist.send_object_list([local], dst=0)
        return []
    gathered = [local]
    for src in range(1, k):
        box: list[Any] = [None]
        dist.recv_object_list(box, src=src)
        gathered.append(box[0])
    return gathered


def optimizer_state_by_name(optimizer: Optimizer, module: nn.Module) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameter names in place of positions."""
    names = {id(p): name for name, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state_dict()
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]
    for group in groups:
        group.pop("param_names", None)
    return {BY_NAME: True, "state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def merge_optimizer_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One by-name optimizer state from the stages' by-name states (group ``g`` of every stage joins group ``g``)."""
    merged: dict[str, Any] = {BY_NAME: True, "state": {}, "param_groups": []}
    for state in states:
        merged["state"].update(state["state"])
        for g, group in enumerate(state["param_groups"]):
            if g == len(merged["param_groups"]):
                merged["param_groups"].append({**group, "params": []})
            merged["param_groups"][g]["params"] += group["params"]
    return merged


def optimizer_state_for(optimizer: Optimizer, module: nn.Module, saved: dict[str, Any]) -> dict[str, Any]:
    """The part of a by-name optimizer state that belongs to ``optimizer``, in its own numbering."""
    if not saved.get(BY_NAME):
        raise ValueError(
            "this optimizer state numbers parameters by position, which depends on how the model was"
            " partitioned; GPipeStrategy can only restore optimizer states saved by GPipeStrategy"
        )
    names = {id(p): name for name, p in module.named_parameters()}
    groups, state, index = [], {}, 0
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"the saved optimizer state has {len(saved['param_groups'])} parameter groups,"
            f" the optimizer has {len(optimizer.param_groups)}"
        )
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        params = []
        for p in group["params"]:
            name = names[id(p)]
            if name not in saved_group["params"]:
                raise KeyError(f"the saved optimizer state has no entry for parameter {name!r} in its group")
            if name in saved["state"]:
                state[index] = saved["state"][name]
            params.append(index)
            index += 1
        groups.append({**saved_group, "params": params})
    return {"state": state, "param_groups": groups}
