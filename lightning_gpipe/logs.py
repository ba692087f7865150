"""Sharing what the last stage logs with every stage, so all ranks see the same metrics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

__all__ = ["LogRecord", "record_logs", "replay_logs", "patched", "muted_logs"]

#: ``self.log`` call: name, value (on the CPU), and the remaining arguments as given.
LogRecord = tuple[str, Any, tuple[Any, ...], dict[str, Any]]


@contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Shadow ``obj.name`` with an instance attribute for the duration of the block."""
    missing = object()
    previous = obj.__dict__.get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if previous is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, previous)


@contextmanager
def record_logs(module: LightningModule) -> Iterator[list[LogRecord]]:
    """Record the ``self.log`` calls made inside the block (``log_dict`` goes through ``log`` too)."""
    records: list[LogRecord] = []
    original = module.log

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        records.append((name, _portable(name, value), args, kwargs))
        original(name, value, *args, **kwargs)

    with patched(module, "log", log):
        yield records


@contextmanager
def muted_logs(module: LightningModule) -> Iterator[list[LogRecord]]:
    """Ignore ``self.log`` inside the block: for stages that replay the last stage's logs instead."""
    with patched(module, "log", lambda *args, **kwargs: None):
        yield []


def replay_logs(module: LightningModule, records: list[LogRecord], device: torch.device) -> None:
    """Repeat recorded ``self.log`` calls on this rank."""
    for name, value, args, kwargs in records:
        module.log(name, apply_to_collection(value, Tensor, lambda t: t.to(device)), *args, **kwargs)


def _portable(name: str, value: Any) -> Any:
    from torchmetrics import Metric

    if isinstance(value, Metric):
        raise TypeError(
            f"self.log({name!r}, <{type(value).__name__}>): under GPipeStrategy only the last stage computes"
            " the loss and metrics, so log the metric's value (a tensor) instead of the Metric object"
        )
    return apply_to_collection(value, Tensor, Tensor.detach)  # moved to the CPU when shared, after the backward
