import re

import pytest
import torch
from torch import nn

from lightning_gpipe.model.partition import (
    AbsentLayerError,
    BalanceError,
    absent_parameters_refused,
    find_sequential,
    keep_stage,
    live_layers,
    resolve_balance,
    stage_view,
)


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(2, 2))
        self.b = nn.Sequential(nn.ReLU())


class Outside(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 2))
        self.head = nn.Linear(2, 1)


def test_find_sequential():
    module = Outside()
    del module.head
    assert find_sequential(module) == ("net", module.net)
    two = Two()
    assert find_sequential(two, "a") == ("a", two.a)


def test_find_sequential_errors():
    with pytest.raises(ValueError, match=r"could not pick it: Sequential children found: 'a', 'b'\. Pass `GPipeStrategy\(sequential='<attribute name>'\)`"):
        find_sequential(Two())
    with pytest.raises(ValueError, match=r"could not pick it: Sequential children found: none"):
        find_sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"GPipeStrategy\(sequential='head'\): Outside.head must be an `nn.Sequential`, found Linear"):
        find_sequential(Outside(), "head")
    with pytest.raises(ValueError, match=r"Sequential 'net', but 2 are outside it: head.weight, head.bias"):
        find_sequential(Outside())


def test_resolve_balance():
    seq = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1), nn.ReLU(), nn.Linear(1, 1))
    assert resolve_balance("uniform", seq, 2) == [3, 2]
    assert resolve_balance("params", seq, 2) == [2, 3]  # 110 | 11 + 2: the free ReLU joins the earlier stage
    assert resolve_balance([2, 3], seq, 2) == [2, 3]
    with pytest.raises(BalanceError, match="cannot cut 5 layers into 6 stages"):
        resolve_balance("uniform", seq, 6)
    with pytest.raises(BalanceError, match=r"balance must be 'uniform', 'params' or a list of layer counts here \('time' and 'memory' are"
                       r" measured by GPipeStrategy\), got 'time'"):
        resolve_balance("time", seq, 2)


def test_keep_stage_keeps_names():
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    kept = keep_stage(seq, [1, 2], 1)
    assert [type(m) for m in kept] == [nn.ReLU, nn.Linear]
    assert list(seq.state_dict()) == ["2.weight", "2.bias"]
    assert len(seq) == 3
    assert [i for i, _ in live_layers(seq)] == [1, 2]
    with pytest.raises(BalanceError, match="layer 0 belongs to this stage, but an earlier partitioning freed it here"):
        keep_stage(seq, [1, 2], 0)


def test_absent_layers_say_where_they_are():
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    keep_stage(seq, [1, 2], 1)
    where = (
        "layer 0 (Linear) of the pipelined Sequential, which stage 0 holds, not this process. Each process holds"
        " only its own stage's layers while a run is under way"
    )
    with pytest.raises(AbsentLayerError, match=re.escape(f"GPipeStrategy: the code called {where}") + ".* In a step, call the module"):
        seq(torch.zeros(1, 2))
    with pytest.raises(AbsentLayerError, match=re.escape(f"GPipeStrategy: the code read 'weight' of {where}")):
        seq[0].weight
    assert not hasattr(seq[0], "weight")  # an AttributeError: getattr with a default and hasattr still work
    assert list(seq[0].parameters()) == [] and "Linear on stage 0" in repr(seq)


def test_absent_layers_refuse_their_parameters_and_state_when_asked_to():
    seq = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    keep_stage(seq, [1, 1], 1)
    assert list(seq[0].parameters()) == []  # while a run is under way: nothing here, as per-parameter code expects
    with absent_parameters_refused("the step"), pytest.raises(AbsentLayerError, match="the step read the parameters of"):
        list(seq[0].parameters())
    assert list(seq.state_dict()) == ["1.weight", "1.bias"]
    seq[0].after_run = True  # a run ended and this process kept its stage
    with pytest.raises(AbsentLayerError, match="the code asked for the state of layer 0"):
        seq.state_dict()
    with stage_view():
        assert list(seq.state_dict()) == ["1.weight", "1.bias"]


def test_absent_layers_keep_their_layer_with_its_storage_freed():
    import copy

    from lightning_gpipe.model.deferred import storage_id
    from lightning_gpipe.model.partition import release_absent

    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    seq[2].weight = seq[0].weight  # tied: stage 1 keeps it live
    first = seq[0]
    keep_stage(seq, [1, 2], 1)
    release_absent(seq, {storage_id(t) for t in seq.parameters()})
    assert seq[0].held is first  # the module object itself, not a copy
    assert first.bias.untyped_storage().nbytes() == 0 and first.bias.shape == (2,)
    assert first.weight is seq[2].weight and first.weight.untyped_storage().nbytes() == 16  # shared: kept
    assert [(t is first.bias, n) for t, n in seq[0].freed] == [(True, 8)]
    assert copy.deepcopy(seq)[0].held is None  # a copy stands in without it
