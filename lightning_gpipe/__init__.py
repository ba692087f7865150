"""GPipe pipeline parallelism for PyTorch Lightning."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_gpipe.balance import optimal_split
from lightning_gpipe.partition import BalanceError
from lightning_gpipe.schedule import Action, Phase, fthenb
from lightning_gpipe.strategy import GPipeStrategy

__all__ = ["GPipeStrategy", "BalanceError", "Action", "Phase", "fthenb", "optimal_split"]

GPipeStrategy.register_strategies(StrategyRegistry)
