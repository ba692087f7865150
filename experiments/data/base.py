"""What the experiment data modules share: a train/val split of tensors and their loaders."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class SplitDataModule(L.LightningDataModule):
    """Subclasses build ``(inputs, targets)`` in :meth:`make`; the last ``val_fraction`` becomes validation."""

    #: What the inputs are: ``"vector"``, ``"image"`` or ``"tokens"``; the model must read the same.
    kind = "vector"
    #: What the targets are: ``"label"`` (one class per sample or token) or ``"pixels"`` (one per pixel).
    target_kind = "label"

    def __init__(self, batch_size: int = 128, val_fraction: float = 0.1, seed: int = 1234) -> None:
        super().__init__()
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed

    def make(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        x, y = self.make()
        n_val = max(1, int(len(x) * self.val_fraction))
        self.train_set = TensorDataset(x[:-n_val], y[:-n_val])
        self.val_set = TensorDataset(x[-n_val:], y[-n_val:])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)  # the same order on every pipeline stage
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
