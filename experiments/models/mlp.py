"""The deep MLP of the GPipe notebook: input, many hidden layers of equal width, output."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from experiments.models.base import Classifier


class MLP(Classifier):
    input_kind = "vector"

    def __init__(
        self, in_features: int = 32, width: int = 256, depth: int = 16, classes: int = 10,
        optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
    ) -> None:  # fmt: skip
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        layers: list[nn.Module] = [nn.Linear(in_features, width), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, classes)
