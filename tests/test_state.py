"""Optimizer state between partitionings: merged by name into the single-device numbering, and back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gpipe.checkpointing.sharded import _publish
from lightning_gpipe.checkpointing.state import (
    merge_optimizer_states,
    optimizer_layouts,
    optimizer_state_by_name,
    optimizer_state_for,
)
from lightning_gpipe.model.partition import keep_stage


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    model[1].bias.requires_grad_(False)  # frozen, so left out of the optimizer
    return model


def _groups(model: nn.Module) -> list[dict]:
    """Weights in an order of their own (not the module's), then the trainable biases with another lr."""
    named = dict(model.named_parameters())
    weights = [named[n] for n in ("2.weight", "0.weight", "1.weight") if n in named]
    biases = [p for n, p in named.items() if n.endswith("bias") and p.requires_grad]
    return [{"params": weights}, {"params": biases, "lr": 0.5}]


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 2)).sum().backward()
    optimizer.step()


def _stage(full: nn.Sequential, stage: int) -> nn.Sequential:
    """``full`` with only ``stage``'s layers of balance [1, 2], the others freed as the strategy frees them."""
    part = nn.Sequential(*full)
    keep_stage(part, [1, 2], stage)
    return part


def test_stages_save_and_load_in_the_single_device_numbering():
    model = _model()
    single = torch.optim.Adam(_groups(model), lr=0.1)
    _step(model, single)
    expected = single.state_dict()
    layout = optimizer_layouts([single], model)[0]
    assert layout == [["2.weight", "0.weight", "1.weight"], ["0.bias", "2.bias"]]
    # Each stage loads its part of the single-device state, by position, then saves it by name.
    states = []
    for index in (0, 1):
        stage = _stage(model, index)
        optimizer = torch.optim.Adam(_groups(stage), lr=0.1)
        optimizer.load_state_dict(optimizer_state_for(optimizer, stage, expected, layout))
        states.append(optimizer_state_by_name(optimizer, stage))
    assert sorted(states[0]["state"]) == ["0.bias", "0.weight"]
    merged = merge_optimizer_states(states, layout)
    assert merged["param_groups"] == expected["param_groups"]
    assert sorted(merged["state"]) == sorted(expected["state"])
    for i, state in expected["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(merged["state"][i][key], state[key]), (i, key)


def test_loading_checks_groups_and_shapes():
    model = _model()
    optimizer = torch.optim.Adam(_groups(model), lr=0.1)
    _step(model, optimizer)
    saved, layout = optimizer.state_dict(), optimizer_layouts([optimizer], model)[0]
    with pytest.raises(ValueError, match=r"the saved optimizer state has parameter groups of \[3, 2\] parameters;"
                       r" \[3, 3\] were expected and this stage's optimizer has 2 groups"):  # fmt: skip
        optimizer_state_for(optimizer, model, saved, [layout[0], [*layout[1], "1.bias"]])
    swapped = [["0.weight", "2.weight", "1.weight"], layout[1]]  # the saving run ordered its weights otherwise
    with pytest.raises(ValueError, match=r"the saved optimizer state 'exp_avg' of '2.weight' has shape \[3, 2\],"
                       r" the parameter \[1, 3\]"):  # fmt: skip
        optimizer_state_for(optimizer, model, saved, swapped)
    with pytest.raises(KeyError, match=r"parameter '0.bias' is not in group 1 of the saved optimizer state"):
        optimizer_state_for(optimizer, model, saved, [layout[0], ["2.bias", "1.bias"]])


def test_merging_refuses_groups_that_differ_between_stages_and_module():
    model = _model()
    optimizer = torch.optim.Adam(_groups(model), lr=0.1)
    state = optimizer_state_by_name(optimizer, model)
    with pytest.raises(ValueError, match=r"parameter group 1 holds \['0.bias', '2.bias'\] over the stages but"
                       r" \['0.bias'\] on the unpartitioned module"):  # fmt: skip
        merge_optimizer_states([state], [["2.weight", "0.weight", "1.weight"], ["0.bias"]])


def test_publish_replaces_the_old_checkpoint_only_when_the_new_one_is_whole(tmp_path):
    path, partial = tmp_path / "last.ckpt", tmp_path / "last.ckpt.partial"
    path.mkdir()
    (path / "old").write_text("old")
    partial.mkdir()
    (partial / "new").write_text("new")
    _publish(partial, path)
    assert [p.name for p in path.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
