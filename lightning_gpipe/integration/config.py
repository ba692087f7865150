"""The strategy's options, checked once: one frozen object that mirrors ``conf/strategy/gpipe.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Union

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

from lightning_gpipe.advisor.choose import parse_budget
from lightning_gpipe.engine.p2p import HEADERS, MAX_CHUNKS
from lightning_gpipe.errors import BalanceError
from lightning_gpipe.model.partition import BALANCE_RULES, Balance
from lightning_gpipe.parallel.shard import SHARD_MODES
from lightning_gpipe.parallel.topology import check_replicas
from lightning_gpipe.schedule import CHECKPOINT_MODES, SCHEDULES, Interleaved1F1B, Schedule

__all__ = ["GPipeConfig", "STATE_DICT_TYPES", "make_schedule"]

STATE_DICT_TYPES = ("full", "sharded")


@dataclass(frozen=True)
class GPipeConfig:
    """What ``GPipeStrategy(...)`` was asked for; see :class:`~lightning_gpipe.GPipeStrategy` for each option."""

    microbatches: Union[int, str] = 4  # or "auto"
    schedule: str = "gpipe"
    balance: Balance = "uniform"
    checkpoint: str = "except_last"
    sequential: Optional[str] = None
    process_group_backend: Optional[str] = None
    timeout: Optional[timedelta] = default_pg_timeout
    observe_every_n_steps: int = 0
    state_dict_type: str = "full"
    deferred_batchnorm: bool = False
    gather_model: Optional[bool] = None
    data_parallel_size: int = 1
    weights: Optional[Union[str, Path]] = None
    headers: str = "auto"
    virtual_stages: Optional[int] = None
    memory_budget: Union[int, float, str, None] = None
    shard: str = "none"

    def __post_init__(self) -> None:
        if self.microbatches != "auto" and (not _whole(self.microbatches) or self.microbatches < 1):
            raise ValueError(
                f"GPipeStrategy(microbatches={self.microbatches!r}): need an integer of at least 1, or 'auto'"
            )
        if self.memory_budget is not None:
            if self.microbatches != "auto":
                raise ValueError(
                    f"GPipeStrategy(memory_budget={self.memory_budget!r}) bounds what microbatches='auto' chooses;"
                    f" this one has microbatches={self.microbatches!r}"
                )
            try:
                parse_budget(self.memory_budget)
            except ValueError as error:
                raise ValueError(f"GPipeStrategy: {error}") from None
        if self.schedule not in SCHEDULES:
            raise ValueError(f"GPipeStrategy(schedule={self.schedule!r}): choose one of {', '.join(SCHEDULES)}")
        if self.virtual_stages is not None and self.schedule != "interleaved":
            raise ValueError(
                f"GPipeStrategy(virtual_stages={self.virtual_stages!r}) gives each rank several model chunks, which"
                f" only schedule='interleaved' runs; this one is schedule={self.schedule!r}"
            )
        if self.schedule == "interleaved" and not (_whole(self.chunks) and 1 <= self.chunks <= MAX_CHUNKS):
            raise ValueError(
                f"GPipeStrategy(virtual_stages={self.virtual_stages!r}): need an integer from 1 to {MAX_CHUNKS}"
            )
        if self.checkpoint not in CHECKPOINT_MODES:
            raise ValueError(
                f"GPipeStrategy(checkpoint={self.checkpoint!r}): choose one of {', '.join(CHECKPOINT_MODES)}"
            )
        if isinstance(self.balance, str) and self.balance not in BALANCE_RULES:
            raise BalanceError(
                f"GPipeStrategy(balance={self.balance!r}): choose one of {', '.join(BALANCE_RULES)} or a list of"
                " layer counts"
            )
        if not isinstance(self.balance, str):  # a list, kept as a tuple: the config cannot change
            object.__setattr__(self, "balance", tuple(self.balance))
        if not _whole(self.observe_every_n_steps) or self.observe_every_n_steps < 0:
            raise ValueError(
                f"GPipeStrategy(observe_every_n_steps={self.observe_every_n_steps!r}): need a whole number, 0 to turn"
                " it off"
            )
        if self.state_dict_type not in STATE_DICT_TYPES:
            raise ValueError(
                f"GPipeStrategy(state_dict_type={self.state_dict_type!r}): choose one of {', '.join(STATE_DICT_TYPES)}"
            )
        if self.headers not in HEADERS:
            raise ValueError(f"GPipeStrategy(headers={self.headers!r}): choose one of {', '.join(HEADERS)}")
        check_replicas(self.data_parallel_size)
        if self.shard not in SHARD_MODES:
            raise ValueError(f"GPipeStrategy(shard={self.shard!r}): choose one of {', '.join(SHARD_MODES)}")
        if self.shard != "none" and self.data_parallel_size == 1:
            raise ValueError(
                f"GPipeStrategy(shard={self.shard!r}) splits each stage's training state over its data-parallel"
                " replicas; this one has data_parallel_size=1: give it at least 2 replicas, or shard='none'"
            )
        if self.gather_model not in (None, True, False):
            raise ValueError(
                f"GPipeStrategy(gather_model={self.gather_model!r}): True, False, or None (gather a model built whole)"
            )

    @property
    def chunks(self) -> int:
        """Model chunks per rank: ``virtual_stages`` under ``schedule="interleaved"`` (2 by default), else 1."""
        if self.schedule != "interleaved":
            return 1
        return 2 if self.virtual_stages is None else self.virtual_stages


def make_schedule(config: GPipeConfig) -> Schedule:
    """The schedule ``config`` names, with its re-materialization mode (and chunks per rank)."""
    if config.schedule == "interleaved":
        return Interleaved1F1B(config.checkpoint, config.chunks)
    return SCHEDULES[config.schedule](config.checkpoint)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
