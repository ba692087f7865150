"""Model and optimizer state across stages, keyed by parameter name so it does not depend on K.

Optimizer states travel between stages by name (``{"state": {name: ...}, "param_groups": [{..., "params":
[names]}]}``) and are stored in PyTorch's own layout, numbered exactly as the optimizer that
``configure_optimizers`` builds on the unpartitioned module numbers its parameters. A plain Lightning run
loads that by position; GPipeStrategy loads it by name, with the names saved beside it, whatever K and
balance wrote it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "Layout",
    "unwrapped",
    "optimizer_layouts",
    "optimizer_state_by_name",
    "merge_optimizer_states",
    "optimizer_state_for",
    "parameter_names",
]

#: Per parameter group, the names of its parameters in the optimizer's order.
Layout = list[list[str]]


def unwrapped(optimizer: Any) -> Optimizer:
    """The torch optimizer itself, out of Lightning's ``LightningOptimizer`` wrapper if it is in one."""
    return getattr(optimizer, "_optimizer", optimizer)


def parameter_names(module: nn.Module, aliases: Mapping[str, str] = {}) -> dict[int, str]:
    """Each parameter's name by identity; a name in ``aliases`` (a tied parameter's other names) is replaced by the
    one single-device training gives it."""
    return {id(p): aliases.get(name, name) for name, p in nn.Module.named_parameters(module)}  # never a refusal


def optimizer_state_by_name(
    optimizer: Optimizer, module: nn.Module, aliases: Mapping[str, str] = {}, state: Optional[dict[str, Any]] = None
) -> dict[str, Any]:
    """``optimizer.state_dict()`` (or ``state``, one in its layout) with parameter names in place of positions."""
    names = parameter_names(module, aliases)
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state_dict() if state is None else state
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]
    for group in groups:
        group.pop("param_names", None)
    return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def optimizer_layouts(optimizers: Sequence[Optimizer], module: nn.Module) -> list[Layout]:
    """Per optimizer, per parameter group, the names of its parameters in the optimizer's own order.

    Taken from the optimizers ``configure_optimizers`` builds on the unpartitioned module, it is the
    numbering a single-device run's checkpoint uses.
    """
    names = {id(p): name for name, p in nn.Module.named_parameters(module)}
    return [
        [[names[id(p)] for p in group["params"]] for group in unwrapped(o).param_groups]
        for o in optimizers
    ]


def merge_optimizer_states(states: Sequence[dict[str, Any]], layout: Layout) -> dict[str, Any]:
    """One optimizer state in PyTorch's own layout, numbered as ``layout`` says, from the stages' by-name states."""
    by_name: dict[str, Any] = {}
    members: list[set[str]] = [set() for _ in layout]
    hypers: list[Optional[dict[str, Any]]] = [None] * len(layout)
    for state in states:
        by_name.update(state["state"])
        if len(state["param_groups"]) != len(layout):
            raise ValueError(
                f"a stage's optimizer has {len(state['param_groups'])} parameter groups, the unpartitioned module's"
                f" has {len(layout)}: configure_optimizers must build the same groups on every stage"
            )
        for g, group in enumerate(state["param_groups"]):
            members[g].update(group["params"])
            hypers[g] = hypers[g] or {key: value for key, value in group.items() if key != "params"}
    groups, numbered, index = [], {}, 0
    for g, names in enumerate(layout):
        if members[g] != set(names):
            raise ValueError(
                f"parameter group {g} holds {sorted(members[g])} over the stages but {sorted(names)} on the"
                " unpartitioned module: configure_optimizers must group parameters by name alone"
            )
        groups.append({**(hypers[g] or {}), "params": list(range(index, index + len(names)))})
        numbered.update({index + i: by_name[name] for i, name in enumerate(names) if name in by_name})
        index += len(names)
    return {"state": numbered, "param_groups": groups}


def optimizer_state_for(
    optimizer: Optimizer, module: nn.Module, saved: dict[str, Any], layout: Layout, aliases: Mapping[str, str] = {}
) -> dict[str, Any]:
    """The part of a saved optimizer state (PyTorch's layout, numbered as ``layout`` names) that belongs to
    ``optimizer``, this stage's, in its own numbering."""
    saved_groups = saved["param_groups"]
    sizes, expected = [len(group["params"]) for group in saved_groups], [len(names) for names in layout]
    if sizes != expected or len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the saved optimizer state has parameter groups of {sizes} parameters; {expected} were expected and"
            f" this stage's optimizer has {len(optimizer.param_groups)} groups: configure_optimizers must build"
            " the same groups as in the run that saved it"
        )
    names = parameter_names(module, aliases)
    groups, state, index = [], {}, 0
    for g, (group, saved_group) in enumerate(zip(optimizer.param_groups, saved_groups)):
        where = dict(zip(layout[g], saved_group["params"]))
        params = []
        for p in group["params"]:
            name = names[id(p)]
            if name not in where:
                raise KeyError(f"parameter {name!r} is not in group {g} of the saved optimizer state, which holds {layout[g]}")
            if where[name] in saved["state"]:
                state[index] = _checked(saved["state"][where[name]], p, name)
            params.append(index)
            index += 1
        hyper = {key: value for key, value in saved_group.items() if key not in ("params", "param_names")}
        groups.append({**hyper, "params": params})
        if "param_names" in group:  # an optimizer built from named parameters keeps its own names
            groups[-1]["param_names"] = list(group["param_names"])
    return {"state": state, "param_groups": groups}


def _checked(param_state: dict[str, Any], p: Tensor, name: str) -> dict[str, Any]:
    for key, value in param_state.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
            raise ValueError(
                f"the saved optimizer state {key!r} of {name!r} has shape {list(value.shape)}, the parameter"
                f" {list(p.shape)}: the checkpoint's optimizer groups its parameters differently"
            )
    return param_state
