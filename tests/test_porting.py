"""Loading a torchgpipe state dict into the same Sequential under this strategy."""

from __future__ import annotations

import re

import pytest
import torch
from _model import _PopAdd, _StashTanh
from torch import nn

from lightning_gpipe import from_torchgpipe


def _seq() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(_StashTanh(4), nn.Linear(4, 4), nn.BatchNorm1d(4), _PopAdd(4))


def _torchgpipe_keys(seq: nn.Sequential, balance: list[int]) -> dict[str, torch.Tensor]:
    """``seq``'s state as torchgpipe's GPipe names it: by partition, skippable layers' tensors under ``module``,
    its deferred batch norm's accumulators beside the statistics."""
    owner = [p for p, count in enumerate(balance) for _ in range(count)]
    state = {}
    for key, value in seq.state_dict().items():
        layer, _, rest = key.partition(".")
        wrapped = isinstance(seq[int(layer)], (_StashTanh, _PopAdd))
        state[f"partitions.{owner[int(layer)]}.{layer}.{'module.' if wrapped else ''}{rest}"] = value
    state["partitions.1.2.sum"] = state["partitions.1.2.sum_squares"] = torch.zeros(4)
    return state


def test_a_torchgpipe_state_dict_loads_under_the_names_of_the_sequential():
    seq = _seq()
    seq[2].running_var.fill_(0.9)
    converted = from_torchgpipe(_torchgpipe_keys(seq, [2, 2]), seq, prefix="body.", batchnorm_values=10)
    expected = {f"body.{k}": v for k, v in seq.state_dict().items()}
    assert list(converted) == list(expected)
    for key, value in expected.items():
        if key.endswith("running_var"):  # torchgpipe's biased variance, made unbiased
            value = value * (10 / 9)
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0, msg=key)
    fresh = _seq()
    fresh.load_state_dict({k.removeprefix("body."): v for k, v in converted.items()})


def test_what_has_no_place_or_is_missing_is_named():
    seq = _seq()
    state = _torchgpipe_keys(seq, [4])
    with pytest.raises(KeyError, match=re.escape(
        "from_torchgpipe: 'partitions.0.9.weight' has no place in the Sequential (its tensors: 0.lin.weight,"
        " 0.lin.bias, 1.weight, 1.bias, ... (11 in all))"
    )):  # fmt: skip
        from_torchgpipe({**state, "partitions.0.9.weight": torch.zeros(1)}, seq)
    del state["partitions.0.1.bias"]
    with pytest.raises(KeyError, match=re.escape("from_torchgpipe: the state dict has nothing for 1.bias")):
        from_torchgpipe(state, seq)
    with pytest.raises(ValueError, match=re.escape("from_torchgpipe(batchnorm_values=1): need at least 2 values")):
        from_torchgpipe(state, seq, batchnorm_values=1)
