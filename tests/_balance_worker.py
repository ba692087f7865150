"""Trains the transformer experiment under each balance rule on one rank; started K times by the tests.

Usage: python tests/_balance_worker.py OUT_DIR RULE... -- OVERRIDE...
Every observed step's scalars and the chosen balance are saved per rule, to compare measured stage times.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS), str(TESTS.parent)]
torch.set_num_threads(1)

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from _model import RecordingLogger  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import experiments  # noqa: E402, F401  (registers the configs' resolvers)


def fit(overrides: list[str], out: Path) -> dict:
    with initialize_config_dir(config_dir=str(TESTS.parent / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    L.seed_everything(cfg.seed, verbose=False)
    strategy = hydra.utils.instantiate(cfg.strategy)
    logger = RecordingLogger()
    trainer = hydra.utils.instantiate(
        cfg.trainer, strategy=strategy, logger=logger, default_root_dir=out, limit_val_batches=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(hydra.utils.instantiate(cfg.model), datamodule=hydra.utils.instantiate(cfg.data))
    return {"balance": strategy.balance, "logged": logger.records}


if __name__ == "__main__":
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    rules, overrides = rest[: rest.index("--")], rest[rest.index("--") + 1 :]
    results = {rule: fit([*overrides, f"balance={rule}"], out) for rule in rules}
    torch.save(results, out / f"rank{os.environ.get('LOCAL_RANK', 0)}.pt")
