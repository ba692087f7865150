"""Each stage's own random stream.

A stage's layers draw from a stream of their own, seeded from the run's seed and the stage
index. Stages thus draw independent dropout masks, and the rank-wide stream, which data
loading shuffles with, advances in step on every rank whatever each stage's layers draw.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["StageRandom", "random_states", "rank_random_state", "set_rank_random_state"]

_STAGE_SEED_STRIDE = 1_000_003  # a prime, so stage streams of nearby run seeds do not coincide


class StageRandom:
    """The CPU (and CUDA) generator states of one stage, swapped in while its layers run."""

    def __init__(self, stage: int, device: torch.device) -> None:
        self.device = device
        self._devices = [device] if device.type == "cuda" else []
        seed = (torch.initial_seed() + _STAGE_SEED_STRIDE * (stage + 1)) % 2**63
        with torch.random.fork_rng(devices=self._devices, device_type=device.type):
            torch.manual_seed(seed)
            self._cpu, self._cuda = self._get()

    def _get(self) -> tuple[Tensor, Optional[Tensor]]:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self._devices else None

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run the block on this stage's stream; the rank-wide stream is left where it was."""
        with random_states(self.device, self._cpu, self._cuda):
            try:
                yield
            finally:
                self._cpu, self._cuda = self._get()

    def state_dict(self) -> dict[str, Optional[Tensor]]:
        return {"cpu": self._cpu.clone(), "cuda": None if self._cuda is None else self._cuda.clone()}

    def load_state_dict(self, state: dict[str, Optional[Tensor]]) -> None:
        self._cpu = state["cpu"].clone()
        if self._devices and state["cuda"] is not None:
            self._cuda = state["cuda"].clone()


@contextmanager
def random_states(device: torch.device, cpu: Tensor, cuda: Optional[Tensor]) -> Iterator[None]:
    """Run the block from the CPU generator state ``cpu`` (and ``device``'s CUDA state ``cuda``); the caller's
    states are left as they were."""
    devices = [device] if cuda is not None else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def rank_random_state(device: torch.device) -> dict[str, Any]:
    """The rank-wide random streams that data loading and user code draw from.

    Only tensors and plain Python values, so a checkpoint holding it loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rank_random_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
