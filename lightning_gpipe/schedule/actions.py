"""The schedule as data: one stage's actions, and the protocol every schedule follows."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

__all__ = ["Action", "Phase", "Schedule", "Rematerialized", "checkpoint_stop", "CHECKPOINT_MODES", "check_km"]

#: Re-materialization modes: how many of the M micro-batches recompute their stage in backward.
CHECKPOINT_MODES = ("always", "except_last", "never")


class Phase(str, Enum):
    """Which pass of a micro-batch an action runs."""

    FORWARD = "forward"
    BACKWARD = "backward"


@dataclass(frozen=True)
class Action:
    """One unit of work of a stage: the forward or backward pass of micro-batch ``i``.

    ``recompute`` (forward actions of a training step): keep only the stage's input and run the forward again
    right before the backward (re-materialization), instead of keeping its activations. ``chunk``: which of the
    rank's model chunks runs it, under a schedule that gives a rank several (interleaved); written ``F3c1``.
    """

    phase: Phase
    i: int
    recompute: bool = False
    chunk: int = 0

    def __repr__(self) -> str:
        chunk = f"c{self.chunk}" if self.chunk else ""
        return f"{self.phase.value[0].upper()}{self.i}{chunk}" + ("r" if self.recompute else "")


@runtime_checkable
class Schedule(Protocol):
    """A pipeline schedule: for K stages, M micro-batches and one stage, its actions in order.

    The engine's `StageExecutor` (`lightning_gpipe.engine.executor`) interprets them; a stage's forward of
    micro-batch ``i`` takes its input from the stage before, its backward the gradient from the stage after, so
    the messages between two stages follow from the two stages' action lists (see `lightning_gpipe.engine.p2p`
    for the order in which they are posted).
    """

    #: What ``GPipeStrategy(schedule=...)`` calls it.
    name: str
    #: Whether the user's loss runs once per micro-batch, as each leaves the last stage (1F1B), rather than once
    #: on the whole batch after every forward (GPipe's F-then-B).
    loss_per_microbatch: bool
    #: Model chunks per rank: 1, or v for interleaved schedules, whose messages are tagged by chunk.
    stages_per_rank: int

    def actions(self, k: int, m: int, stage: int) -> list[Action]:
        """``stage``'s actions for ``k`` stages and ``m`` micro-batches, in the order it runs them."""
        ...


def checkpoint_stop(mode: str, m: int) -> int:
    """How many micro-batches, counted from the first, are re-materialized under ``mode``."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {mode!r}")
    return {"always": m, "except_last": max(m - 1, 0), "never": 0}[mode]


def check_km(k: int, m: int, stage: int = 0) -> None:
    """Raise unless there are stages and micro-batches, and ``stage`` is one of the ``k``."""
    if k < 1 or m < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got k={k}, m={m}")
    if not 0 <= stage < k:
        raise ValueError(f"stage must be in [0, {k}), got {stage}")


@dataclass(frozen=True)
class Rematerialized:
    """A schedule made of a bare order of actions (:meth:`order`) and a re-materialization mode, ``checkpoint``:
    the forwards of the micro-batches it names recompute (``"always"``, ``"except_last"``: all but the last
    micro-batch, ``"never"``)."""

    checkpoint: str = "except_last"

    def __post_init__(self) -> None:
        checkpoint_stop(self.checkpoint, 1)  # a mode it knows, checked once

    def order(self, k: int, m: int, stage: int) -> list[Action]:
        raise NotImplementedError

    def actions(self, k: int, m: int, stage: int) -> list[Action]:
        stop = checkpoint_stop(self.checkpoint, m)
        return [
            Action(a.phase, a.i, a.phase is Phase.FORWARD and a.i < stop, a.chunk) for a in self.order(k, m, stage)
        ]
