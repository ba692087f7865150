"""A schedule's ideal timeline: every rank runs its actions in order, each as soon as its inputs exist, with given
costs per stage and per message. It gives a schedule's exact time (the limit a real run is measured against, a
prediction from measured costs) and shows a schedule that cannot finish (an action waiting on one that waits on
it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from lightning_gpipe.schedule.actions import Action, Phase, Schedule

__all__ = ["Timing", "simulate"]

Costs = Union[float, Sequence[float]]  # one cost for every stage, or one per stage of the model


@dataclass(frozen=True)
class Timing:
    """When each ``(rank, action)`` of a step starts and ends, in units of one stage's forward of one micro-batch."""

    k: int
    m: int
    spans: dict[tuple[int, Action], tuple[float, float]]

    @property
    def makespan(self) -> float:
        return max(end for _, end in self.spans.values())

    @property
    def bubble(self) -> float:
        """The idle fraction of the ranks over the makespan."""
        busy = sum(end - start for start, end in self.spans.values())
        return 1 - busy / (self.k * self.makespan)


def simulate(
    schedule: Schedule, k: int, m: int, forward: Costs = 1.0, backward: Costs = 2.0, send: Costs = 0.0
) -> Timing:
    """Run ``schedule`` for ``k`` ranks and ``m`` micro-batches on an ideal machine. A rank's forward of a
    micro-batch costs ``forward`` and its backward ``backward`` (a chunk of v per rank 1/v of that), or, given as
    sequences, stage s's (one entry per stage of the model: k*v); a re-materialized forward's backward runs its
    forward again first. A forward waits for the previous stage's forward of its micro-batch, a backward for its
    own forward and the next stage's backward, and each waits ``send`` more for what comes from another rank
    (or, as a sequence, ``send[b]`` for what crosses boundary b, between stages b and b+1, either way).
    Raises ``ValueError`` naming the stuck actions if the ranks wait on each other forever."""
    v = schedule.stages_per_rank
    stages = k * v
    forwards, backwards = _per_stage(forward, stages, v, "forward"), _per_stage(backward, stages, v, "backward")
    sends = [send] * (stages - 1) if isinstance(send, (int, float)) else list(send)
    if len(sends) != stages - 1:
        raise ValueError(f"send costs for {len(sends)} boundaries, but the schedule's {stages} stages have {stages - 1}")
    orders = [schedule.actions(k, m, rank) for rank in range(k)]
    last = stages - 1
    done: dict[tuple[Phase, int, int], float] = {}  # (phase, virtual stage, micro-batch) -> end
    recomputed: set[tuple[Phase, int, int]] = set()  # forwards that keep only their input
    spans: dict[tuple[int, Action], tuple[float, float]] = {}
    free, position = [0.0] * k, [0] * k
    while any(position[r] < len(orders[r]) for r in range(k)):
        moved = False
        for r in range(k):
            while position[r] < len(orders[r]):
                action = orders[r][position[r]]
                stage = action.chunk * k + r
                if action.phase is Phase.FORWARD:
                    needs = [(Phase.FORWARD, stage - 1, action.i)] if stage > 0 else []
                    cost = forwards[stage]
                else:
                    needs = [(Phase.FORWARD, stage, action.i)]
                    needs += [(Phase.BACKWARD, stage + 1, action.i)] if stage < last else []
                    cost = backwards[stage] + (forwards[stage] if (Phase.FORWARD, stage, action.i) in recomputed else 0.0)
                if any(need not in done for need in needs):
                    break
                start = max([free[r]] + [done[need] + (sends[min(need[1], stage)] if need[1] % k != r else 0.0) for need in needs])
                free[r] = done[(action.phase, stage, action.i)] = start + cost
                if action.recompute:
                    recomputed.add((Phase.FORWARD, stage, action.i))
                spans[(r, _plain(action))] = (start, free[r])
                position[r] += 1
                moved = True
        if not moved:
            stuck = {r: orders[r][position[r]] for r in range(k) if position[r] < len(orders[r])}
            raise ValueError(f"{schedule.name} cannot finish for k={k}, m={m}: each rank's next action waits: {stuck}")
    return Timing(k, m, spans)


def _plain(action: Action) -> Action:
    return Action(action.phase, action.i, chunk=action.chunk)


def _per_stage(costs: Costs, stages: int, v: int, what: str) -> list[float]:
    if isinstance(costs, (int, float)):
        return [costs / v] * stages
    costs = list(costs)
    if len(costs) != stages:
        raise ValueError(f"{what} costs for {len(costs)} stages, but the schedule runs {stages}")
    return costs
