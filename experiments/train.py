"""Train a model from the Hydra configs in ``conf/``: ``python experiments/train.py k=4 m=8``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, ListConfig, read_write

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `experiments.*` targets import

from experiments.processes import RENDEZVOUS  # noqa: E402
from lightning_gpipe import GPipeStrategy  # noqa: E402
from lightning_gpipe.model.partition import BALANCE_RULES, BalanceError, find_sequential, resolve_balance  # noqa: E402


class ConfigError(ValueError):
    """A configuration that cannot run, reported without a traceback."""


def train(cfg: DictConfig) -> dict[str, float]:
    """Build data, model, strategy and trainer from ``cfg``, fit, and return the final metrics."""
    _check(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.accelerator == "cpu":
        # k x dp processes share this machine's cores: give each its share instead of letting them fight.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // (cfg.k * cfg.dp)))
    datamodule = hydra.utils.instantiate(cfg.data)
    strategy = hydra.utils.instantiate(cfg.strategy) if isinstance(cfg.strategy, DictConfig) else cfg.strategy
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, strategy=strategy, logger=logger, callbacks=callbacks)
    model = build_model(cfg, trainer)
    _check_model(cfg, model, datamodule)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    if logger:
        # The HParams view pairs the run's settings with its final metrics.
        final = {f"hp/{key}": value for key, value in metrics.items() if key.startswith("val/")}
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams(cfg), final)
        else:
            logger.log_hyperparams(hparams(cfg))
        if trainer.is_global_zero:
            print(f"Logs: {logger.log_dir}\nView them with: tensorboard --logdir {Path(logger.log_dir).parent}")
    return metrics


def build_model(cfg: DictConfig, trainer: L.Trainer) -> L.LightningModule:
    """The model of ``cfg.model``. Under GPipeStrategy it is built on the meta device (``trainer.init_module()``)
    and each rank later materializes only its own stage, with the values building it here would have given."""
    if isinstance(trainer.strategy, GPipeStrategy):
        with trainer.init_module():
            return hydra.utils.instantiate(cfg.model)
    return hydra.utils.instantiate(cfg.model)


def hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run's settings as TensorBoard's HParams view shows them."""
    return {
        "k": cfg.k, "dp": cfg.dp, "shard": cfg.shard, "m": cfg.m, "checkpoint": cfg.checkpoint, "schedule": cfg.schedule,
        "balance": str(cfg.balance), "seed": cfg.seed,
        "model": cfg.model._target_.rsplit(".", 1)[-1], "data": cfg.data._target_.rsplit(".", 1)[-1],
        "strategy": cfg.strategy if isinstance(cfg.strategy, str) else cfg.strategy._target_.rsplit(".", 1)[-1],
    }  # fmt: skip


def _check(cfg: DictConfig) -> None:
    """What the config alone shows to be wrong, before anything is built."""
    for key in ("k", "m", "dp"):
        if key == "m" and cfg.m == "auto":
            continue
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]!r}: need a whole number of at least 1" + (", or auto" if key == "m" else ""))
    balance = cfg.strategy.get("balance") if isinstance(cfg.strategy, DictConfig) else None
    if isinstance(balance, str) and balance not in BALANCE_RULES:
        raise ConfigError(f"balance={balance}: choose one of {', '.join(BALANCE_RULES)} or a list of layer counts")


def _check_model(cfg: DictConfig, model: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    reads, yields = getattr(model, "input_kind", None), getattr(datamodule, "kind", None)
    if reads != yields:
        raise ConfigError(
            f"model {type(model).__name__} reads {reads} inputs, but data {type(datamodule).__name__} yields {yields}"
            " inputs; pick a matching pair (see conf/experiment/ for presets)"
        )
    predicts, targets = getattr(model, "target_kind", "label"), getattr(datamodule, "target_kind", "label")
    if predicts != targets:
        raise ConfigError(
            f"model {type(model).__name__} predicts {predicts} targets, but data {type(datamodule).__name__} yields"
            f" {targets} targets; pick a matching pair (see conf/experiment/ for presets)"
        )
    _, seq = find_sequential(model)
    if not (isinstance(cfg.strategy, DictConfig) and cfg.strategy._target_.endswith("GPipeStrategy")):
        return
    if cfg.k > len(seq):
        raise ConfigError(
            f"k={cfg.k} stages, but {type(model).__name__}'s Sequential has {len(seq)} layers:"
            " lower k or make the model deeper"
        )
    balance = cfg.strategy.get("balance")
    if isinstance(balance, ListConfig):  # interleaved: K x virtual_stages stages (2 chunks per rank by default)
        virtual = cfg.strategy.get("virtual_stages")
        chunks = (2 if virtual is None else virtual) if cfg.strategy.get("schedule") == "interleaved" else 1
        try:
            resolve_balance(list(balance), seq, cfg.k, chunks)
        except BalanceError as error:
            raise ConfigError(f"balance={list(balance)}: {error}") from None


def _children_run_this_job_only() -> None:
    """Under ``-m``, make Lightning's launcher start each job's other ranks as a single run of this job.

    Lightning re-runs ``sys.argv`` in every other rank; with ``-m`` there they would each start the whole sweep.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    config = HydraConfig.get()
    if config.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *config.overrides.task]
    with read_write(config.run):
        config.run.dir = config.runtime.output_dir  # Lightning passes this to the ranks as hydra.run.dir


def _forget_process_group() -> None:
    """Close this job's process group so the next job of a sweep starts its own ranks afresh."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in RENDEZVOUS:
        os.environ.pop(key, None)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    _children_run_this_job_only()
    try:
        train(cfg)
    except ConfigError as error:
        sys.exit(f"train.py: {error}")
    finally:
        _forget_process_group()


if __name__ == "__main__":
    main()
