"""GPipe pipeline parallelism for PyTorch Lightning."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_gpipe.advisor.choose import AdvisorError
from lightning_gpipe.errors import (
    AbsentLayerError,
    BalanceError,
    BufferReplayError,
    DataMismatchError,
    DeferredInitError,
    SkipError,
    StageError,
)
from lightning_gpipe.integration.contract import grad_norm
from lightning_gpipe.integration.strategy import GPipeStrategy
from lightning_gpipe.model.porting import from_torchgpipe
from lightning_gpipe.schedule import (
    Action,
    GPipe,
    Interleaved1F1B,
    OneFOneB,
    Phase,
    Schedule,
    fthenb,
    interleaved_one_f_one_b,
    one_f_one_b,
    optimal_split,
)

__all__ = [
    "GPipeStrategy",
    "grad_norm",
    "BalanceError",
    "StageError",
    "AdvisorError",
    "AbsentLayerError",
    "BufferReplayError",
    "DataMismatchError",
    "DeferredInitError",
    "SkipError",
    "Action",
    "Phase",
    "Schedule",
    "GPipe",
    "OneFOneB",
    "one_f_one_b",
    "Interleaved1F1B",
    "interleaved_one_f_one_b",
    "fthenb",
    "optimal_split",
    "from_torchgpipe",
]

GPipeStrategy.register_strategies(StrategyRegistry)
