"""Peak host memory of one rank training a model of a few hundred MB; started K times (or once) by the tests.

Usage: python tests/_memory_worker.py OUT_FILE K LAYERS WIDTH [save]
K=0 trains on one device with plain Lightning, the model built eagerly, as a user without a pipeline would.
``save``: after fit, save a checkpoint (sharded under the pipeline), which the peak then includes.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_gpipe import GPipeStrategy  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Big(L.LightningModule):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.layers, self.width = layers, width
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(*[nn.Linear(self.width, self.width) for _ in range(self.layers)])

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def main() -> None:
    out, k, layers, width = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    floor = peak_mib()  # torch, Lightning and this package imported: a bare process's memory
    L.seed_everything(0, verbose=False)
    data = DataLoader(TensorDataset(torch.randn(8, width)), batch_size=8)
    # Default settings: a model built in configure_model stays on its stages after the run (gather_model=None).
    save = sys.argv[5:] == ["save"]
    strategy = GPipeStrategy(microbatches=2, state_dict_type="sharded" if save else "full") if k else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=max(k, 1), strategy=strategy, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    started = Started()
    trainer.callbacks.append(started)
    start = time.perf_counter()
    trainer.fit(Big(layers, width), data)
    if save:
        trainer.save_checkpoint(out.with_suffix(".ckpt"))
    rank = int(os.environ.get("LOCAL_RANK", 0))
    result = {"floor": floor, "peak": peak_mib(), "setup_s": started.at - start, "before_training": started.peak}
    out.with_suffix(f".rank{rank}.json").write_text(json.dumps(result))


class Started(L.Callback):
    """When training starts: seconds since fit was called (connecting, building, materializing), and the peak."""

    def on_train_start(self, trainer, pl_module):
        self.at, self.peak = time.perf_counter(), peak_mib()


if __name__ == "__main__":
    main()
