"""Re-materialization: replaying a stage's forward in backward exactly as it first ran."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["ForwardState"]


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
