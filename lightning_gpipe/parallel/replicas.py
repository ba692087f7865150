"""Averaging one stage's gradients over its data-parallel replicas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gpipe.instrument.timeline import Timeline

__all__ = ["ReplicaAverage", "GradientAverager", "buckets"]


class ReplicaAverage(Protocol):
    """What a stage's step needs of the replicas' gradient average: :class:`GradientAverager` (all-reduce) or
    :class:`~lightning_gpipe.parallel.shard.GradientScatter` (reduce-scatter, with shards)."""

    @property
    def started(self) -> bool: ...

    def start(self, params: list[Tensor], grads: list[Optional[Tensor]]) -> None: ...

    def finish(self) -> list[Optional[Tensor]]: ...


def buckets(tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """The positions of ``tensors`` by dtype and device, in order: one message per bucket."""
    found: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        found.setdefault((t.dtype, t.device), []).append(i)
    return found


class GradientAverager:
    """Averages gradients over the replicas of one stage, as DDP does: each replica divides by their count D,
    then one all-reduce sums them, per dtype and device. :meth:`start` posts it without waiting, as soon as the
    stage's backward ends; :meth:`finish` waits and returns the averages, before anything reads them.

    Every parameter that may train takes part, with zeros where this replica has no gradient, and a count of the
    replicas that had one travels along: a parameter no replica has a gradient for keeps none (as on one device),
    one that only some replicas reached gets their sum over D (as DDP with ``find_unused_parameters``), and the
    replicas never disagree on the size of what they reduce.
    """

    def __init__(self, group: Optional[dist.ProcessGroup], d: int, timeline: Timeline) -> None:
        self.group, self.d, self.timeline = group, d, timeline
        self._pending: list[tuple[dist.Work, Tensor, list[int], list[Tensor], list[Optional[Tensor]]]] = []
        self._count = 0

    @property
    def started(self) -> bool:
        return bool(self._pending)

    def start(self, params: list[Tensor], grads: list[Optional[Tensor]]) -> None:
        """Post the all-reduce of ``grads`` (``None`` where this replica has none) of ``params``."""
        if self._pending:
            raise RuntimeError("GradientAverager.start: the previous average was not finished")
        self._count = len(params)
        for (dtype, device), index in buckets(params).items():
            values = [grads[i] if grads[i] is not None else torch.zeros_like(params[i]) for i in index]
            present = torch.tensor([grads[i] is not None for i in index], dtype=dtype, device=device)
            numel = sum(v.numel() for v in values)
            flat = torch.cat([v.reshape(-1) for v in values] + [present])
            flat[:numel].div_(self.d)
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            assert work is not None
            self._pending.append((work, flat, index, [params[i] for i in index], [grads[i] for i in index]))

    def finish(self) -> list[Optional[Tensor]]:
        """Wait for the averages; per parameter given to :meth:`start`, its averaged gradient (written into this
        replica's own gradient tensor where it had one), or ``None`` where no replica had one."""
        averaged: list[Optional[Tensor]] = [None] * self._count
        with self.timeline.span("allreduce"):
            for work, flat, index, params, grads in self._pending:
                work.wait()
                counts = flat[flat.numel() - len(index) :]
                offset = 0
                for i, p, g, count in zip(index, params, grads, counts.tolist()):
                    value = flat[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
                    if count == 0:
                        continue
                    averaged[i] = g.copy_(value) if g is not None else value.clone()
        self._pending = []
        return averaged
