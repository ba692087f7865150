"""A small residual CNN: residual connections inside blocks, blocks in the Sequential."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from experiments.models.base import Classifier


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection. GroupNorm, not BatchNorm: its statistics do not
    depend on how the batch is split into micro-batches."""

    def __init__(self, channels: int, groups: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(h)))  # (B, C, H, W)


class ConvNet(Classifier):
    input_kind = "image"

    def __init__(
        self, in_channels: int = 1, channels: int = 32, blocks: int = 4, classes: int = 10,
        optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
    ) -> None:  # fmt: skip
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(),
            *[ResidualBlock(channels) for _ in range(blocks)],
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, classes)
