"""Callbacks the experiments log with."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor


class SamplesPerSecond(L.Callback):
    """Logs ``train/samples_per_s``: samples of each training batch over the wall time of its step."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        sizes: list[int] = []
        apply_to_collection(batch, Tensor, lambda t: sizes.append(t.shape[0]))
        elapsed = time.perf_counter() - self._start
        pl_module.log("train/samples_per_s", sizes[0] / elapsed, on_step=True, on_epoch=False)
