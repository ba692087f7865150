"""Optimizer state by parameter name, and the sharded checkpoint's all-or-nothing publishing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gpipe.sharded import _publish
from lightning_gpipe.state import merge_optimizer_states, optimizer_state_by_name, optimizer_state_for


def _trained(module: nn.Module, groups) -> torch.optim.Optimizer:
    optimizer = torch.optim.Adam(groups, lr=0.1)
    module(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    return optimizer


def _stage(full: nn.Sequential, keep: range) -> nn.Sequential:
    """A copy of ``full`` holding only the layers in ``keep``, the others freed as the strategy frees them."""
    stage = nn.Sequential(*[layer for layer in full])
    for i in range(len(full)):
        if i not in keep:
            stage._modules[str(i)] = None
    return stage


def test_stage_states_merge_into_the_single_device_layout():
    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
    order = [n for n, _ in full.named_parameters()]
    # Two groups whose members are spread over both stages.
    def groups(m):
        return [{"params": [p for n, p in m.named_parameters() if n.endswith("weight")]},
                {"params": [p for n, p in m.named_parameters() if n.endswith("bias")], "lr": 0.5}]  # fmt: skip

    single = _trained(full, groups(full)).state_dict()
    first, second = _stage(full, range(0, 1)), _stage(full, range(1, 3))
    states = []
    for stage in (first, second):  # each stage's optimizer over its own parameters, same values
        optimizer = torch.optim.Adam(groups(stage), lr=0.1)
        optimizer.load_state_dict(optimizer_state_for(optimizer, stage, {**single, "param_groups": [
            {**g, "param_names": [n for n in order if n.endswith(s)]} for g, s in zip(single["param_groups"], ("weight", "bias"))
        ]}, order))  # fmt: skip
        states.append(optimizer_state_by_name(optimizer, stage))
    merged = merge_optimizer_states(states, order)
    assert [g["params"] for g in merged["param_groups"]] == [[0, 1, 2], [3, 4, 5]]
    assert merged["param_groups"][1]["param_names"] == ["0.bias", "1.bias", "2.bias"]
    assert merged["param_groups"][1]["lr"] == 0.5
    for i, state in single["state"].items():
        assert torch.equal(merged["state"][i]["exp_avg"], state["exp_avg"])


def test_positional_state_without_names_needs_one_group_of_every_parameter():
    full = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    order = [n for n, _ in full.named_parameters()]
    optimizer = torch.optim.SGD(full.parameters(), lr=0.1)
    saved = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.1, "params": [2, 3]}]}
    with pytest.raises(ValueError, match=r"the saved optimizer state has 2 parameter groups, the optimizer has 1"):
        optimizer_state_for(optimizer, full, saved, order)
    saved = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}]}
    with pytest.raises(ValueError, match=r"numbers its parameters by position without names \(\[3\] per group\), which"
                       r" only matches the module's 4 parameters for a single group of all of them"):  # fmt: skip
        optimizer_state_for(optimizer, full, saved, order)


def test_publish_replaces_the_old_checkpoint_only_when_the_new_one_is_whole(tmp_path):
    path, partial = tmp_path / "last.ckpt", tmp_path / "last.ckpt.partial"
    path.mkdir()
    (path / "old").write_text("old")
    partial.mkdir()
    (partial / "new").write_text("new")
    _publish(partial, path)
    assert [p.name for p in path.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
