"""The strategy's state by lifetime: what outlives a run (:class:`Kept`), and one run's objects (:class:`PipelineRun`),
opened in ``setup`` (:func:`~lightning_gpipe.integration.build.open_run`) and closed in ``teardown``."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_gpipe.advisor.choose import Advice
from lightning_gpipe.checkpointing.state import Layout
from lightning_gpipe.engine.batchnorm import undefer
from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.engine.rng import StageRandom
from lightning_gpipe.integration.backward import BackwardPlan
from lightning_gpipe.integration.config import GPipeConfig
from lightning_gpipe.integration.contract import LastStageSaved
from lightning_gpipe.integration.report import BalanceReport, Reporter
from lightning_gpipe.integration.step import StageStep
from lightning_gpipe.model.assemble import gather_layers
from lightning_gpipe.model.deferred import DeferredInit
from lightning_gpipe.model.partition import AbsentLayer
from lightning_gpipe.model.tied import Tie, TiedGradients
from lightning_gpipe.parallel.replicas import ReplicaAverage
from lightning_gpipe.parallel.shard import StageShards
from lightning_gpipe.parallel.topology import Topology

__all__ = ["Kept", "PipelineRun", "gathers", "note_lost_connection"]

log = logging.getLogger(__name__)


@dataclass
class Kept:
    """What the strategy keeps from one run to the next."""

    weights: Any = None  # GPipeStrategy(weights=...): read once, by the first run
    balance: Optional[list[int]] = None  # layers per stage, once resolved
    balance_report: Optional[BalanceReport] = None  # a measured balance's choice
    advice: Optional[Advice] = None  # microbatches="auto": every candidate predicted, and the choice
    stage_random: Optional[StageRandom] = None  # the stage's dropout stream: runs continue it
    ties: list[Tie] = field(default_factory=list)  # parameters that layers on different stages share
    tie_groups: dict[tuple[int, ...], Any] = field(default_factory=dict)  # process groups of tied stages
    deferred: Optional[DeferredInit] = None  # how the model was built, when built on the meta device
    built_deferred: bool = False  # which decides gather_model=None
    optimizer_layouts: list[Layout] = field(default_factory=list)  # how one device numbers the optimizer's parameters
    saved: LastStageSaved = field(default_factory=LastStageSaved)  # what on_save_checkpoint set, for rank 0's file
    reporter: Reporter = field(default_factory=Reporter)
    observed_step: int = -1


@dataclass
class PipelineRun:
    """One run's (``fit``, ``validate``, ...) objects on this rank, from ``setup`` to ``teardown``."""

    module: LightningModule
    sequential: str  # the pipelined Sequential's attribute name
    executor: StageExecutor
    flow: StageStep
    patches: ExitStack  # every patch made for the run, undone when it ends
    averager: Optional[ReplicaAverage] = None  # with several replicas (GradientScatter with shards)
    tied: Optional[TiedGradients] = None  # this stage's tied parameters, and their groups
    shards: Optional[StageShards] = None  # shard='optimizer' or 'full': the replicas' split of the training state
    deferred_norms: list[nn.Module] = field(default_factory=list)  # deferred batch norms, during the run
    plan: BackwardPlan = BackwardPlan.LATE  # where the stages run this training step's backward
    stepping: bool = True  # whether this training batch ends an accumulation window
    observing: bool = False  # whether this step is timed and metered
    failed: bool = False  # the run raised: no collective may wait on other ranks any more
    restored: Optional[dict[str, Any]] = None  # what a resumed checkpoint says about the saving pipeline

    def close(self) -> None:
        """End the run: wait for what this stage still sends, undo the patches and the deferred batch norms."""
        if not self.failed:
            self.flow.wait()
            if self.shards is not None:  # the stage whole again, for what follows the run
                self.shards.close()
        elif self.shards is not None:  # no collective after a failure: what this replica holds
            self.shards.abandon()
        self.patches.close()
        undefer(self.deferred_norms)  # the user's own batch-norm layers again
        self.deferred_norms = []

    def optimizer_stepping(self) -> AbstractContextManager[None]:
        """A block around Lightning's optimizer step: with shards, the optimizer steps this replica's share."""
        return nullcontext() if self.shards is None else self.shards.stepping()

    def release_layers(self, topology: Topology, kept: Kept, config: GPipeConfig) -> None:
        """After the module moved to the CPU: the whole model onto global rank 0 (``gather_model``); elsewhere,
        the layers this rank does not hold fail loudly when asked for."""
        if topology.k == 1:
            return
        seq = self.module.get_submodule(self.sequential)
        if gathers(config, kept) and not self.failed and topology.replica == 0:
            prefix = f"{self.sequential}."
            tied = [[n.removeprefix(prefix) for n in tie.names if n.startswith(prefix)] for tie in kept.ties]
            gather_layers(seq, topology.stage, topology.k, topology.pipeline_ranks, tied)  # tied copies: one
        for layer in seq:
            if isinstance(layer, AbsentLayer):
                layer.after_run = True


def gathers(config: Any, kept: Kept) -> bool:
    """Whether a run ends with the whole model on global rank 0 (``gather_model``)."""
    if config.gather_model is not None:
        return config.gather_model
    if kept.built_deferred:
        rank_zero_info(
            "GPipeStrategy: the model was built deferred (configure_model or trainer.init_module()), so its stages"
            " stay on their ranks after the run (gather_model=None): global rank 0 may not fit the whole model."
            " Save a checkpoint (state_dict_type='sharded' never gathers it), or pass gather_model=True."
        )
    return not kept.built_deferred




def note_lost_connection(exception: BaseException, world_size: int, topology: Optional[Topology], rank: int) -> None:
    """Say which stage lost its connection: most likely another stage failed first, and its error is the cause."""
    message = str(exception)
    if world_size == 1 or ("Connection closed by peer" not in message and "Connection reset by peer" not in message):
        return
    place = f"stage {rank}"
    if topology is not None:
        place = f"stage {topology.stage}" + (f" of replica {topology.replica}" if topology.d > 1 else "")
    log.error(
        "GPipeStrategy: %s lost the connection to another stage, which most likely failed first;"
        " look for that stage's error above.",
        place,
    )
