"""The emulated device: layers whose compute is a timed wait of known cost that holds no CPU, so that many processes
share this machine's cores without slowing each other and a schedule's exact time is known."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from experiments.models.base import Classifier


class _Wait(torch.autograd.Function):
    """Emulated compute: a timed wait that holds no CPU, ``seconds_per_row`` per row of the input forward and
    twice that backward, so a recomputed forward costs one forward again."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, seconds_per_row: float) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.backward_s = 2 * seconds_per_row * x.shape[0]
        time.sleep(seconds_per_row * x.shape[0])
        return x * weight

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight = ctx.saved_tensors
        time.sleep(ctx.backward_s)
        return grad * weight, (grad * x).sum(0), None


class EmulatedBlock(nn.Module):
    """A block of known cost on an emulated device: ``x * weight`` after a timed wait (see :class:`_Wait`)."""

    def __init__(self, width: int, seconds_per_row: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.seconds_per_row = seconds_per_row

    def forward(self, x: Tensor) -> Tensor:
        return _Wait.apply(x, self.weight, self.seconds_per_row)  # (B, width)


class Logits(nn.Module):
    """The first ``classes`` features, as logits."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: Tensor) -> Tensor:
        return x[:, : self.classes]  # (B, classes)


class Emulated(Classifier):
    """``depth`` emulated blocks of the input's width, then :class:`Logits`: the whole model's forward over a batch of
    ``batch`` samples lasts ``forward_ms`` (its backward twice that)."""

    input_kind = "vector"

    def __init__(
        self, in_features: int = 32, depth: int = 8, classes: int = 10, forward_ms: float = 80.0, batch: int = 128,
        optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
    ) -> None:  # fmt: skip
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        if classes > in_features:
            raise ValueError(f"Emulated: classes={classes} logits are read from in_features={in_features} features")
        per_row = forward_ms / 1e3 / (depth * batch)
        self.net = nn.Sequential(*[EmulatedBlock(in_features, per_row) for _ in range(depth)], Logits(classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, classes)
