"""The pipeline schedule as data: which stage does what, in which order."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Action", "Phase", "fthenb", "clock_cycles", "checkpoint_stop", "CHECKPOINT_MODES"]

#: Re-materialization modes: how many of the M micro-batches recompute their stage in backward.
CHECKPOINT_MODES = ("always", "except_last", "never")


class Phase(str, Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


@dataclass(frozen=True)
class Action:
    """One unit of work of a stage: the forward or backward pass of micro-batch ``i``."""

    phase: Phase
    i: int

    def __repr__(self) -> str:
        return f"{self.phase.value[0].upper()}{self.i}"


def fthenb(k: int, m: int, stage: int) -> list[Action]:
    """GPipe's F-then-B order for ``stage`` of ``k`` stages with ``m`` micro-batches.

    Every stage runs the same order: forward of all micro-batches, then their backward in
    reverse. Stages only differ in *when* each action can start (see :func:`clock_cycles`)::

        k=3, m=4   clock:  0   1   2   3   4   5   6   7   8   9  10  11
        stage 0            F0  F1  F2  F3              B3  B2  B1  B0
        stage 1                F0  F1  F2  F3      B3  B2  B1  B0
        stage 2                    F0  F1  F2  F3  B3  B2  B1  B0
    """
    _check_km(k, m)
    if not 0 <= stage < k:
        raise ValueError(f"stage must be in [0, {k}), got {stage}")
    forward = [Action(Phase.FORWARD, i) for i in range(m)]
    backward = [Action(Phase.BACKWARD, i) for i in reversed(range(m))]
    return forward + backward


def clock_cycles(k: int, m: int) -> list[list[tuple[int, Action]]]:
    """The ideal timeline of :func:`fthenb`: for each clock tick, the ``(stage, action)`` pairs that run.

    Every action is assumed to take one tick; a stage's forward of micro-batch ``i`` waits for
    stage ``j - 1``, its backward for stage ``j + 1``. The ``2 * (m + k - 1)`` ticks hold
    ``2 * m`` busy slots per stage, which gives the bubble fraction ``(k - 1) / (m + k - 1)``.
    """
    _check_km(k, m)
    ticks: list[list[tuple[int, Action]]] = [[] for _ in range(2 * (m + k - 1))]
    for j in range(k):
        for i in range(m):
            ticks[i + j].append((j, Action(Phase.FORWARD, i)))
            # The last stage starts backward right after its last forward.
            ticks[(m + k - 1) + (m - 1 - i) + (k - 1 - j)].append((j, Action(Phase.BACKWARD, i)))
    return ticks


def checkpoint_stop(mode: str, m: int) -> int:
    """How many micro-batches, counted from the first, are re-materialized under ``mode``."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {mode!r}")
    return {"always": m, "except_last": max(m - 1, 0), "never": 0}[mode]


def _check_km(k: int, m: int) -> None:
    if k < 1 or m < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got k={k}, m={m}")
