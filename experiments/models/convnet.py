"""A small residual CNN: residual connections inside blocks, blocks in the Sequential."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from experiments.models.base import Classifier


NORMS = ("group", "batch")


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection. ``norm="group"`` (GroupNorm) gives statistics that do not
    depend on how the batch is split into micro-batches; ``"batch"`` (BatchNorm, as ResNets have) is best run
    with ``GPipeStrategy(deferred_batchnorm=True)``."""

    def __init__(self, channels: int, groups: int = 8, norm: str = "group") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"ResidualBlock(norm={norm!r}): choose one of {', '.join(NORMS)}")

        def make() -> nn.Module:
            return nn.GroupNorm(groups, channels) if norm == "group" else nn.BatchNorm2d(channels)

        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = make()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(h)))  # (B, C, H, W)


class ConvNet(Classifier):
    input_kind = "image"

    def __init__(
        self, in_channels: int = 1, channels: int = 32, blocks: int = 4, classes: int = 10, norm: str = "group",
        optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
    ) -> None:  # fmt: skip
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(),
            *[ResidualBlock(channels, norm=norm) for _ in range(blocks)],
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, classes)
