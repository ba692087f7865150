"""Collectives the pipeline's stages run together: gathers onto the first stage, and errors that reach every rank."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_gpipe.parallel.topology import Topology

__all__ = ["Failure", "gather_to_first", "gather_pipeline", "all_gather_object", "together"]


@dataclass
class Failure:
    """An error on one rank, in a form every rank can raise: the error itself where it pickles, else its text."""

    kind: str
    message: str
    exception: Optional[Exception] = None

    @classmethod
    def of(cls, error: Exception) -> Failure:
        try:
            copy = pickle.loads(pickle.dumps(error))
        except Exception:
            copy = None
        return cls(type(error).__name__, str(error), copy)

    @property
    def error(self) -> Exception:
        return self.exception if self.exception is not None else RuntimeError(f"{self.kind}: {self.message}")


def gather_to_first(local: Any, stage: int, k: int, ranks: Optional[Sequence[int]] = None) -> list[Any]:
    """Every stage's ``local`` object on the first stage (``[]`` elsewhere), one stage at a time.

    ``ranks`` are the global ranks of the stages, ``0 .. k-1`` by default (one replica). The first stage never
    holds more than its own object plus the ones already received; the others only ever hold their own. Tensors
    travel on the CPU.
    """
    local = apply_to_collection(local, Tensor, lambda t: t.detach().cpu())
    if k == 1:
        return [local]
    ranks = list(range(k)) if ranks is None else list(ranks)
    if stage != 0:
        dist.send_object_list([local], dst=ranks[0])
        return []
    gathered = [local]
    for src in ranks[1:]:
        box: list[Any] = [None]
        dist.recv_object_list(box, src=src)
        gathered.append(box[0])
    return gathered


def gather_pipeline(local: Any, topology: Topology) -> list[Any]:
    """Every stage's ``local`` of this rank's pipeline on its first stage (``[]`` elsewhere), by :func:`gather_to_first`."""
    return gather_to_first(local, topology.stage, topology.k, topology.pipeline_ranks)


def all_gather_object(obj: Any, group: Optional[Any] = None) -> list[Any]:
    """``obj`` of every rank of ``group`` (the world by default), in rank order, on every rank."""
    if not dist.is_available() or not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def together(fn: Callable[[], Any], gather: Callable[[Any], list[Any]] = all_gather_object) -> Any:
    """Run ``fn`` on every rank; if it raised on any, raise on all, so no rank goes on to wait for the others."""
    failure, result = None, None
    try:
        result = fn()
    except Exception as error:
        failure = error
    failures = gather(None if failure is None else Failure.of(failure))
    if failure is not None:
        raise failure
    first = next((f for f in failures if f is not None), None)
    if first is not None:
        raise first.error
    return result
