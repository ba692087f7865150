"""Averaging one stage's gradients over its data-parallel replicas."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gpipe.timeline import Timeline

__all__ = ["GradientAverager"]


class GradientAverager:
    """Averages gradients over the replicas of one stage, as DDP does: each replica divides by their count D,
    then one all-reduce sums them, per dtype and device. :meth:`start` posts it without waiting, as soon as the
    stage's backward ends; :meth:`finish` waits and writes the averages back, before anything reads them."""

    def __init__(self, group: Optional[dist.ProcessGroup], d: int, timeline: Timeline) -> None:
        self.group, self.d, self.timeline = group, d, timeline
        self._pending: list[tuple[dist.Work, Tensor, list[Tensor]]] = []

    @property
    def started(self) -> bool:
        return bool(self._pending)

    def start(self, grads: list[Tensor]) -> None:
        if self._pending:
            raise RuntimeError("GradientAverager.start: the previous average was not finished")
        buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for g in grads:
            buckets.setdefault((g.dtype, g.device), []).append(g)
        for bucket in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in bucket]).div_(self.d)
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            assert work is not None
            self._pending.append((work, flat, bucket))

    def finish(self) -> None:
        with self.timeline.span("allreduce"):
            for work, flat, bucket in self._pending:
                work.wait()
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
        self._pending = []
