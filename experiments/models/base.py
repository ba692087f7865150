"""What the experiment models share: classification steps, logging, and the optimizer from the config."""

from __future__ import annotations

import math
from typing import Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F


class Classifier(L.LightningModule):
    """Cross-entropy over the last dimension of ``self(x)``; logs loss and accuracy (or perplexity)."""

    #: What the model reads: ``"vector"``, ``"image"`` or ``"tokens"``; a data module must yield the same.
    input_kind = "vector"
    #: What the model predicts: ``"label"`` or ``"pixels"``; a data module must yield the same targets.
    target_kind = "label"
    #: Log perplexity instead of accuracy (language models).
    perplexity = False

    def __init__(self, optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None) -> None:
        super().__init__()
        self.optimizer = optimizer or torch.optim.AdamW

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
        train = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=train, on_epoch=True)
        if self.perplexity:
            self.log(f"{stage}/perplexity", torch.exp(loss.detach()), on_step=False, on_epoch=True)
        else:
            accuracy = (logits.argmax(-1) == y).float().mean()
            self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return self.optimizer(self.parameters())


def init_linear(module: torch.nn.Module, std: float = 0.02, depth: Optional[int] = None) -> None:
    """GPT-2 style initialisation; residual projections scaled down by ``sqrt(2 * depth)``."""
    if isinstance(module, torch.nn.Linear):
        scale = 1 / math.sqrt(2 * depth) if depth else 1.0
        torch.nn.init.normal_(module.weight, std=std * scale)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)
