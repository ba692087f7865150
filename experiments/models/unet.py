"""A small U-Net: an encoder whose levels stash their features for the decoder levels that pop them.

The skips from encoder to decoder cross pipeline stages; :mod:`lightning_gpipe.skip` sends each one straight from
the stage that stashes it to the stage that pops it. Run on one device, the same modules form a plain U-Net.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from experiments.models.base import Classifier
from lightning_gpipe.skip import Namespace, pop, skippable, stash


def conv_block(c_in: int, c_out: int, groups: int = 4) -> nn.Sequential:
    """3x3 convolution, GroupNorm (statistics per sample: micro-batching cannot change them), ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU())


@skippable(stash=["features"])
class Down(nn.Module):
    """An encoder level: convolve, stash the features for the decoder, halve the resolution."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = conv_block(c_in, c_out)

    def forward(self, x: torch.Tensor):
        h = self.conv(x)  # (B, C_out, H, W)
        yield stash("features", h)
        return F.max_pool2d(h, 2)  # (B, C_out, H/2, W/2)


@skippable(pop=["features"])
class Up(nn.Module):
    """A decoder level: double the resolution, concatenate the encoder's features, convolve."""

    def __init__(self, c_in: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.conv = conv_block(c_in + c_skip, c_out)

    def forward(self, x: torch.Tensor):
        features = yield pop("features")  # (B, C_skip, 2H, 2W)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C_in, 2H, 2W)
        return self.conv(torch.cat([x, features], dim=1))


class PixelLogits(nn.Module):
    """1x1 convolution to per-pixel class scores, classes last: (B, H, W, classes)."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).permute(0, 2, 3, 1)


class UNet(Classifier):
    """Per-pixel classification: ``levels`` encoder levels (each halves the resolution), a bottleneck, as many
    decoder levels, and a head (2 * levels + 3 layers). Each level pair has its own skip namespace."""

    input_kind = "image"
    target_kind = "pixels"

    def __init__(
        self, in_channels: int = 1, channels: int = 16, levels: int = 2, classes: int = 2,
        optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
    ) -> None:  # fmt: skip
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        widths = [channels * 2**level for level in range(levels + 1)]  # per level, the bottleneck last
        spaces = [Namespace(f"level{level}") for level in range(levels)]
        downs = [Down(widths[max(level - 1, 0)], widths[level]).isolate(spaces[level]) for level in range(levels)]
        ups = [Up(widths[level + 1], widths[level], widths[level]).isolate(spaces[level]) for level in range(levels)]
        self.net = nn.Sequential(
            conv_block(in_channels, channels),
            *downs,
            conv_block(widths[-2], widths[-1]),
            *reversed(ups),
            PixelLogits(channels, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, H, W, classes)
