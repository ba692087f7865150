"""One training step of experiment configs on one rank; started K times by the tests.

Usage: python tests/_experiment_worker.py RUNS_JSON, a list of {"out": file, "overrides": [...]}, run in turn in
one launch (each composed, seeded and trained afresh).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import experiments  # noqa: E402, F401  (registers the configs' resolvers)
from experiments.train import build_model  # noqa: E402


def one_step(overrides: list[str]) -> dict[str, torch.Tensor] | None:
    """Parameters after one optimizer step of the composed experiment (no logger, no validation), as global rank 0's
    module holds them after the run: the whole model. ``None`` on the other ranks."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if isinstance(cfg.strategy, DictConfig) and "gather_model" in cfg.strategy:  # built deferred, the model stays on
        # its stages after the run unless asked: this test reads it whole on global rank 0
        cfg.strategy.gather_model = True
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    strategy = hydra.utils.instantiate(cfg.strategy) if not isinstance(cfg.strategy, str) else cfg.strategy
    trainer = hydra.utils.instantiate(
        cfg.trainer, strategy=strategy, logger=False, max_steps=1, limit_val_batches=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = build_model(cfg, trainer)  # as train.py builds it: on the meta device under GPipeStrategy
    trainer.fit(model, datamodule=datamodule)
    if not trainer.is_global_zero:
        return None
    return {name: value.clone() for name, value in model.state_dict().items()}


if __name__ == "__main__":
    for run in json.loads(Path(sys.argv[1]).read_text()):
        state = one_step(run["overrides"])
        if state is not None:
            torch.save(state, run["out"])
