"""An ordinary LightningModule and data, written as a user would, with no knowledge of the pipeline."""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpipe.engine.microbatch import split_sizes
from lightning_gpipe.engine.skip import Namespace, pop, skippable, stash


class Classifier(L.LightningModule):
    def __init__(self, width: int = 8, depth: int = 4, classes: int = 3, dropout: float = 0.0, lr: float = 0.1,
                 example: bool = False):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        if example:
            self.example_input_array = torch.zeros(2, width)
        self.body = self.layers()

    def layers(self) -> nn.Sequential:
        width, depth, dropout = self.hparams.width, self.hparams.depth, self.hparams.dropout
        layers: list[nn.Module] = [nn.Linear(width, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Dropout(dropout), nn.Linear(width, width), nn.Tanh()] if dropout else [nn.Linear(width, width), nn.Tanh()]
        layers.append(nn.Linear(width, self.hparams.classes))
        return nn.Sequential(*layers)

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


class MeanLossClassifier(Classifier):
    """A loss that is a mean over samples, penalty included, as per-micro-batch schedules (1F1B) require."""

    def _loss(self, batch):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y) + 1e-3 * logits.pow(2).sum(-1).mean()


class Augmented(TensorDataset):
    """Adds fresh noise to every sample it serves: a random augmentation, drawn in the loader's workers."""

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return x + 0.5 * torch.randn_like(x), y


def loaders(n_train: int = 34, n_val: int = 12, width: int = 8, classes: int = 3, batch_size: int = 10, shuffle=False,
            generator_seed: int | None = None, augment: bool = False, num_workers: int = 0):  # fmt: skip
    """Random data; ``generator_seed`` shuffles with a generator of the loader's own instead of the global one;
    ``augment`` adds noise to each training sample as it is served, in ``num_workers`` worker processes."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n_train + n_val, width, generator=g)
    y = torch.randint(0, classes, (n_train + n_val,), generator=g)
    train = (Augmented if augment else TensorDataset)(x[:n_train], y[:n_train])
    val = TensorDataset(x[n_train:], y[n_train:])
    own = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=shuffle, generator=own, num_workers=num_workers)
    return train_loader, DataLoader(val, batch_size=5)


class _Float32(nn.Module):
    """A layer kept in float32 under autocast (a common island for numerically touchy layers)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())


class AutocastIsland(Classifier):
    """Its first layer runs in float32 under bf16-mixed."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.body[0] = _Float32(self.body[0])


class AutocastIslandLate(AutocastIsland):
    """The same, with a hook between the step and the backward: the non-last stages' backward runs late."""

    def on_before_backward(self, loss):
        pass


class StepScheduled(Classifier):
    """The learning rate changes every optimizer step."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AdamWScheduled(StepScheduled):
    """AdamW with weight decay, the learning rate stepped every optimizer step."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class MeanStepScheduled(StepScheduled):
    """StepScheduled with a loss that is a mean over samples, for per-micro-batch schedules (1F1B)."""

    _loss = MeanLossClassifier._loss


class SyncedLogs(StepScheduled):
    """Logs the loss averaged over the data-parallel ranks, in training and in validation."""

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("synced_loss", loss, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_synced", self._loss(batch), sync_dist=True)


class OneLayer(Classifier):
    """A Sequential of a single layer: it cannot be cut into two stages."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.body = nn.Sequential(nn.Linear(self.hparams.width, self.hparams.classes))


# -- what users write, which the pipeline must run exactly or refuse (tests/test_contract.py) -----------------


class PenaltyAfter(Classifier):
    """A parameter penalty in the loss, summed after ``self(x)``."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y) + 0.05 * sum(p.pow(2).sum() for p in self.parameters())


class PenaltyBefore(Classifier):
    """The same penalty, summed before ``self(x)``."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        penalty = sum(p.pow(2).sum() for p in self.parameters())
        return F.cross_entropy(self(x), y) + 0.05 * penalty


class LastLayerPenalty(Classifier):
    """A penalty on the last layer alone, which the last stage holds: the pipeline computes it exactly."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 0.05 * self.body[-1].weight.pow(2).sum()


class LightningGradNorm(Classifier):
    """Lightning's documented gradient-norm logging."""

    def on_before_optimizer_step(self, optimizer):
        from lightning.pytorch.utilities import grad_norm

        self.log_dict(grad_norm(self, norm_type=2))


class PipelineGradNorm(Classifier):
    """The same with lightning_gpipe's grad_norm, which covers every stage (and is Lightning's elsewhere)."""

    def on_before_optimizer_step(self, optimizer):
        from lightning_gpipe import grad_norm

        self.log_dict(grad_norm(self, norm_type=2))


def _total_grad_norm(module: L.LightningModule) -> float:
    from lightning_gpipe import grad_norm

    return float(grad_norm(module, norm_type=2).get("grad_2.0_norm_total", -1.0))  # -1: no gradients yet


class NormBeforeZeroGrad(Classifier):
    """Reads the gradients that zero_grad is about to clear: the previous optimizer step's."""

    def on_before_zero_grad(self, optimizer):
        self.log("norm_before_zero_grad", _total_grad_norm(self))


class NormBeforeBackward(Classifier):
    """Reads the gradients before each backward: with accumulation, the window's so far."""

    def on_before_backward(self, loss):
        self.log("norm_before_backward", _total_grad_norm(self))


class LogsBatchOfValues(Classifier):
    """Logs a tensor of two values after self(x): Lightning refuses it when the call is made."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("per_sample", loss.detach().expand(2))
        return loss


class LogsBatchOfValuesLate(LogsBatchOfValues):
    """The same, with a hook between the step and the backward (the backward waits for the results)."""

    def on_before_backward(self, loss):
        pass


class SoftmaxInEval(Classifier):
    """A forward that does more than the Sequential, in evaluation only."""

    def forward(self, x):
        logits = self.body(x)
        return logits if self.training else logits.softmax(-1)


class StopsOnSecondBatch(Classifier):
    """Stops training from the step, after ``self(x)``, as stop-on-NaN code does."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == 1:
            self.trainer.should_stop = True
        return loss


class DictOutputs(Classifier):
    """Steps that return dictionaries, which callbacks read."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return {"val_acc": (self(x).argmax(-1) == y).float().mean(), "batch": batch_idx}


class SequentialPenalty(Classifier):
    """The penalty summed over the Sequential's parameters instead of the module's."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y) + 0.05 * sum(p.pow(2).sum() for p in self.body.parameters())


class SequentialGradNorm(Classifier):
    """Lightning's grad_norm of the Sequential."""

    def on_before_optimizer_step(self, optimizer):
        from lightning.pytorch.utilities import grad_norm

        self.log_dict(grad_norm(self.body, norm_type=2))


class WarmupInStep(Classifier):
    """A learning-rate warm-up written in the step, after self(x): it changes the optimizer on the last stage."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        for group in self.optimizers().param_groups:
            group["lr"] = self.hparams.lr * min(1.0, (self.global_step + 1) / 3)
        return loss


class GathersInValidation(Classifier):
    """A gather over the data-parallel ranks in the step after self(x): on one device, the tensor itself."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.all_gather(F.cross_entropy(self(x), y)).mean())


class DrawsAfterForward(Classifier):
    """Draws from the global random stream after self(x), on the last stage only; a shuffling loader draws next."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        weight = 1.0 + 0.1 * torch.rand(())  # a random loss weight
        loss = weight * F.cross_entropy(logits, y)
        self.log("weight", weight)
        return loss


class ReturnsNoneOnce(Classifier):
    """Skips the second training step by returning None, as single-device Lightning allows."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx == 1 else loss


class DetachedLoss(Classifier):
    """Returns a loss without a graph: Lightning's backward fails on the last stage."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx).detach()


class BarrierInValidation(Classifier):
    """A collective of every rank in the step after self(x)."""

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.trainer.strategy.barrier()
        self.log("val_loss", loss)


class UnpicklableOutput(Classifier):
    def training_step(self, batch, batch_idx):
        return {"loss": super().training_step(batch, batch_idx), "fn": lambda: None}


class FrozenFirstLayer(Classifier):
    """Freezes the first layer and optimizes what still trains, as fine-tuning code does."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.body[0].requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr, momentum=0.9)


class FirstLayerOptimized(Classifier):
    """Optimizes the first layer alone, which stage 0 holds."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.body[0].parameters(), lr=0.1)


class CallsLayers(Classifier):
    """Calls the Sequential itself in the step instead of ``self(x)``."""

    def training_step(self, batch, batch_idx):
        return self.body(batch[0]).sum()


class TwoOptimizers(Classifier):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.body[:5].parameters(), lr=0.1), torch.optim.SGD(self.body[5:].parameters(), lr=0.1)]


class PrintsAfterForward(Classifier):
    """Prints with self.print after self(x), where only the last stage runs the code."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.print(f"train {self.current_epoch} {batch_idx} {len(batch[1])}")
        return loss

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.print("val", self.current_epoch, batch_idx, sep=":")


class RankZeroAfterForward(Classifier):
    """Calls a @rank_zero_only method after self(x), where only the last stage runs the code."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.notes = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.note(loss)
        return loss

    @rank_zero_only
    def note(self, loss):
        self.notes.append(float(loss))


class SavesStepState(Classifier):
    """Keeps a running sum of its losses (after self(x): on the last stage) and saves it with its checkpoints."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = 0.0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.seen += float(loss)
        return loss

    def on_save_checkpoint(self, checkpoint):
        checkpoint["seen"] = self.seen


class NormAtEpochEnd(Classifier):
    """Logs the weights' norm when an epoch ends: a sum over self.parameters()."""

    def on_train_epoch_end(self):
        self.log("weight_norm", torch.stack([p.norm() for p in self.parameters()]).norm())


class SavesUnpicklable(Classifier):
    def on_save_checkpoint(self, checkpoint):
        checkpoint["callback"] = lambda: None


class LBFGSClassifier(Classifier):
    """A closure optimizer that reduces over every parameter it optimizes."""

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1)


class _TwiceSGD(torch.optim.SGD):
    """Runs the closure twice per step (as a closure optimizer's line search may)."""

    def step(self, closure=None):
        closure()
        return super().step(closure)


class ClosureTwice(Classifier):
    def configure_optimizers(self):
        return _TwiceSGD(self.parameters(), lr=0.1)


class RankShardedData(L.LightningDataModule):
    """Shards the training data by global rank in setup, as a data module written for DDP does."""

    def setup(self, stage):
        train, self.val = loaders()
        x, y = train.dataset.tensors
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self.train = TensorDataset(x[rank::world], y[rank::world])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=10)

    def val_dataloader(self):
        return self.val


class UnfreezeFirstLayer(BaseFinetuning):
    """Lightning's fine-tuning callback as its documentation shows it: frozen first, unfrozen at epoch 1."""

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.body[0])

    def finetune_function(self, pl_module, current_epoch, optimizer):
        if current_epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.body[0], optimizer, lr=0.05)


class BatchSized(L.LightningDataModule):
    """The test data with a batch_size attribute, which Lightning's batch-size finder scales."""

    def __init__(self, batch_size: int = 10):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(loaders()[0].dataset, batch_size=self.batch_size)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Single-device reference for deferred batch norm: normalizes each of ``microbatches`` chunks of the batch by
    its own statistics, and updates the running statistics with torch's own code, from the whole batch."""

    def __init__(self, *args, microbatches: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.microbatches = microbatches

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        with torch.no_grad():
            super().forward(x)  # the running statistics, as one forward over the whole batch updates them
        chunks = x.split(split_sizes(x.shape[0], self.microbatches))
        return torch.cat([F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps) for c in chunks])


class BatchNormConvNet(Classifier):
    """A small CNN with batch normalization, on the same 8-feature data seen as 2 x 2 x 2 images; ``ghost``: with
    :class:`GhostBatchNorm2d` of that many micro-batches instead."""

    def __init__(self, lr: float = 0.1, ghost: int = 0):
        super().__init__(lr=lr)

        def norm(**kwargs):
            return GhostBatchNorm2d(4, microbatches=ghost, **kwargs) if ghost else nn.BatchNorm2d(4, **kwargs)

        self.body = nn.Sequential(
            nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 4, 3, padding=1), norm(), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), norm(momentum=None), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3),
        )  # fmt: skip


class StepRecorder(L.Callback):
    """Keeps each training batch's input sum and what the steps returned, as callbacks receive it (tensors as floats)."""

    def __init__(self):
        self.batch_sums: list[float] = []
        self.train: list = []
        self.val: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_sums.append(float(batch[0].sum()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(_floats(outputs))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val.append(_floats(outputs))


def _floats(outputs):
    if isinstance(outputs, dict):
        return {key: _floats(value) for key, value in outputs.items()}
    return float(outputs) if isinstance(outputs, torch.Tensor) else outputs


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


@skippable(stash=["early"])
class _StashTanh(nn.Module):
    """A linear layer and tanh whose input waits for a later layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        yield stash("early", x)
        return torch.tanh(self.lin(x))


@skippable(pop=["early"])
class _PopAdd(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        early = yield pop("early")
        return torch.tanh(self.lin(x) + early)


class SkipClassifier(Classifier):
    """The classifier with a skip from its first layer to the one before its head (layers 0 -> 4 of 6)."""

    def __init__(self, width: int = 8, classes: int = 3, **kwargs):
        super().__init__(width=width, classes=classes, **kwargs)
        self.body = nn.Sequential(
            _StashTanh(width), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), _PopAdd(width),
            nn.Linear(width, classes),
        )  # fmt: skip


class IsolatedSkips(SkipClassifier):
    """The same skip in a namespace of its own, as a U-Net gives each level one: stashed and popped on two stages,
    it matches by the namespace's identity."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        ns = Namespace()
        self.body[0].isolate(ns)
        self.body[4].isolate(ns)


class LocalLayers(Classifier):
    """Its layer class is defined inside a function, as in notebooks and scripts: it cannot be pickled."""

    def layers(self):
        class Affine(nn.Module):
            def __init__(self, width: int, out: int) -> None:
                super().__init__()
                self.lin = nn.Linear(width, out)

            def forward(self, x):
                return self.lin(x)

        layers = super().layers()
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Linear):
                affine = Affine(layer.in_features, layer.out_features)
                affine.lin = layer  # the same initial weights as Classifier's
                layers[i] = affine
        return layers


class UnpoppedSkip(Classifier):
    """A stash that no layer pops."""

    def __init__(self, width: int = 8, classes: int = 3, **kwargs):
        super().__init__(width=width, classes=classes, **kwargs)
        self.body = nn.Sequential(_StashTanh(width), nn.Linear(width, width), nn.Linear(width, classes))


class TiedClassifier(Classifier):
    """The first layer's weight is also the head's (as a language model ties its embedding to its output): layers
    0 and 6 of 7, so the first and the last stage share it."""

    def __init__(self, width: int = 8, classes: int = 8, **kwargs):
        assert classes == width, "the head reuses the first layer's (width x width) weight"
        super().__init__(width=width, classes=classes, **kwargs)
        first, head = nn.Linear(width, width, bias=False), nn.Linear(width, width)
        head.weight = first.weight
        self.body = nn.Sequential(
            first, nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), head,
        )  # fmt: skip


class TiedGradNorm(TiedClassifier):
    """Logs lightning_gpipe's grad_norm of the tied model: the shared weight once, under its first name."""

    def on_before_optimizer_step(self, optimizer):
        from lightning_gpipe import grad_norm

        self.log_dict(grad_norm(self, norm_type=2))


class Configured(Classifier):
    """Builds its layers in ``configure_model``, as Lightning suggests for models too large for one device."""

    def layers(self):
        return None  # not yet: configure_model builds them

    def configure_model(self):
        if self.body is None:
            self.body = Classifier.layers(self)


# Models of other files with a loss that is a mean over samples, for 1F1B (its last stage's step runs once per
# micro-batch): skips, tied weights, deferred batch norm and deferred construction under 1F1B.
class MeanSkipClassifier(SkipClassifier):
    _loss = MeanLossClassifier._loss


class MeanTiedClassifier(TiedClassifier):
    _loss = MeanLossClassifier._loss


class MeanBatchNormConvNet(BatchNormConvNet):
    _loss = MeanLossClassifier._loss


class MeanConfigured(Configured):
    _loss = MeanLossClassifier._loss


class _AlternateWidth(nn.Module):
    """Keeps 5 features, then 4, then 5, ...: an output whose shape follows something other than its input's."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x[:, : 4 + self.calls % 2]


class _PadTo(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, self.width - x.shape[1]))


class ValueShaped(Classifier):
    """Its first stage's output (with balance [2, 2]) changes width from one micro-batch to the next."""

    def __init__(self, width: int = 8, classes: int = 3, **kwargs):
        super().__init__(width=width, classes=classes, **kwargs)
        self.body = nn.Sequential(nn.Linear(width, width), _AlternateWidth(), _PadTo(width), nn.Linear(width, classes))


class SlowAtFirst(nn.Linear):
    """A layer whose first ``slow`` calls take 30 ms longer: a layer measured while the machine was busy."""

    def __init__(self, slow: int) -> None:
        super().__init__(4, 4)
        self.calls, self.slow = 0, slow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.slow:
            time.sleep(0.03)
        return super().forward(x)
