"""Sharing what the last stage logs with every stage, so all ranks see the same metrics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_gpipe.patching import patched

__all__ = ["LogRecord", "record_logs", "replay_logs", "shareable", "muted_logs"]

#: ``self.log`` call: name, value, and the remaining arguments as given.
LogRecord = tuple[str, Any, tuple[Any, ...], dict[str, Any]]


@contextmanager
def record_logs(module: LightningModule) -> Iterator[list[LogRecord]]:
    """Record the ``self.log`` calls made inside the block, without making them (``log_dict`` goes through ``log``
    too): the last stage makes them afterwards with :func:`replay_logs`, as every other stage does."""
    records: list[LogRecord] = []

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        _check_portable(name, value)
        records.append((name, value, args, kwargs))

    with patched(module, "log", log):
        yield records


@contextmanager
def muted_logs(module: LightningModule) -> Iterator[list[LogRecord]]:
    """Ignore ``self.log`` inside the block: for stages that replay the last stage's logs instead."""
    with patched(module, "log", lambda *args, **kwargs: None):
        yield []


def shareable(records: list[LogRecord]) -> list[LogRecord]:
    """``records`` with their tensors detached, to be sent to the other stages (moved to the CPU there)."""
    return [(name, apply_to_collection(value, Tensor, Tensor.detach), args, kwargs) for name, value, args, kwargs in records]


def replay_logs(module: LightningModule, records: list[LogRecord], device: torch.device) -> None:
    """Make recorded ``self.log`` calls on this rank. Every stage replays the same calls in the same state, so
    an error Lightning raises for one of them is raised on every stage alike."""
    for name, value, args, kwargs in records:
        try:
            module.log(name, apply_to_collection(value, Tensor, lambda t: t.to(device)), *args, **kwargs)
        except Exception as error:
            error.add_note(
                f"(raised by self.log({name!r}, ...) of the step: GPipeStrategy records the last stage's calls and"
                " makes them on every stage, after the step's code)"
            )
            raise


def _check_portable(name: str, value: Any) -> None:
    from torchmetrics import Metric

    if isinstance(value, Metric):
        raise TypeError(
            f"self.log({name!r}, <{type(value).__name__}>): under GPipeStrategy only the last stage computes"
            " the loss and metrics, so log the metric's value (a tensor) instead of the Metric object"
        )
