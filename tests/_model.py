"""An ordinary LightningModule and data, written as a user would, with no knowledge of the pipeline."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Classifier(L.LightningModule):
    def __init__(self, width: int = 8, depth: int = 4, classes: int = 3, dropout: float = 0.0, lr: float = 0.1,
                 example: bool = False):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        if example:
            self.example_input_array = torch.zeros(2, width)
        layers: list[nn.Module] = [nn.Linear(width, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Dropout(dropout), nn.Linear(width, width), nn.Tanh()] if dropout else [nn.Linear(width, width), nn.Tanh()]
        layers.append(nn.Linear(width, classes))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def _loss(self, batch):
        x, y = batch
        logits = self(x)
        # Not a mean over samples: the squared-logit penalty sums over the whole batch.
        return F.cross_entropy(logits, y) + 1e-3 * logits.pow(2).sum()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def loaders(n_train: int = 34, n_val: int = 12, width: int = 8, classes: int = 3, batch_size: int = 10, shuffle=False,
            generator_seed: int | None = None):  # fmt: skip
    """Random data; ``generator_seed`` shuffles with a generator of the loader's own instead of the global one."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n_train + n_val, width, generator=g)
    y = torch.randint(0, classes, (n_train + n_val,), generator=g)
    train = TensorDataset(x[:n_train], y[:n_train])
    val = TensorDataset(x[n_train:], y[n_train:])
    own = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    return DataLoader(train, batch_size=batch_size, shuffle=shuffle, generator=own), DataLoader(val, batch_size=5)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call in memory, on every rank."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, {k: float(v) for k, v in metrics.items()}))
