"""Model and optimizer state across stages, keyed by parameter name so it does not depend on K.

Optimizer states travel between stages by name (``{"state": {name: ...}, "param_groups": [{..., "params":
[names]}]}``) and are stored in PyTorch's own layout: parameters numbered per group in the unpartitioned
module's order, with their names beside them in each group's ``param_names``. A plain Lightning run loads
that by position; GPipeStrategy loads it by name, whatever K and balance wrote it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["gather_to_first", "optimizer_state_by_name", "merge_optimizer_states", "optimizer_state_for"]


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
    return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def merge_optimizer_states(states: Sequence[dict[str, Any]], order: Sequence[str]) -> dict[str, Any]:
    """One optimizer state in PyTorch's layout from the stages' by-name states.

    Group ``g`` of every stage joins group ``g``; within a group, parameters follow ``order`` (the
    unpartitioned module's parameter names), as an optimizer built from ``module.parameters()`` has them.
    """
    rank = {name: i for i, name in enumerate(order)}
    by_name: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    for state in states:
        by_name.update(state["state"])
        for g, group in enumerate(state["param_groups"]):
            if g == len(groups):
                groups.append({**group, "params": []})
            groups[g]["params"] += group["params"]
    numbered, index = {}, 0
    for group in groups:
        names = sorted(group["params"], key=rank.__getitem__)
        group["params"], group["param_names"] = list(range(index, index + len(names))), names
        numbered.update({index + i: by_name[name] for i, name in enumerate(names) if name in by_name})
        index += len(names)
    return {"state": numbered, "param_groups": groups}


def optimizer_state_for(optimizer: Optimizer, module: nn.Module, saved: dict[str, Any], order: Sequence[str]) -> dict[str, Any]:
    """The part of a saved optimizer state that belongs to ``optimizer`` (this stage's), in its own numbering.

    ``saved`` is in PyTorch's layout. With ``param_names`` (written by GPipeStrategy, any K) parameters are
    matched by name; without (a plain Lightning checkpoint), one group's positions are matched to
    ``order``, the unpartitioned module's parameters.
    """
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the saved optimizer state has {len(saved_groups)} parameter groups, the optimizer has"
            f" {len(optimizer.param_groups)}: configure_optimizers must build the same groups as the saved run"
        )
    if all("param_names" in group for group in saved_groups):
        where = {name: i for group in saved_groups for name, i in zip(group["param_names"], group["params"])}
    elif len(saved_groups) == 1 and len(saved_groups[0]["params"]) == len(order):
        where = dict(zip(order, saved_groups[0]["params"]))
    else:
        counts = [len(group["params"]) for group in saved_groups]
        raise ValueError(
            f"the saved optimizer state numbers its parameters by position without names ({counts} per group),"
            f" which only matches the module's {len(order)} parameters for a single group of all of them."
            " Resume it on the strategy that saved it, or save it with GPipeStrategy."
        )
    names = {id(p): name for name, p in module.named_parameters()}
    groups, state, index = [], {}, 0
    for g, (group, saved_group) in enumerate(zip(optimizer.param_groups, saved_groups)):
        members = set(saved_group.get("param_names", order))
        params = []
        for p in group["params"]:
            name = names[id(p)]
            if name not in where or name not in members:
                raise KeyError(f"the saved optimizer state has no entry for parameter {name!r} in group {g}")
            if where[name] in saved["state"]:
                state[index] = saved["state"][where[name]]
            params.append(index)
            index += 1
        hyper = {key: value for key, value in saved_group.items() if key not in ("params", "param_names")}
        groups.append({**hyper, "params": params})
        if "param_names" in group:  # an optimizer built from named parameters keeps its own names
            groups[-1]["param_names"] = list(group["param_names"])
    return {"state": state, "param_groups": groups}
