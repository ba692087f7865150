"""A run's setup: checks, the whole LightningModule's Sequential cut into stages, this rank's engine, the patches."""

from __future__ import annotations

import logging
import warnings
from contextlib import ExitStack
from functools import partial
from typing import Any, Optional, Union

from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import _configure_optimizers
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.optim import Optimizer

from lightning_gpipe.checkpointing.sharded import stage_weights
from lightning_gpipe.checkpointing.state import optimizer_layouts, unwrapped
from lightning_gpipe.engine import posted
from lightning_gpipe.engine.batchnorm import defer, undefer
from lightning_gpipe.engine.broadcast import ObjectBroadcast
from lightning_gpipe.engine.chunks import RankChunks
from lightning_gpipe.engine.executor import StageExecutor
from lightning_gpipe.engine.p2p import MAX_SKIPS, StageLink
from lightning_gpipe.engine.pairs import PairedLink
from lightning_gpipe.engine.rng import StageRandom, rank_random_state, set_rank_random_state
from lightning_gpipe.engine.skip import skip_routes, stage_ports
from lightning_gpipe.errors import DeferredInitError, SkipError
from lightning_gpipe.integration.auto import AUTO, choose_microbatches
from lightning_gpipe.integration.backward import (
    clip_grad_by_global_norm,
    loss_backward,
    microbatch_backward,
    overridden,
)
from lightning_gpipe.integration.balancing import profiled_balance
from lightning_gpipe.integration.config import make_schedule
from lightning_gpipe.integration.contract import (
    frozen_summaries,
    parameters_refused_in_end_hooks,
    refuse_callbacks,
    refuse_closure_optimizers,
    stage_parameters,
)
from lightning_gpipe.integration.invariants import start_from_first_ranks_weights
from lightning_gpipe.integration.runtime import Kept, PipelineRun
from lightning_gpipe.integration.step import StageStep
from lightning_gpipe.model.assemble import fill_from_first
from lightning_gpipe.model.deferred import has_meta_tensors, storage_id
from lightning_gpipe.model.partition import (
    PROFILED_RULES,
    check_stages_have_parameters,
    check_stages_optimized,
    find_sequential,
    keep_stage,
    rank_layers,
    release_absent,
    resolve_balance,
    stage_layers,
    stage_view,
)
from lightning_gpipe.model.tied import TiedGradients, find_ties, tied_names
from lightning_gpipe.parallel.collectives import all_gather_object, together
from lightning_gpipe.parallel.replicas import GradientAverager
from lightning_gpipe.parallel.shard import GradientScatter, StageShards, check_elementwise
from lightning_gpipe.patching import patched
from lightning_gpipe.schedule.interleaved import check_interleaved

__all__ = ["open_run", "SUPPORTED_PRECISION"]

log = logging.getLogger(__name__)


#: Precision plugins every stage can apply on its own. ``16-mixed`` is not among them: its loss
#: scaler decides per rank whether to skip a step, and stages must never disagree on that.
SUPPORTED_PRECISION = ("32-true", "64-true", "bf16-mixed", "bf16-true", "16-true")


def open_run(strategy: Any, trainer: Trainer, kept: Kept) -> PipelineRun:
    """``setup`` of a run: the whole module cut into stages, this rank's built, the optimizers and patches made."""
    module = strategy.lightning_module
    topology, config = strategy.topology, strategy.config
    _check_supported(strategy, trainer, module)
    fitting = trainer.state.fn == TrainerFn.FITTING
    patches = ExitStack()
    run: Optional[PipelineRun] = None
    try:
        if strategy.world_size > 1:
            posted.settle()  # what an earlier run that failed left posted: its peers match it as they fail alike
            # Every rank draws the same shuffles and augmentations, seeded or not.
            set_rank_random_state(strategy.broadcast(rank_random_state(strategy.root_device)), strategy.root_device)
        name, seq = find_sequential(module, config.sequential)
        if strategy.world_size > 1:  # an earlier run may have left the module cut: start from the whole model
            fill_from_first(seq, strategy.global_rank, strategy.world_size, all_gather_object)
        if fitting:  # Lightning's summary, taken of the whole module (one rank runs the example input)
            patches.enter_context(frozen_summaries(trainer, module, example_input=strategy.is_global_zero))
        run = partition(strategy, kept, module, name, seq, fitting, patches)
        # Lightning's model summary would run forward on this rank's stage alone.
        patches.enter_context(patched(module, "_example_input_array", None))
        strategy.model = strategy.precision_plugin.convert_module(module)
        strategy.model_to_device()
        if run.tied:  # every copy of a tied parameter starts as the first stage's
            run.tied.synchronize()
        if fitting:  # a configure_optimizers that fails on one stage fails on all
            together(partial(strategy.setup_optimizers, trainer))
        strategy.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(strategy.optimizers, strategy.root_device)
        if fitting and config.shard != "none":
            run.shards = _shards(strategy, run)
            if not _gradients_read(strategy, trainer, module):  # each replica receives its share alone
                run.averager = GradientScatter(run.shards)
        _patch_lightning(strategy, trainer, run)
        if topology.k > 1:  # what batch-end and epoch-end hooks take over the parameters, rank 0 would log
            patches.enter_context(parameters_refused_in_end_hooks(module, seq))
    except BaseException:
        patches.close()
        if run is not None:
            undefer(run.deferred_norms)
        raise
    return run

def _patch_lightning(strategy: Any, trainer: Trainer, run: PipelineRun) -> None:
    patches = run.patches
    # Every stage logs the last stage's values, so Lightning's advice to sync them across ranks does not apply.
    patches.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.* when logging on epoch level", category=PossibleUserWarning)
    # Norm clipping must see the norm over all stages' gradients, not this stage's alone.
    clip = partial(clip_grad_by_global_norm, strategy.topology, run, strategy.root_device)
    patches.enter_context(patched(strategy.precision_plugin, "clip_grad_by_norm", clip))
    # Lightning's SIGTERM handler broadcasts from inside the handler, wherever the signal lands: in the middle of
    # the stages' own messages (a checkpoint's gather) that broadcast pairs with another rank's and every rank
    # waits forever. Noted only, the signal still ends the run at the batch's end, as Lightning's loops check it.
    connector = trainer._signal_connector
    patches.enter_context(patched(connector, "_sigterm_notifier_fn", partial(_note_sigterm, connector)))

def _check_supported(strategy: Any, trainer: Trainer, module: LightningModule) -> None:
    precision = strategy.precision_plugin
    supported = type(precision) in (Precision, DoublePrecision, HalfPrecision) or (
        type(precision) is MixedPrecision and precision.precision == "bf16-mixed"
    )
    if not supported:
        raise ValueError(
            f"GPipeStrategy supports precision {', '.join(SUPPORTED_PRECISION)}; got Trainer(precision="
            f"{trainer.precision!r}). 16-mixed scales the loss with a per-rank scaler, which could let stages skip"
            " different steps: use bf16-mixed."
        )
    if not module.automatic_optimization:
        raise ValueError(
            "GPipeStrategy runs the pipeline's backward inside Lightning's automatic optimization;"
            f" {type(module).__name__}.automatic_optimization is False. Manual optimization is not supported,"
            " and with it neither are several optimizers: use one optimizer with parameter groups."
        )
    if strategy._layer_sync is not None:
        raise ValueError(
            "Trainer(sync_batchnorm=True) is not supported by GPipeStrategy: use"
            " GPipeStrategy(deferred_batchnorm=True) for statistics of the whole mini-batch"
        )
    if strategy.topology.k > 1:
        refuse_callbacks(trainer.callbacks)

def _note_sigterm(connector: Any, signum: int, frame: Any) -> None:
    """Lightning's SIGTERM handler without its collective: forward the signal to the launched processes once, and
    note it for Lightning's loops, which end the run at the next batch boundary."""
    trainer = connector.trainer
    log.info("GPipeStrategy: rank %d received SIGTERM (%d); the run ends after this batch", trainer.global_rank, signum)
    if not connector.received_sigterm and trainer.strategy.launcher is not None:
        trainer.strategy.launcher.kill(signum)
    connector.received_sigterm = True


def partition(
    strategy: Any, kept: Kept, module: LightningModule, name: str, seq: nn.Sequential, fitting: bool, patches: ExitStack
) -> PipelineRun:
    """Cut the Sequential ``name`` of the whole ``module`` into stages, keep only this rank's layers, and build the
    run's objects for them (a :class:`~lightning_gpipe.integration.runtime.PipelineRun`)."""
    config, topology, device = strategy.config, strategy.topology, strategy.root_device
    k, stage, chunks = topology.k, topology.stage, config.chunks
    if chunks > 1 and k == 1:  # refused before anything is measured; the rest of the check once M is known
        _check_interleaved(k, config)
    optimizers: list[Optimizer] = []
    if fitting:  # a throwaway build on the whole module, before it is cut (each fit: requires_grad may change)
        optimizers = _whole_module_optimizers(module)
        if k > 1:
            refuse_closure_optimizers(optimizers)
        kept.optimizer_layouts = optimizer_layouts(optimizers, module)
    if config.microbatches == AUTO:  # the advisor's choice, on every rank: M (and a measured balance)
        choose_microbatches(strategy, kept, module, seq, fitting, optimizers)
        config = strategy.config
    schedule = make_schedule(config)
    if chunks > 1:
        _check_interleaved(k, config)
    if kept.balance is None and config.balance in PROFILED_RULES:
        kept.balance, kept.balance_report = profiled_balance(strategy, module, seq, fitting, optimizers)
    elif kept.balance is None:
        kept.balance = resolve_balance(config.balance, seq, k, chunks)
    else:
        resolve_balance(kept.balance, seq, k, chunks)  # the same checks against the module given now
    balance = kept.balance
    layers = list(seq._modules.values())
    routes = skip_routes(seq)  # checked on every rank alike, before anything is cut
    if len(routes) > MAX_SKIPS:
        raise SkipError(f"{name} has {len(routes)} skip connections; a pipeline carries at most {MAX_SKIPS}")
    if chunks > 1:
        _refuse_skips_between_chunks(routes, balance, name)
    kept.ties = find_ties(module, seq, balance, k)
    aliases = tied_names(kept.ties)
    if fitting:
        check_stages_have_parameters(balance, layers)
        optimized = {n for layout in kept.optimizer_layouts for group in layout for n in group}
        check_stages_optimized(balance, name, layers, optimized, aliases)
    _warn_batchnorm(config, layers)
    if strategy.world_size > 1:
        start_from_first_ranks_weights(module, layers, balance, topology, kept.deferred, all_gather_object)
    own = keep_stage(seq, balance, stage, k)
    # The other stages' layers stay, their storage freed, but for what the module still uses elsewhere.
    release_absent(seq, {storage_id(t) for t in (*stage_parameters(module), *module.buffers()) if not t.is_meta})
    _materialize(kept, module)
    if kept.weights is not None:  # this stage's tensors only, memory-mapped
        with stage_view():
            state = module.state_dict()
        module.load_state_dict(stage_weights(kept.weights, state))
        kept.weights = None
    parameters = {aliases.get(n, n): p for n, p in module.named_parameters(remove_duplicate=False)}
    norms = defer(own) if config.deferred_batchnorm else []  # before the executor, which finds them
    if kept.stage_random is None:  # one stream per stage for the strategy's life: runs continue it
        kept.stage_random = StageRandom(stage, device)
    executor: Union[StageExecutor, RankChunks]
    if chunks > 1:  # interleaved: chunk c runs stage c*K + stage of the model
        paired = PairedLink(stage, k, device, schedule, topology.pipeline_group, config.headers)
        parts = [[layers[i] for i in stage_layers(balance, c * k + stage)] for c in range(chunks)]
        executor = RankChunks(parts, stage, k, device, paired, schedule, kept.stage_random)
    else:
        link = StageLink(stage, k, device, topology.pipeline_group, config.headers) if k > 1 else None
        executor = StageExecutor(
            own, stage, k, device, link, config.checkpoint, kept.stage_random, schedule,
            skips=stage_ports(routes, balance, stage),
        )  # fmt: skip
    sharing = ObjectBroadcast(device, topology.pipeline_group) if k > 1 else None
    flow = StageStep(
        executor, config.microbatches, name, device, sharing, partial(loss_backward, strategy), topology.rank_of(k - 1),
        partial(microbatch_backward, strategy),
    )  # fmt: skip
    run = PipelineRun(module, name, executor, flow, patches, deferred_norms=norms)
    if topology.d > 1:
        run.averager = GradientAverager(topology.replica_group, topology.d, executor.timeline)
    run.tied = TiedGradients(kept.ties, topology, parameters, kept.tie_groups) if kept.ties else None
    log.debug("stage %d of %d runs %s.%s", stage, k, name, rank_layers(balance, stage, k))
    replicas = f"{topology.d} replicas of " if topology.d > 1 else ""
    virtual = f", virtual_stages={chunks}" if chunks > 1 else ""
    rank_zero_info(
        f"GPipeStrategy: {replicas}{k} stages of {name!r} with balance {balance},"
        f" microbatches={config.microbatches}, checkpoint={config.checkpoint!r}, schedule={config.schedule!r}{virtual}"
    )
    if kept.balance_report is not None and strategy.is_global_zero:
        kept.balance_report.publish(module.trainer)
    return run


def _shards(strategy: Any, run: PipelineRun) -> StageShards:
    """``shard="optimizer"`` or ``"full"``: the stage's optimizer state (and parameters) split over its replicas."""
    config, topology = strategy.config, strategy.topology
    if run.tied is not None:
        raise ValueError(
            f"GPipeStrategy(shard={config.shard!r}) does not split parameters tied across stages, and this model ties"
            f" {', '.join(strategy.tied_names)}: use shard='none'"
        )
    optimizer = unwrapped(strategy.optimizers[0])
    check_elementwise(optimizer, config.shard)
    full = config.shard == "full"
    group, timeline = topology.replica_group, run.executor.timeline
    return StageShards(optimizer, run.module, group, topology.d, topology.replica, full, timeline)


def _gradients_read(strategy: Any, trainer: Trainer, module: LightningModule) -> bool:
    """Whether user code may read the whole averaged gradients before the optimizer step (so that the replicas
    all-reduce them, rather than each receiving its share by reduce-scatter): the module's or a callback's
    on_after_backward or on_before_optimizer_step, a module's configure_gradient_clipping, clipping by value."""
    hooks = ("on_after_backward", "on_before_optimizer_step")
    readers = overridden(trainer, module, hooks, module_only=("configure_gradient_clipping",))
    if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "value":
        readers.append("gradient_clip_algorithm='value'")
    if readers:
        rank_zero_info(
            f"GPipeStrategy(shard={strategy.config.shard!r}): the replicas average each stage's gradients whole"
            f" (all-reduce), since {', '.join(readers)} may read them; without such code each replica receives its"
            " share alone (reduce-scatter)"
        )
    return bool(readers)


def _check_interleaved(k: int, config: Any) -> None:
    if k == 1:
        raise ValueError(
            "GPipeStrategy(schedule='interleaved') spreads the model's chunks over at least 2 stages; this run has 1"
            " (devices x nodes / data_parallel_size): on one stage, train with schedule='1f1b'"
        )
    try:
        check_interleaved(k, config.microbatches, config.chunks)
    except ValueError as error:
        raise ValueError(f"GPipeStrategy(schedule='interleaved'): {error}") from None


def _refuse_skips_between_chunks(routes: list, balance: list[int], name: str) -> None:
    """Skips that cross stages travel by their own messages, which an interleaved rank does not carry."""
    crossing = [s for s in range(len(balance)) if any(stage_ports(routes, balance, s))]
    if crossing:
        raise SkipError(
            f"GPipeStrategy(schedule='interleaved') does not carry skip connections between stages, and {name} with"
            f" balance {balance} has some that leave or reach stages {crossing}: use schedule='1f1b' (or 'gpipe'),"
            " or a balance that keeps each skip within one stage"
        )


def _warn_batchnorm(config: Any, layers: list[nn.Module]) -> None:
    if not config.deferred_batchnorm and config.microbatches > 1 and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for layer in layers for m in layer.modules()
    ):
        rank_zero_warn(
            "GPipeStrategy: batch normalization normalizes each micro-batch by its own statistics and updates its"
            f" running statistics once per micro-batch (microbatches={config.microbatches}), so they differ from"
            " single-device training; GPipeStrategy(deferred_batchnorm=True) updates them once per mini-batch,"
            " from the whole mini-batch"
        )


def _materialize(kept: Kept, module: LightningModule) -> None:
    """A module built by ``tensor_init_context``: this stage's layers get storage, now."""
    if not has_meta_tensors(module):
        return
    kept.built_deferred = True
    if kept.deferred is None:
        raise DeferredInitError(
            f"{type(module).__name__} has parameters on the meta device that this GPipeStrategy did not see"
            " built; build the model in configure_model, or under trainer.init_module() of this Trainer"
        )
    kept.deferred.materialize([module])
    kept.deferred = None  # what it recorded of the other stages goes too


def _whole_module_optimizers(module: LightningModule) -> list[Optimizer]:
    """The optimizers ``configure_optimizers`` builds on the whole module; exactly one is supported."""
    optimizers = _configure_optimizers(module.configure_optimizers())[0]
    if len(optimizers) != 1:
        raise ValueError(
            f"GPipeStrategy trains with one optimizer; {type(module).__name__}.configure_optimizers returned"
            f" {len(optimizers)}. Several optimizers need Lightning's manual optimization, which the pipeline cannot"
            " run (its backward runs inside automatic optimization): use one optimizer with parameter groups."
        )
    return optimizers
