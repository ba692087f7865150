"""Seeded classification data labelled by a fixed random teacher network, so the loss can really fall."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SyntheticDataModule(L.LightningDataModule):
    def __init__(
        self, features: int = 32, classes: int = 10, train_size: int = 4096, val_size: int = 512,
        batch_size: int = 128, seed: int = 1234,
    ) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        g = torch.Generator().manual_seed(h.seed)
        teacher = nn.Sequential(nn.Linear(h.features, 64), nn.Tanh(), nn.Linear(64, h.classes))
        for p in teacher.parameters():
            p.data = torch.randn(p.shape, generator=g)
        x = torch.randn(h.train_size + h.val_size, h.features, generator=g)
        with torch.no_grad():
            y = teacher(x).argmax(-1)
        self.train_set = TensorDataset(x[: h.train_size], y[: h.train_size])
        self.val_set = TensorDataset(x[h.train_size :], y[h.train_size :])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)
