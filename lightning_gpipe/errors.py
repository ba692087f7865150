"""Every exception lightning_gpipe raises for its users, in one place (the modules that raise them import them)."""

from __future__ import annotations

__all__ = [
    "AbsentLayerError",
    "BalanceError",
    "BufferReplayError",
    "DataMismatchError",
    "DeferredInitError",
    "SkipError",
    "StageError",
]


class BalanceError(ValueError):
    """The requested split of layers into stages is impossible."""


class AbsentLayerError(AttributeError):
    """User code reached for a layer that another stage of the pipeline holds.

    An ``AttributeError``, so ``hasattr`` and ``getattr(..., default)`` keep working on a partitioned module.
    """


class StageError(RuntimeError):
    """User code asked for something of the whole model that one stage of the pipeline cannot answer."""


class DataMismatchError(RuntimeError):
    """The stages of one pipeline hold different batches."""


class DeferredInitError(RuntimeError):
    """A model's construction cannot be replayed one stage at a time."""


class BufferReplayError(RuntimeError):
    """A buffer changed in a forward in a way its re-materialized replay cannot reproduce."""


class SkipError(ValueError):
    """A stash or a pop that cannot be matched: the model's skips are inconsistent."""
