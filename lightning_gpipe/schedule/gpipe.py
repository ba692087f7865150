"""GPipe's F-then-B schedule: every forward of the batch, then every backward in reverse."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gpipe.schedule.actions import Action, Phase, Rematerialized, check_km

__all__ = ["GPipe", "fthenb", "clock_cycles"]


@dataclass(frozen=True)
class GPipe(Rematerialized):
    """F-then-B (`fthenb`) with re-materialization: ``checkpoint`` says which forwards recompute
    (``"always"``, ``"except_last"``: all but the last micro-batch, ``"never"``)."""

    name = "gpipe"
    loss_per_microbatch = False  # the user's loss sees the whole batch's output
    stages_per_rank = 1

    def order(self, k: int, m: int, stage: int) -> list[Action]:
        return fthenb(k, m, stage)


def fthenb(k: int, m: int, stage: int) -> list[Action]:
    """GPipe's F-then-B order for ``stage`` of ``k`` stages with ``m`` micro-batches.

    Every stage runs the same order: forward of all micro-batches, then their backward in
    reverse. Stages only differ in *when* each action can start (see `clock_cycles`):

    ```
    k=3, m=4   clock:  0   1   2   3   4   5   6   7   8   9  10  11
    stage 0            F0  F1  F2  F3              B3  B2  B1  B0
    stage 1                F0  F1  F2  F3      B3  B2  B1  B0
    stage 2                    F0  F1  F2  F3  B3  B2  B1  B0
    ```
    """
    check_km(k, m, stage)
    forward = [Action(Phase.FORWARD, i) for i in range(m)]
    backward = [Action(Phase.BACKWARD, i) for i in reversed(range(m))]
    return forward + backward


def clock_cycles(k: int, m: int) -> list[list[tuple[int, Action]]]:
    """The ideal timeline of `fthenb`: for each clock tick, the ``(stage, action)`` pairs that run.

    Every action is assumed to take one tick; a stage's forward of micro-batch ``i`` waits for
    stage ``j - 1``, its backward for stage ``j + 1``. The ``2 * (m + k - 1)`` ticks hold
    ``2 * m`` busy slots per stage, which gives the bubble fraction ``(k - 1) / (m + k - 1)``.
    """
    check_km(k, m)
    ticks: list[list[tuple[int, Action]]] = [[] for _ in range(2 * (m + k - 1))]
    for j in range(k):
        for i in range(m):
            ticks[i + j].append((j, Action(Phase.FORWARD, i)))
            # The last stage starts backward right after its last forward.
            ticks[(m + k - 1) + (m - 1 - i) + (k - 1 - j)].append((j, Action(Phase.BACKWARD, i)))
    return ticks
