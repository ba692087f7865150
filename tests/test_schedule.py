import copy

import pytest
import torch
from torch import nn

from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.engine.microbatch import merge, split
from lightning_gpipe.engine.rng import random_states
from lightning_gpipe.schedule import (
    Action,
    GPipe,
    OneFOneB,
    Phase,
    Schedule,
    checkpoint_stop,
    clock_cycles,
    fthenb,
    one_f_one_b,
)


def test_fthenb_literal_order():
    assert [repr(a) for a in fthenb(2, 3, 0)] == ["F0", "F1", "F2", "B2", "B1", "B0"]
    assert fthenb(2, 3, 1) == fthenb(2, 3, 0)
    assert fthenb(1, 1, 0) == [Action(Phase.FORWARD, 0), Action(Phase.BACKWARD, 0)]


def test_clock_cycles_literal_timeline():
    ticks = [" ".join(f"{j}:{a!r}" for j, a in sorted(tick)) for tick in clock_cycles(3, 2)]
    assert ticks == [
        "0:F0", "0:F1 1:F0", "1:F1 2:F0", "2:F1", "2:B1", "1:B1 2:B0", "0:B1 1:B0", "0:B0",
    ]  # fmt: skip


@pytest.mark.parametrize(("k", "m"), [(1, 1), (2, 4), (4, 8), (3, 5)])
def test_clock_cycles_follow_fthenb_and_give_gpipe_bubble(k, m):
    ticks = clock_cycles(k, m)
    for j in range(k):
        assert [a for tick in ticks for stage, a in tick if stage == j] == fthenb(k, m, j)
        busy = sum(1 for tick in ticks for stage, _ in tick if stage == j)
        assert 1 - busy / len(ticks) == pytest.approx((k - 1) / (m + k - 1))


def test_checkpoint_stop():
    assert [checkpoint_stop(mode, 4) for mode in ("always", "except_last", "never")] == [4, 3, 0]
    assert checkpoint_stop("except_last", 1) == 0
    with pytest.raises(ValueError, match=r"checkpoint must be one of \('always', 'except_last', 'never'\), got 'sometimes'"):
        checkpoint_stop("sometimes", 4)


def test_bad_sizes():
    with pytest.raises(ValueError, match="need at least one stage and one micro-batch, got k=2, m=0"):
        fthenb(2, 0, 0)
    with pytest.raises(ValueError, match=r"stage must be in \[0, 2\), got 2"):
        fthenb(2, 1, 2)


class BackwardInForwardOrder:
    """A toy schedule on the protocol: F-then-B whose backward takes the micro-batches in forward order (B0 first),
    re-materializing every one. A second schedule is a class like this, nothing else."""

    name = "backward_in_forward_order"
    loss_per_microbatch = False
    stages_per_rank = 1

    def actions(self, k: int, m: int, stage: int) -> list[Action]:
        return [Action(Phase.FORWARD, i, recompute=True) for i in range(m)] + [Action(Phase.BACKWARD, i) for i in range(m)]


def test_a_toy_schedule_runs_through_the_executor_as_on_one_device():
    """The executor interprets any schedule's actions; the gradients equal single-device training's on the same
    micro-batches and dropout draws (over gloo, tests/test_executor.py's two-stage run takes this schedule too)."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 2)]
    reference, x = nn.Sequential(*copy.deepcopy(layers)), torch.randn(10, 4)
    executor = StageExecutor(layers, 0, 1, torch.device("cpu"), None, schedule=BackwardInForwardOrder())
    start = executor.random.state_dict()
    merge(executor.forward(split(x, 4), 4, train=True)).pow(2).sum().backward()
    executor.backward()
    with random_states(torch.device("cpu"), start["cpu"], None):  # the stage's stream, micro-batch by micro-batch
        torch.cat([reference(part) for part in split(x, 4)]).pow(2).sum().backward()
    for p, e in zip(nn.Sequential(*layers).parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, e.grad, rtol=0, atol=1e-6)
    assert isinstance(executor.schedule, Schedule)
    assert [repr(a) for a in executor.schedule.actions(1, 3, 0)] == ["F0r", "F1r", "F2r", "B0", "B1", "B2"]


def test_gpipe_marks_the_forwards_to_recompute():
    assert [repr(a) for a in GPipe("except_last").actions(2, 3, 1)] == ["F0r", "F1r", "F2", "B2", "B1", "B0"]
    assert [repr(a) for a in GPipe("always").actions(2, 2, 0)] == ["F0r", "F1r", "B1", "B0"]
    assert GPipe("never").actions(3, 2, 2) == fthenb(3, 2, 2)
    assert isinstance(GPipe(), Schedule) and not GPipe.loss_per_microbatch and GPipe.stages_per_rank == 1
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        GPipe("sometimes")


def test_1f1b_literal_order():
    """Warm-up of K-1-j forwards on stage j, then one forward and one backward alternately, then the cool-down."""
    assert [" ".join(map(repr, one_f_one_b(3, 4, j))) for j in range(3)] == [
        "F0 F1 F2 B0 F3 B1 B2 B3",
        "F0 F1 B0 F2 B1 F3 B2 B3",
        "F0 B0 F1 B1 F2 B2 F3 B3",
    ]
    assert [" ".join(map(repr, one_f_one_b(4, 2, j))) for j in (0, 3)] == ["F0 F1 B0 B1", "F0 B0 F1 B1"]  # M < K
    assert [repr(a) for a in OneFOneB("except_last").actions(2, 3, 0)] == ["F0r", "F1r", "B0", "F2", "B1", "B2"]
    assert isinstance(OneFOneB(), Schedule) and OneFOneB.loss_per_microbatch and OneFOneB.name == "1f1b"
    for k in (1, 2, 3, 5):  # every stage runs each micro-batch's forward, then later its backward, once
        for m in (1, 2, 7):
            for j in range(k):
                order = one_f_one_b(k, m, j)
                assert sorted(order, key=repr) == sorted(fthenb(k, m, j), key=repr)
                assert all(order.index(Action(Phase.FORWARD, i)) < order.index(Action(Phase.BACKWARD, i)) for i in range(m))
                in_flight = max(sum(a.phase is Phase.FORWARD for a in order[: n + 1]) - sum(
                    a.phase is Phase.BACKWARD for a in order[: n + 1]) for n in range(len(order)))  # fmt: skip
                assert in_flight == min(k - j, m)  # stage j holds at most K - j micro-batches
