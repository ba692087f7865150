"""Train a model with GPipeStrategy from the Hydra configs in ``conf/``: ``python experiments/train.py k=4 m=8``."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `experiments.*` targets import


def train(cfg: DictConfig) -> dict[str, float]:
    """Build data, model, strategy and trainer from ``cfg``, fit, and return the final metrics."""
    L.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.accelerator == "cpu":
        # K processes share this machine's cores; Lightning's own default would oversubscribe them.
        torch.set_num_threads(max(1, _cpu_count() // cfg.k))
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.get("callbacks", {}).values()]
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, strategy=hydra.utils.instantiate(cfg.strategy), logger=logger, callbacks=callbacks
    )
    if logger:
        logger.log_hyperparams(_hparams(cfg))
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if trainer.is_global_zero and logger:
        print(f"Logs: {logger.log_dir}\nView them with: tensorboard --logdir {Path(logger.log_dir).parent}")
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _hparams(cfg: DictConfig) -> dict:
    return {
        "k": cfg.k, "m": cfg.m, "checkpoint": cfg.checkpoint, "balance": str(cfg.balance), "seed": cfg.seed,
        "model": cfg.model._target_.rsplit(".", 1)[-1], "data": cfg.data._target_.rsplit(".", 1)[-1],
    }  # fmt: skip


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
