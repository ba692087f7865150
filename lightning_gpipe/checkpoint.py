"""Re-materialization: replaying a stage's forward in backward exactly as it first ran."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["ForwardState", "batchnorm_stats_kept"]


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
        cuda = [self.device] if self.device_rng is not None else []
        with torch.random.fork_rng(devices=cuda, device_type=self.device.type):
            torch.set_rng_state(self.cpu_rng)
            if self.device_rng is not None:
                torch.cuda.set_rng_state(self.device_rng, self.device)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast):
                yield


@contextmanager
def batchnorm_stats_kept(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Let a recomputed forward update batch-norm running statistics on copies: the first forward updated them.

    The copies are swapped in rather than the originals restored in place afterwards, since the
    recomputed graph saves those buffers for its backward.
    """
    names = ("running_mean", "running_var", "num_batches_tracked")
    norms = [
        m for layer in layers for m in layer.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]  # fmt: skip
    originals = [{name: getattr(m, name) for name in names} for m in norms]
    for m, buffers in zip(norms, originals):
        for name, buffer in buffers.items():
            if buffer is not None:
                setattr(m, name, buffer.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, originals):
            for name, buffer in buffers.items():
                setattr(m, name, buffer)
