"""GPipe pipeline parallelism for PyTorch Lightning."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_gpipe.balance import optimal_split
from lightning_gpipe.contract import grad_norm
from lightning_gpipe.errors import (
    AbsentLayerError,
    BalanceError,
    BufferReplayError,
    DataMismatchError,
    DeferredInitError,
    SkipError,
    StageError,
)
from lightning_gpipe.porting import from_torchgpipe
from lightning_gpipe.schedule import Action, Phase, fthenb
from lightning_gpipe.strategy import GPipeStrategy

__all__ = [
    "GPipeStrategy",
    "grad_norm",
    "BalanceError",
    "StageError",
    "AbsentLayerError",
    "BufferReplayError",
    "DataMismatchError",
    "DeferredInitError",
    "SkipError",
    "Action",
    "Phase",
    "fthenb",
    "optimal_split",
    "from_torchgpipe",
]

GPipeStrategy.register_strategies(StrategyRegistry)
