"""1F1B (PipeDream-flush): each stage starts micro-batch i's backward as soon as it can, so stage j holds at most
K - j micro-batches between their forward and their backward, instead of M, at F-then-B's bubble."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gpipe.schedule.actions import Action, Phase, Rematerialized, check_km

__all__ = ["OneFOneB", "one_f_one_b"]


@dataclass(frozen=True)
class OneFOneB(Rematerialized):
    """1F1B (`one_f_one_b`) with re-materialization by ``checkpoint``, as `GPipe`. The user's loss runs once per
    micro-batch, on the last stage, as each micro-batch's forward ends."""

    name = "1f1b"
    loss_per_microbatch = True
    stages_per_rank = 1

    def order(self, k: int, m: int, stage: int) -> list[Action]:
        return one_f_one_b(k, m, stage)


def one_f_one_b(k: int, m: int, stage: int) -> list[Action]:
    """1F1B's order for ``stage`` of ``k`` stages with ``m`` micro-batches: ``k - 1 - stage`` forwards to fill the
    pipeline (warm-up), then one forward and one backward alternately, then the remaining backwards (cool-down).

    Every stage runs the forwards in order and the backwards in order, so the messages between two neighbours keep
    one order on both ends:

    ```
    k=3, m=4
    stage 0   F0 F1 F2 B0 F3 B1 B2 B3
    stage 1   F0 F1 B0 F2 B1 F3 B2 B3
    stage 2   F0 B0 F1 B1 F2 B2 F3 B3
    ```
    """
    check_km(k, m, stage)
    warmup = min(k - 1 - stage, m)
    order = [Action(Phase.FORWARD, i) for i in range(warmup)]
    for i in range(warmup, m):  # steady state: the forward of i, then the backward of the oldest in flight
        order += [Action(Phase.FORWARD, i), Action(Phase.BACKWARD, i - warmup)]
    order += [Action(Phase.BACKWARD, i) for i in range(m - warmup, m)]
    return order
