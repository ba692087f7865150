"""Seeded classification data labelled by a fixed random teacher network, so the loss can really fall."""

from __future__ import annotations

import torch
from torch import nn

from experiments.data.base import SplitDataModule


class SyntheticDataModule(SplitDataModule):
    kind = "vector"

    def __init__(self, features: int = 32, classes: int = 10, size: int = 4608, **kwargs) -> None:
        super().__init__(**kwargs)
        self.features, self.classes, self.size = features, classes, size

    def make(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        teacher = nn.Sequential(nn.Linear(self.features, 64), nn.Tanh(), nn.Linear(64, self.classes))
        with torch.no_grad():
            for p in teacher.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            x = torch.randn(self.size, self.features, generator=g)
            y = teacher(x).argmax(-1)  # (N,)
        return x, y
