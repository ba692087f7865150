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
from lightning_gpipe.schedule.interleaved import Interleaved1F1B, interleaved_one_f_one_b
from lightning_gpipe.schedule.messages import Kind, Message, pair_orders
from lightning_gpipe.schedule.simulate import simulate


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


def test_interleaved_literal_order():
    """Megatron-LM's order: groups of K micro-batches, chunk by chunk (backwards with the chunks reversed); warm-up
    2(K-1-r) + (v-1)K forwards on rank r, every forward first when M = K."""
    order = lambda k, m, r, v: " ".join(map(repr, interleaved_one_f_one_b(k, m, r, v)))  # noqa: E731
    assert [order(2, 2, r, 2) for r in range(2)] == ["F0 F1 F0c1 F1c1 B0c1 B1c1 B0 B1"] * 2
    assert [order(2, 4, r, 2) for r in range(2)] == [
        "F0 F1 F0c1 F1c1 F2 B0c1 F3 B1c1 F2c1 B0 F3c1 B1 B2c1 B3c1 B2 B3",
        "F0 F1 F0c1 B0c1 F1c1 B1c1 F2 B0 F3 B1 F2c1 B2c1 F3c1 B3c1 B2 B3",
    ]
    assert order(3, 6, 2, 3) == (
        "F0 F1 F2 F0c1 F1c1 F2c1 F0c2 B0c2 F1c2 B1c2 F2c2 B2c2 F3 B0c1 F4 B1c1 F5 B2c1 F3c1 B0 F4c1 B1 F5c1 B2"
        " F3c2 B3c2 F4c2 B4c2 F5c2 B5c2 B3c1 B4c1 B5c1 B3 B4 B5"
    )
    assert [repr(a) for a in Interleaved1F1B("except_last", 2).actions(2, 2, 0)] == [
        "F0r", "F1", "F0c1r", "F1c1", "B0c1", "B1c1", "B0", "B1",
    ]  # fmt: skip
    schedule = Interleaved1F1B(virtual_stages=3)
    assert isinstance(schedule, Schedule) and schedule.stages_per_rank == 3 and schedule.loss_per_microbatch
    for k, m, v in [(2, 2, 2), (2, 6, 3), (3, 6, 2), (4, 8, 2), (4, 4, 4)]:
        for r in range(k):
            actions = interleaved_one_f_one_b(k, m, r, v)
            for c in range(v):  # each chunk runs every forward in order, then every backward in order, once each
                mine = [a for a in actions if a.chunk == c]
                assert [a.i for a in mine if a.phase is Phase.FORWARD] == list(range(m))
                assert [a.i for a in mine if a.phase is Phase.BACKWARD] == list(range(m))
                assert all(mine.index(Action(Phase.FORWARD, i, chunk=c)) < mine.index(Action(Phase.BACKWARD, i, chunk=c)) for i in range(m))


def test_interleaved_refuses_what_it_cannot_order():
    with pytest.raises(ValueError, match="interleaved 1F1B takes micro-batches in groups of K: microbatches=6 is not a multiple of K=4"):
        interleaved_one_f_one_b(4, 6, 0, 2)
    with pytest.raises(ValueError, match=r"virtual_stages=0: need an integer of at least 1"):
        interleaved_one_f_one_b(2, 2, 0, 0)


@pytest.mark.parametrize(("k", "m"), [(1, 1), (2, 4), (3, 6), (4, 4), (4, 8), (4, 16)])
def test_simulated_time_of_every_schedule(k, m):
    """On an ideal machine (a stage's forward 1, its backward 2, communication free, nothing re-materialized),
    F-then-B and 1F1B take 3(M+K-1) and interleaved 1F1B with v chunks 3(M+(K-1)/v): its bubble is v times smaller
    at the same M."""
    for schedule in (GPipe("never"), OneFOneB("never")):
        timing = simulate(schedule, k, m)
        assert timing.makespan == 3 * (m + k - 1)
        assert timing.bubble == pytest.approx((k - 1) / (m + k - 1))
    for v in (1, 2, 4):
        timing = simulate(Interleaved1F1B("never", v), k, m)
        assert timing.makespan == pytest.approx(3 * (m + (k - 1) / v))
        assert timing.bubble == pytest.approx((k - 1) / v / (m + (k - 1) / v))
    if (k, m) == (4, 4):  # the goal for v=2 at K=4, M=4: 1.27 times GPipe's samples per second
        assert simulate(GPipe("never"), 4, 4).makespan / simulate(Interleaved1F1B("never", 2), 4, 4).makespan == pytest.approx(7 / 5.5)


def test_simulation_finds_a_schedule_that_cannot_finish():
    class BackwardFirst:
        """Stage 0 waits for a backward before it has sent the forward that backward needs."""

        name, loss_per_microbatch, stages_per_rank = "backward_first", False, 1

        def actions(self, k, m, stage):
            order = fthenb(k, m, stage)
            return order[m:] + order[:m] if stage == 0 else order

    with pytest.raises(ValueError, match=r"backward_first cannot finish for k=2, m=2: each rank's next action waits: \{0: B1, 1: F0\}"):
        simulate(BackwardFirst(), 2, 2)


def test_the_executor_refuses_several_chunks_per_rank():
    with pytest.raises(NotImplementedError, match="schedule 'interleaved' gives each rank 2 model chunks; the executor runs one per rank"):
        StageExecutor([nn.Linear(2, 2)], 0, 1, torch.device("cpu"), None, schedule=Interleaved1F1B())


def test_simulation_with_costs_per_stage_messages_and_recompute():
    """Hand-worked timelines: K=2, M=2 under F-then-B with stage 1 twice as slow as stage 0, then with 0.5 per
    message between ranks; and K=1 re-materializing, whose backwards run their forward again first."""
    spans = lambda timing, r: [timing.spans[(r, a)] for a in fthenb(2, 2, r)]  # noqa: E731
    timing = simulate(GPipe("never"), 2, 2, forward=[1, 2], backward=[2, 4])
    # stage 0: F0 F1, then B1 once stage 1's B1 is done (9), B0 after stage 1's B0 (13)
    assert spans(timing, 0) == [(0, 1), (1, 2), (9, 11), (13, 15)]
    assert spans(timing, 1) == [(1, 3), (3, 5), (5, 9), (9, 13)]
    assert timing.makespan == 15 and timing.bubble == pytest.approx(1 - (6 + 12) / 30)
    sent = simulate(GPipe("never"), 2, 2, forward=[1, 2], backward=[2, 4], send=0.5)
    assert spans(sent, 0) == [(0, 1), (1, 2), (10, 12), (14, 16)]
    assert spans(sent, 1) == [(1.5, 3.5), (3.5, 5.5), (5.5, 9.5), (9.5, 13.5)]
    assert simulate(GPipe("always"), 1, 2).makespan == 2 + 3 + 3  # B1 and B0 each recompute
    assert simulate(GPipe("except_last"), 1, 2).makespan == 2 + 2 + 3  # the last micro-batch kept its activations
    with pytest.raises(ValueError, match="forward costs for 3 stages, but the schedule runs 2"):
        simulate(GPipe(), 2, 2, forward=[1, 1, 1])


def test_pair_orders_literal():
    """K=2, M=2, v=2: both ranks exchange activations in both directions (rank 1's chunk 0 feeds rank 0's chunk 1),
    so one sequence per pair fixes who sends and who receives at each point; evaluation keeps the forwards'."""
    show = lambda orders: {pair: " ".join(map(repr, order)) for pair, order in orders.items()}  # noqa: E731
    assert show(pair_orders(Interleaved1F1B("never", 2), 2, 2)) == {
        (0, 1): "a0@0->1 a1@0->1 a0@1->2 a0@2->3 a1@1->2 a1@2->3 g0@2<-3 g0@1<-2 g1@2<-3 g1@1<-2 g0@0<-1 g1@0<-1"
    }
    assert show(pair_orders(Interleaved1F1B("never", 2), 2, 2, train=False)) == {
        (0, 1): "a0@0->1 a1@0->1 a0@1->2 a0@2->3 a1@1->2 a1@2->3"
    }
    assert show(pair_orders(OneFOneB("never"), 3, 2)) == {(0, 1): "a0@0->1 a1@0->1 g0@0<-1 g1@0<-1", (1, 2): "a0@1->2 a1@1->2 g0@1<-2 g1@1<-2"}
    assert Message(Kind.GRADIENT, 3, 1).sender(2) == 0 and Message(Kind.GRADIENT, 3, 1).receiver(2) == 1


@pytest.mark.parametrize(("k", "m", "v"), [(2, 4, 2), (3, 6, 2), (4, 8, 2), (4, 4, 3), (2, 2, 4)])
def test_pair_orders_keep_every_ranks_own_order(k, m, v):
    """Each rank sends, towards every peer, in the order its actions produce the messages, and every message of the
    step is in exactly one pair's sequence, once."""
    schedule = Interleaved1F1B("always", v)
    orders = pair_orders(schedule, k, m)
    for rank in range(k):
        produced = []
        for a in schedule.actions(k, m, rank):
            stage = a.chunk * k + rank
            if a.phase is Phase.FORWARD and stage < k * v - 1:
                produced.append(Message(Kind.ACTIVATION, stage, a.i))
            elif a.phase is Phase.BACKWARD and stage > 0:
                produced.append(Message(Kind.GRADIENT, stage - 1, a.i))
        for (a, b), order in orders.items():
            if rank in (a, b):
                assert [msg for msg in order if msg.sender(k) == rank] == [msg for msg in produced if msg in order]
    every = [msg for order in orders.values() for msg in order]
    assert len(every) == len(set(every)) == 2 * (k * v - 1) * m
    for rank in range(k):  # each chunk runs its forwards in micro-batch order, and its backwards (RankChunks needs it)
        for chunk in range(v):
            for phase in Phase:
                assert [a.i for a in schedule.actions(k, m, rank) if (a.chunk, a.phase) == (chunk, phase)] == list(range(m))


def test_interleaved_evaluation_order():
    """Evaluation runs the forwards alone, in groups of K micro-batches through each chunk in turn, for any M."""
    assert " ".join(map(repr, Interleaved1F1B("always", 2).forwards(2, 5, 1))) == "F0 F1 F0c1 F1c1 F2 F3 F2c1 F3c1 F4 F4c1"
    with pytest.raises(ValueError, match="need at least one stage and one micro-batch, got k=2, m=0"):
        Interleaved1F1B().forwards(2, 0, 0)
