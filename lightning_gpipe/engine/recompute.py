"""Re-materialization: replaying a stage's forward in backward exactly as it first ran.

The replay shares the first forward's random streams and autocast (:class:`ForwardState`), and the values of the
buffers that forward changes (:class:`BufferReplay`): an input normaliser's running statistics, a codebook, a
counter. The recompute reads them as the first forward did, and whatever it writes to them is dropped, so they
end as the forwards left them. Batch-norm statistics are kept the same way by
:func:`~lightning_gpipe.engine.batchnorm.batchnorm_stats_kept`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_gpipe.engine.batchnorm import STATISTICS
from lightning_gpipe.engine.rng import random_states
from lightning_gpipe.errors import BufferReplayError

__all__ = ["ForwardState", "BufferReplay", "BufferReplayError"]


@dataclass(frozen=True)
class ForwardState:
    """What a recomputed forward must share with the original: RNG streams and autocast."""

    device: torch.device
    cpu_rng: Tensor
    device_rng: Optional[Tensor]
    autocast: bool
    autocast_dtype: torch.dtype

    @classmethod
    def capture(cls, device: torch.device) -> ForwardState:
        kind = device.type
        return cls(
            device=device,
            cpu_rng=torch.get_rng_state(),
            device_rng=torch.cuda.get_rng_state(device) if kind == "cuda" else None,
            autocast=torch.is_autocast_enabled(kind),
            autocast_dtype=torch.get_autocast_dtype(kind),
        )

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body with the captured RNG and autocast state; the caller's RNG state is left untouched."""
        with random_states(self.device, self.cpu_rng, self.device_rng):
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast):
                yield


#: One forward's view of a stage's buffers: per watched buffer, its index, the tensor object, its version counter,
#: and a copy of its value where it may be changed in place.
_Watched = list[tuple[int, Tensor, int, Optional[Tensor]]]


class BufferReplay:
    """The buffers a stage's forward changes, kept for each re-materialized micro-batch.

    The first training forward copies every buffer beforehand and notes which ones it changed (in place, or by
    assigning a new tensor); later forwards copy only those. Batch-norm statistics are left to
    :func:`~lightning_gpipe.engine.batchnorm.batchnorm_stats_kept`.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self._buffers = [
            (m, name) for layer in layers for m in layer.modules() for name, b in m._buffers.items()
            if b is not None and not (isinstance(m, nn.modules.batchnorm._BatchNorm) and name in STATISTICS)
        ]  # fmt: skip
        self._changing: Optional[set[int]] = None  # learned from the first forward

    def before(self) -> _Watched:
        """Note the buffers' state before a re-materialized forward."""
        watched = []
        for index, (m, name) in enumerate(self._buffers):
            b = m._buffers[name]
            if b is None:
                continue
            copy = b.detach().clone() if self._changing is None or index in self._changing else None
            watched.append((index, b, b._version, copy))
        return watched

    def after(self, watched: _Watched) -> dict[int, Tensor]:
        """The values before the forward of every buffer it changed, by index, for :meth:`replayed`."""
        before: dict[int, Tensor] = {}
        for index, b, version, copy in watched:
            m, name = self._buffers[index]
            if m._buffers[name] is b and b._version == version:
                continue
            if copy is not None:
                before[index] = copy
            elif b._version == version:  # a new tensor was assigned: the old one is the value before
                before[index] = b
            else:
                raise BufferReplayError(
                    f"GPipeStrategy: the forward changed buffer {name!r} of {type(m).__name__} in place, which the"
                    " first training forward of this stage left alone, so its re-materialized replay cannot read the"
                    " value the forward read. Change it in every training forward, or use"
                    " GPipeStrategy(checkpoint='never')."
                )
        if self._changing is None:
            self._changing = set(before)
        else:
            self._changing |= set(before)
        return before

    @contextmanager
    def replayed(self, before: dict[int, Tensor]) -> Iterator[None]:
        """Inside the block the buffers hold ``before``'s values, which the block may change; after it, their own."""
        current = {}
        for index, value in before.items():
            m, name = self._buffers[index]
            current[index] = m._buffers[name]
            m._buffers[name] = value
        try:
            yield
        finally:
            for index, value in current.items():
                m, name = self._buffers[index]
                m._buffers[name] = value

