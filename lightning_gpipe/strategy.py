"""The Lightning strategy: GPipe pipeline parallelism for an unmodified LightningModule."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, TorchCheckpointIO
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    ReduceOp,
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.core.optimizer import _configure_optimizers
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gpipe.assemble import fill_from_first, gather_layers
from lightning_gpipe.batchnorm import defer, undefer
from lightning_gpipe.comm import MAX_SKIPS, ObjectBroadcast, StageLink
from lightning_gpipe.contract import (
    ClosureOnce,
    LastStageSaved,
    frozen_summaries,
    parameters_refused,
    parameters_refused_in_end_hooks,
    refuse_callbacks,
    refuse_closure_optimizers,
    seed_workers_alike,
    stage_parameters,
)
from lightning_gpipe.deferred import DeferredInit, DeferredInitError, has_meta_tensors, storage_id
from lightning_gpipe.executor import StageExecutor
from lightning_gpipe.invariants import check_same_batch, start_from_first_ranks_weights
from lightning_gpipe.logs import patched
from lightning_gpipe.memory import host_peak_bytes, optimizer_state_bytes, tensor_bytes
from lightning_gpipe.microbatch import split
from lightning_gpipe.observe import BalanceReport, Reporter, StageReport
from lightning_gpipe.partition import (
    BALANCE_RULES,
    PROFILED_RULES,
    AbsentLayer,
    Balance,
    BalanceError,
    check_stages_have_parameters,
    check_stages_optimized,
    find_sequential,
    keep_stage,
    release_absent,
    resolve_balance,
    stage_layers,
    stage_view,
)
from lightning_gpipe.profile import input_of_step, optimizer_slots, profile_layers, untouched_random
from lightning_gpipe.rng import StageRandom, rank_random_state, set_rank_random_state
from lightning_gpipe.schedule import CHECKPOINT_MODES
from lightning_gpipe.sharded import is_sharded, load_sharded, save_sharded, stage_weights
from lightning_gpipe.state import (
    Layout,
    gather_to_first,
    merge_optimizer_states,
    optimizer_layouts,
    optimizer_state_by_name,
    optimizer_state_for,
    parameter_names,
    unwrapped,
)
from lightning_gpipe.replicas import GradientAverager
from lightning_gpipe.skip import SkipError, skip_routes, stage_ports
from lightning_gpipe.step import BackwardPlan, Failure, StageStep
from lightning_gpipe.tied import Tie, TiedGradients, find_ties, tied_names
from lightning_gpipe.topology import Topology, check_layout, check_replicas

__all__ = ["GPipeStrategy"]

log = logging.getLogger(__name__)

#: Precision plugins every stage can apply on its own. ``16-mixed`` is not among them: its loss
#: scaler decides per rank whether to skip a step, and stages must never disagree on that.
_SUPPORTED_PRECISION = ("32-true", "64-true", "bf16-mixed", "bf16-true", "16-true")
STATE_DICT_TYPES = ("full", "sharded")


class GPipeStrategy(ParallelStrategy):
    """GPipe pipeline parallelism: K stages on K processes, M micro-batches, F-then-B, re-materialization.

    The LightningModule's ``nn.Sequential`` is cut into one stage per process (``devices x num_nodes``).
    Every batch is split into ``microbatches`` along dim 0; each stage runs the forward of all of them,
    the last stage computes the user's loss on the whole batch, then each stage runs their backward in
    reverse. Gradients, parameters and logged metrics equal those of single-device training.

    Example::

        trainer = L.Trainer(accelerator="gpu", devices=4,
                            strategy=GPipeStrategy(microbatches=8, balance="uniform", checkpoint="except_last"))

    Args:
        microbatches: M, the number of micro-batches per batch (a smaller batch gives fewer).
        balance: layers per stage as a list, or a rule: ``"uniform"`` (by layer count), ``"params"`` (by parameter
            count), ``"time"`` (by each layer's measured forward plus backward time) or ``"memory"`` (by each layer's
            measured weights, gradients, optimizer state and saved activations). Measured rules profile on a
            sample micro-batch (``example_input_array`` or the first training batch) and report their choice.
        checkpoint: re-materialization: ``"always"``, ``"except_last"`` (all but the last micro-batch) or ``"never"``.
        sequential: attribute name of the ``nn.Sequential`` to pipeline; found automatically when the module
            has exactly one Sequential child holding all its parameters.
        process_group_backend: ``torch.distributed`` backend; gloo on CPU and NCCL on GPU by default.
        timeout: how long a rank waits on a collective before giving up.
        observe_every_n_steps: every this many optimizer steps, time each stage's work and measure its memory,
            and log the bubble, compute, waits and memory, the schedule picture and a Chrome trace; 0 turns it off.
        state_dict_type: ``"full"`` saves one ordinary Lightning checkpoint file, gathered on global rank 0;
            ``"sharded"`` saves a folder in which every stage writes its own tensors (see
            :mod:`lightning_gpipe.sharded`). Either kind resumes with any K, M and balance.
        deferred_batchnorm: batch-norm layers normalize each micro-batch by its own statistics, but update their
            running statistics (and ``num_batches_tracked``) once per mini-batch, from the whole mini-batch, as
            single-device training does; without it they update once per micro-batch.
        gather_model: when a run (``fit``, ``validate``, ...) ends, move every stage's tensors to global rank 0,
            so that the module there is the whole trained model, as after single-device training. That needs the
            whole model's host memory on global rank 0; with ``False`` every rank keeps only its stage, and the
            module cannot be used in another run. By default (``None``) it gathers a model built whole (global
            rank 0 held it all before the run anyway) and not one built deferred (``configure_model``,
            ``trainer.init_module()``), which may not fit one host.
        data_parallel_size: D, the replicas of the pipeline; K = (devices x num_nodes) / D.
        weights: start the first run from these weights (fine-tuning): a Lightning checkpoint, a sharded
            checkpoint folder or a ``torch.save``'d state dict, a file you trust. Each rank reads only its own
            stage's tensors (memory-mapped); optimizer, loops and schedulers start fresh, unlike ``ckpt_path``.
    """

    strategy_name = "gpipe"

    def __init__(
        self,
        microbatches: int = 4,
        balance: Balance = "uniform",
        checkpoint: str = "except_last",
        sequential: Optional[str] = None,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        observe_every_n_steps: int = 0,
        state_dict_type: str = "full",
        deferred_batchnorm: bool = False,
        gather_model: Optional[bool] = None,
        data_parallel_size: int = 1,
        weights: Optional[Union[str, Path]] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
            raise ValueError(f"GPipeStrategy(microbatches={microbatches!r}): need an integer of at least 1")
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"GPipeStrategy(checkpoint={checkpoint!r}): choose one of {', '.join(CHECKPOINT_MODES)}")
        if isinstance(balance, str) and balance not in BALANCE_RULES:
            raise BalanceError(
                f"GPipeStrategy(balance={balance!r}): choose one of {', '.join(BALANCE_RULES)} or a list of layer counts"
            )
        if isinstance(observe_every_n_steps, bool) or not isinstance(observe_every_n_steps, int) or observe_every_n_steps < 0:
            raise ValueError(
                f"GPipeStrategy(observe_every_n_steps={observe_every_n_steps!r}): need a whole number, 0 to turn it off"
            )
        if state_dict_type not in STATE_DICT_TYPES:
            raise ValueError(
                f"GPipeStrategy(state_dict_type={state_dict_type!r}): choose one of {', '.join(STATE_DICT_TYPES)}"
            )
        check_replicas(data_parallel_size)
        self._data_parallel_size = data_parallel_size
        self._topology: Optional[Topology] = None  # built with the process group
        self._averager: Optional[GradientAverager] = None  # with several replicas
        self._ties: list[Tie] = []  # parameters that layers on different stages share
        self._deferred: Optional[DeferredInit] = None  # how the model was built, when built on the meta device
        self._weights = weights  # read once, by the first run
        self._tied: Optional[TiedGradients] = None  # this stage's tied parameters, and their groups
        self._tie_groups: dict[tuple[int, ...], Any] = {}  # process groups of tied stages, kept across runs
        self._stepping = True  # whether this training batch ends an accumulation window
        self._state_dict_type = state_dict_type
        if gather_model not in (None, True, False):
            raise ValueError(f"GPipeStrategy(gather_model={gather_model!r}): True, False, or None (gather a model built whole)")
        self._gather_model = gather_model
        self._built_deferred = False  # whether the module was built on the meta device, which decides gather_model=None
        self._deferred_batchnorm = deferred_batchnorm
        self._deferred_norms: list[nn.Module] = []  # this stage's batch norms in their deferred form, during a run
        self._optimizer_layouts: list[Layout] = []  # how a single-device run numbers each optimizer's parameters
        self._restored: Optional[dict[str, Any]] = None  # what a resumed checkpoint says about the saving pipeline
        self._microbatches = microbatches
        self._observe_every = observe_every_n_steps
        self._observed_step = -1
        self._observing = False
        self._reporter = Reporter()
        self._example_input_array: Any = None
        self._balance_request = balance if isinstance(balance, str) else list(balance)
        self._checkpoint = checkpoint
        self._sequential = sequential
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._num_nodes = 1
        self._balance: Optional[list[int]] = None
        self._executor: Optional[StageExecutor] = None
        self._sequential_name = ""
        self._run_patches = ExitStack()  # undone when the run ends
        self._failed = False  # this run raised: no collective may wait on other ranks any more
        self._balance_report: Optional[BalanceReport] = None
        self._flow: Optional[StageStep] = None  # the step flow of this rank's stage
        self._stage_random: Optional[StageRandom] = None
        self._plan = BackwardPlan.LATE  # where the stages run this training step's backward
        self._saved = LastStageSaved()  # what the module's on_save_checkpoint set, for the file rank 0 writes

    # -- options ------------------------------------------------------------------------------

    @property
    def microbatches(self) -> int:
        return self._microbatches

    @property
    def checkpoint(self) -> str:
        return self._checkpoint

    @property
    def balance(self) -> Optional[list[int]]:
        """Layers per stage, once the model has been partitioned."""
        return None if self._balance is None else list(self._balance)

    @property
    def state_dict_type(self) -> str:
        return self._state_dict_type

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Checkpoints load into the partitioned module: each stage reads only its own tensors.
        return True

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def data_parallel_size(self) -> int:
        return self._data_parallel_size

    @property
    def topology(self) -> Topology:
        """This rank's stage and replica, and the process groups of its pipeline and of its stage's replicas."""
        if self._topology is None:
            raise RuntimeError("GPipeStrategy.topology exists once the processes are connected (setup_environment)")
        return self._topology

    @property
    def tied_names(self) -> dict[str, str]:
        """The other names of each parameter tied across stages, mapped to the name single-device training gives
        it (its first in ``named_parameters()``)."""
        return tied_names(self._ties)

    @property
    def device_mesh(self) -> Any:
        """The ``("data_parallel", "pipeline")`` device mesh: row d is replica d, column j stage j of each."""
        return self.topology.mesh

    @property
    def is_distributed(self) -> bool:
        # Read by Lightning to decide on a DistributedSampler and on ``sync_dist``: the stages of one replica
        # see the same batches in the same order; replicas get their own shards, as DDP's ranks do.
        return self._data_parallel_size > 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        replica = self._topology.replica if self._topology is not None else self.global_rank // self._stages()
        return {"num_replicas": self._data_parallel_size, "rank": replica}

    def _stages(self) -> int:
        """K, the stage count of each replica (before the topology exists, from the world size)."""
        return check_layout(self.num_nodes * self.num_processes, self._data_parallel_size)

    @property
    def process_group_backend(self) -> Optional[str]:
        return self._process_group_backend

    # -- processes ----------------------------------------------------------------------------

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = fabric_rank_zero_only.rank = self.global_rank

    @override
    def setup_environment(self) -> None:
        self._stages()  # a world that does not split into the replicas fails here, on every rank, before connecting
        super().setup_environment()
        self.set_world_ranks()
        self._process_group_backend = self._process_group_backend or _get_default_process_group_backend_for_device(
            self.root_device
        )
        assert self.cluster_environment is not None
        device_id = self.root_device if self.root_device.type != "cpu" else None
        _init_dist_connection(
            self.cluster_environment, self._process_group_backend, timeout=self._timeout, device_id=device_id
        )
        self._topology = Topology.build(self.world_size, self._data_parallel_size, self.global_rank, self.root_device.type)

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert module is not None
        self._check_supported(trainer, module)
        self._failed = False
        fitting = trainer.state.fn == TrainerFn.FITTING
        if self.world_size > 1:  # every rank draws the same shuffles and augmentations, seeded or not
            set_rank_random_state(self.broadcast(rank_random_state(self.root_device)), self.root_device)
        name, seq = find_sequential(module, self._sequential)
        if self.world_size > 1:  # an earlier run may have left the module cut: start from the whole model
            fill_from_first(seq, self.global_rank, self.world_size, self._all_gather_object)
        if fitting:  # Lightning's summary, taken of the whole module (one rank runs the example input)
            self._run_patches.enter_context(frozen_summaries(trainer, module, example_input=self.is_global_zero))
        self._partition(module, name, seq, fitting)
        if module.example_input_array is not None:
            # Lightning's model summary would run forward on this rank's stage alone.
            self._example_input_array = module.example_input_array
            module.example_input_array = None
        self.model = self.precision_plugin.convert_module(module)
        self.model_to_device()
        if self._tied:  # every copy of a tied parameter starts as the first stage's
            self._tied.synchronize()
        if fitting:  # a configure_optimizers that fails on one stage fails on all
            self._together(partial(self.setup_optimizers, trainer))
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        # Every stage logs the last stage's values, so Lightning's advice to sync them across ranks does not apply.
        self._run_patches.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=r".*sync_dist=True.* when logging on epoch level", category=PossibleUserWarning)
        # Norm clipping must see the norm over all stages' gradients, not this stage's alone.
        self._run_patches.enter_context(patched(self.precision_plugin, "clip_grad_by_norm", self._clip_grad_by_global_norm))
        # Lightning's SIGTERM handler broadcasts from inside the handler, wherever the signal lands: in the middle of
        # the stages' own messages (a checkpoint's gather) that broadcast pairs with another rank's and every rank
        # waits forever. Noted only, the signal still ends the run at the batch's end, as Lightning's loops check it.
        connector = trainer._signal_connector
        self._run_patches.enter_context(patched(connector, "_sigterm_notifier_fn", partial(_note_sigterm, connector)))
        if self.topology.k > 1:  # what batch-end and epoch-end hooks take over the parameters, rank 0 would log
            self._run_patches.enter_context(parameters_refused_in_end_hooks(module, seq))

    def _check_supported(self, trainer: Trainer, module: LightningModule) -> None:
        precision = self.precision_plugin
        supported = type(precision) in (Precision, DoublePrecision, HalfPrecision) or (
            type(precision) is MixedPrecision and precision.precision == "bf16-mixed"
        )
        if not supported:
            raise ValueError(
                f"GPipeStrategy supports precision {', '.join(_SUPPORTED_PRECISION)}; got Trainer(precision="
                f"{trainer.precision!r}). 16-mixed scales the loss with a per-rank scaler, which could let stages skip"
                " different steps: use bf16-mixed."
            )
        if not module.automatic_optimization:
            raise ValueError(
                "GPipeStrategy runs the pipeline's backward inside Lightning's automatic optimization;"
                f" {type(module).__name__}.automatic_optimization is False. Manual optimization is not supported,"
                " and with it neither are several optimizers: use one optimizer with parameter groups."
            )
        if self._layer_sync is not None:
            raise ValueError(
                "Trainer(sync_batchnorm=True) is not supported by GPipeStrategy: use"
                " GPipeStrategy(deferred_batchnorm=True) for statistics of the whole mini-batch"
            )
        if self.topology.k > 1:
            refuse_callbacks(trainer.callbacks)

    def _partition(self, module: LightningModule, name: str, seq: nn.Sequential, fitting: bool) -> None:
        """Cut the Sequential ``name`` of the whole ``module`` into stages and keep only this rank's layers."""
        self._sequential_name = name
        topology = self.topology
        k, stage = topology.k, topology.stage
        optimizers: list[Optimizer] = []
        if fitting:  # a throwaway build on the whole module, before it is cut (each fit: requires_grad may change)
            optimizers = _whole_module_optimizers(module)
            if k > 1:
                refuse_closure_optimizers(optimizers)
            self._optimizer_layouts = optimizer_layouts(optimizers, module)
        if self._balance is None and self._balance_request in PROFILED_RULES:
            self._balance = self._profiled_balance(module, seq, fitting, optimizers)
        elif self._balance is None:
            self._balance = resolve_balance(self._balance_request, seq, k)
        else:
            resolve_balance(self._balance, seq, k)  # the same checks against the module given now
        layers = list(seq._modules.values())
        routes = skip_routes(seq)  # checked on every rank alike, before anything is cut
        if len(routes) > MAX_SKIPS:
            raise SkipError(f"{name} has {len(routes)} skip connections; a pipeline carries at most {MAX_SKIPS}")
        self._ties = find_ties(module, seq, self._balance)
        aliases = tied_names(self._ties)
        if fitting:
            check_stages_have_parameters(self._balance, layers)
            optimized = {n for layout in self._optimizer_layouts for group in layout for n in group}
            check_stages_optimized(self._balance, name, layers, optimized, aliases)
        if not self._deferred_batchnorm and self._microbatches > 1 and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for layer in layers for m in layer.modules()
        ):
            rank_zero_warn(
                "GPipeStrategy: batch normalization normalizes each micro-batch by its own statistics and updates its"
                f" running statistics once per micro-batch (microbatches={self._microbatches}), so they differ from"
                " single-device training; GPipeStrategy(deferred_batchnorm=True) updates them once per mini-batch,"
                " from the whole mini-batch"
            )
        if self.world_size > 1:
            start_from_first_ranks_weights(module, layers, self._balance, self.topology, self._deferred, self._all_gather_object)
        kept = keep_stage(seq, self._balance, stage)
        # The other stages' layers stay, their storage freed, but for what the module still uses elsewhere.
        release_absent(seq, {storage_id(t) for t in (*stage_parameters(module), *module.buffers()) if not t.is_meta})
        if has_meta_tensors(module):  # built by tensor_init_context: this stage's layers get storage, now
            self._built_deferred = True
            if self._deferred is None:
                raise DeferredInitError(
                    f"{type(module).__name__} has parameters on the meta device that this GPipeStrategy did not see"
                    " built; build the model in configure_model, or under trainer.init_module() of this Trainer"
                )
            self._deferred.materialize([module])
            self._deferred = None  # what it recorded of the other stages goes too
        if self._weights is not None:  # this stage's tensors only, memory-mapped
            with stage_view():
                own = module.state_dict()
            module.load_state_dict(stage_weights(self._weights, own))
            self._weights = None
        parameters = {aliases.get(n, n): p for n, p in module.named_parameters(remove_duplicate=False)}
        if self._deferred_batchnorm:
            self._deferred_norms = defer(kept)
        link = StageLink(stage, k, self.root_device, topology.pipeline_group) if k > 1 else None
        if self._stage_random is None:  # one stream per stage for the strategy's life: runs continue it
            self._stage_random = StageRandom(stage, self.root_device)
        self._executor = StageExecutor(
            kept, stage, k, self.root_device, link, self._checkpoint, self._stage_random,
            skips=stage_ports(routes, self._balance, stage),
        )  # fmt: skip
        sharing = ObjectBroadcast(self.root_device, topology.pipeline_group) if k > 1 else None
        self._flow = StageStep(
            self._executor, self._microbatches, name, self.root_device, sharing, self._loss_backward, topology.rank_of(k - 1)
        )
        if topology.d > 1:
            self._averager = GradientAverager(topology.replica_group, topology.d, self._executor.timeline)
        self._tied = TiedGradients(self._ties, topology, parameters, self._tie_groups) if self._ties else None
        log.debug("stage %d of %d runs %s.%s", stage, k, name, stage_layers(self._balance, stage))
        replicas = f"{topology.d} replicas of " if topology.d > 1 else ""
        rank_zero_info(
            f"GPipeStrategy: {replicas}{k} stages of {name!r} with balance {self._balance},"
            f" microbatches={self._microbatches}, checkpoint={self._checkpoint!r}"
        )
        if self._balance_report is not None and self.is_global_zero:
            self._balance_report.publish(module.trainer)

    def _profiled_balance(
        self, module: LightningModule, seq: nn.Sequential, fitting: bool, optimizers: list[Optimizer]
    ) -> list[int]:
        """Global rank 0 measures every layer on a sample micro-batch and splits; every rank takes its answer."""
        resolve_balance("uniform", seq, self.topology.k)  # enough layers for K stages, checked on every rank
        if self.topology.k == 1:
            return [len(seq)]
        # Every rank draws the sample, so whatever drawing it does to the data loader, it does everywhere.
        sample = self._sample_microbatch(module, fitting)
        outcome: Union[BalanceReport, Failure, None] = None
        if self.is_global_zero:
            try:
                outcome = self._measure_balance(seq, sample, optimizers)
            except Exception as error:  # every rank raises it, instead of waiting for an answer
                outcome = Failure.of(error)
        outcome = self.broadcast(outcome)
        if isinstance(outcome, Failure):
            raise outcome.error
        assert outcome is not None
        self._balance_report = outcome
        return outcome.balance

    def _measure_balance(self, seq: nn.Sequential, sample: Any, optimizers: list[Optimizer]) -> BalanceReport:
        with self.precision_plugin.train_step_context():  # autocast, as in training
            costs = profile_layers(list(seq._modules.values()), sample, self.root_device)
        if self._balance_request == "time":
            per_layer = costs.seconds
        else:
            held = self._microbatches if self._checkpoint == "never" else 1
            per_layer = costs.memory(optimizer_slots(optimizers), held)
        return BalanceReport.of(self._balance_request, per_layer, self.topology.k, self._microbatches, costs)

    def _sample_microbatch(self, module: LightningModule, fitting: bool) -> Any:
        """The first micro-batch of what ``self(x)`` gets. When fitting: the first training batch passed through
        the user's ``training_step`` up to ``self(x)``; otherwise ``example_input_array``.

        Random streams, including the data loaders' own generators, are left as they were, so a profiled run
        shuffles as any other does."""
        if not fitting:
            x = module.example_input_array
            if x is None:
                raise BalanceError(
                    f"GPipeStrategy(balance={self._balance_request!r}) profiles the layers on a sample input: set"
                    f" {type(module).__name__}.example_input_array, or pass the balance as a list of layer counts"
                )
            return split(x, self._microbatches)[0]
        loaders = module.trainer.fit_loop._data_source.dataloader()
        with untouched_random(loaders, self.root_device):
            batch, batch_idx, _ = next(iter(CombinedLoader(loaders, "max_size_cycle")))
            x = input_of_step(module, self.batch_to_device(batch), batch_idx)
        return split(x, self._microbatches)[0]

    @override
    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Iterator[None]:
        """Where ``configure_model`` and ``trainer.init_module(empty_init=...)`` build the model.

        By default (``None``) on the meta device, recorded: each rank later materializes only its own stage, with
        the values single-device construction gives it (see :mod:`lightning_gpipe.deferred`). ``True``: the same,
        but left uninitialised, for weights loaded from a checkpoint. ``False``: the whole model on the CPU.
        """
        if empty_init is False:
            with torch.device("cpu"), self.precision_plugin.tensor_init_context():
                yield
            return
        self._deferred = self._deferred or DeferredInit()
        with self._deferred.recording(replay=empty_init is None), self.precision_plugin.tensor_init_context():
            yield

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # -- steps --------------------------------------------------------------------------------

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        module = self.lightning_module
        assert module is not None
        trainer = module.trainer
        self._plan = BackwardPlan.of(trainer, module, batch_idx)
        if batch_idx == 0:  # every epoch: a data module's setup may draw a new split
            where = f"the first training batch of epoch {trainer.current_epoch}"
            self._check_same_batch(batch, where, trainer.num_training_batches)
        # Replicas average once per optimizer step, on its last batch of accumulation, as DDP does.
        if self._flow is not None:
            self._stepping = not trainer.fit_loop.epoch_loop._should_accumulate()
            self._flow.averager = self._averager if self._stepping else None

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_observe()
        with self.precision_plugin.train_step_context():
            return self._step("training_step", True, args, kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self._step("validation_step", False, args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self._step("test_step", False, args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._step("predict_step", False, args, kwargs)

    def _step(self, hook: str, train: bool, args: tuple, kwargs: dict) -> Any:
        assert self.lightning_module is not None and self._flow is not None
        if not train and (args[1] if len(args) > 1 else kwargs.get("batch_idx")) == 0:
            trainer = self.lightning_module.trainer
            loop = trainer.predict_loop if hook == "predict_step" else trainer._evaluation_loop
            dataloader = args[2] if len(args) > 2 else kwargs.get("dataloader_idx", 0)
            where = f"the first batch of {hook.removesuffix('_step')} dataloader {dataloader}"
            self._check_same_batch(args[0] if args else kwargs.get("batch"), where, list(loop.max_batches))
        return self._flow.run(self.lightning_module, hook, train, args, kwargs, self._plan if train else None)

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # The hooks around the optimizer step (on_before_optimizer_step, on_before_zero_grad, gradient clipping,
        # and every callback's) run on each stage, where self.parameters() is the stage's alone.
        with self._parameters_refused("code run around the optimizer step (on_before_optimizer_step, a callback's hook)"):
            once = closure if self.topology.k == 1 else ClosureOnce(closure, optimizer)
            return super().optimizer_step(optimizer, once, model, **kwargs)

    def _check_same_batch(self, batch: Any, where: str, batches: Any) -> None:
        """Raise on every stage of this pipeline if they hold different batches (a collective over its stages)."""
        topology = self.topology
        if topology.k == 1:
            return

        def gather(obj: Any) -> list[Any]:
            seen: list[Any] = [None] * topology.k
            dist.all_gather_object(seen, obj, group=topology.pipeline_group)
            return seen

        check_same_batch(batch, batches, where, gather, range(topology.k))

    def _parameters_refused(self, where: str) -> Any:
        module = self.lightning_module
        if module is None or self.topology.k == 1:
            return nullcontext()
        return parameters_refused(module, module.get_submodule(self._sequential_name), where)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        with self._parameters_refused("code run around the backward (on_before_backward, on_after_backward)"):
            return self._backward(closure_loss, optimizer, *args, **kwargs)

    def _backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        module, executor, flow = self.lightning_module, self._executor, self._flow
        assert module is not None and executor is not None and flow is not None
        if not flow.backward_ran:
            if executor.is_last:
                # The loss (already divided by accumulate_grad_batches) fills the gradients of the stage outputs ...
                self._loss_backward(closure_loss, optimizer, *args, **kwargs)
            else:
                self._before_backward(closure_loss)
            # ... which drive each micro-batch's backward, in reverse, through every stage.
            executor.backward()
            flow.start_average()
        elif not executor.is_last:  # it ran in the step (step.py's step 4); the last stage called these hooks there
            self._before_backward(closure_loss)
        flow.finish_average()  # the replicas' average, before on_after_backward and clipping read it
        flow.held.release()
        if self._tied and self._stepping:  # once per optimizer step, as the replicas' average
            self._tied.sum_gradients()
        flow.wait()
        if self._observing:
            self._report()
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def _before_backward(self, loss: Tensor) -> Tensor:
        """Lightning's steps before a backward: the strategy's and the precision plugin's (which may scale the loss),
        and with them the on_before_backward hooks."""
        assert self.lightning_module is not None
        self.pre_backward(loss)
        return self.precision_plugin.pre_backward(loss, self.lightning_module)

    def _loss_backward(self, loss: Tensor, optimizer: Optional[Optimizer] = None, *args: Any, **kwargs: Any) -> None:
        """Last stage: Lightning's backward of the step's loss, into the gradients of the stage's outputs."""
        module = self.lightning_module
        assert module is not None
        if optimizer is None:  # in the step (step.py's step 4): automatic optimization has exactly one
            optimizer = module.trainer.optimizers[0]
        self.precision_plugin.backward(self._before_backward(loss), module, optimizer, *args, **kwargs)

    def _maybe_observe(self) -> None:
        """Start timing and metering this step if it is one to observe (the same decision on every rank)."""
        executor, module = self._executor, self.lightning_module
        assert executor is not None and module is not None
        step = module.trainer.global_step
        if not self._observe_every or step == 0 or step % self._observe_every or step == self._observed_step:
            return
        self._observed_step, self._observing = step, True
        if self.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.root_device)
        executor.meter.start(stage_parameters(module))
        self.barrier()  # a common start, so the stages' timelines line up
        executor.timeline.start()

    def _report(self) -> None:
        """Gather what every stage measured in the observed step and publish it from global rank 0."""
        executor, module = self._executor, self.lightning_module
        assert executor is not None and module is not None
        self._observing = False
        report = StageReport(
            stage=executor.stage,
            events=executor.timeline.stop(),
            activation_bytes_peak=executor.meter.stop(),
            param_bytes=tensor_bytes(stage_parameters(module)),
            optimizer_bytes=sum(optimizer_state_bytes(unwrapped(o)) for o in self.optimizers),
            cuda_max_allocated=torch.cuda.max_memory_allocated(self.root_device) if self.root_device.type == "cuda" else None,
            host_peak_bytes=host_peak_bytes(),
        )
        topology = self.topology
        if topology.replica != 0:  # the first replica's steps stand for all
            return
        reports = gather_to_first(report, topology.stage, topology.k, topology.pipeline_ranks)
        if self.is_global_zero:
            assert self._flow is not None and self._flow.call is not None
            self._reporter.publish(module.trainer, reports, self._flow.call.n, self._flow.call.samples)

    def _clip_grad_by_global_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        """``clip_grad_norm_`` with the 2-norm taken over every stage's gradients."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        local = torch.zeros((), dtype=torch.float32, device=self.root_device)
        for p in params:  # a tied parameter's summed gradient counts once, on the first of its stages
            if self._tied is None or self._tied.counted_here(p):
                local += torch.linalg.vector_norm(p.grad, 2, dtype=torch.float32) ** 2
        if self.topology.k > 1:  # one replica's stages: every replica holds the same averaged gradients
            dist.all_reduce(local, op=ReduceOp.SUM, group=self.topology.pipeline_group)
        total = local.sqrt()
        coef = torch.clamp(clip_val / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))

    # -- collectives --------------------------------------------------------------------------

    def _check_collective(self, name: str) -> None:
        if self._flow is not None:
            self._flow.check_collective(name)

    # Lightning's collectives for user code (self.all_gather, self.log(sync_dist=True), ...) go over the replicas,
    # as they go over DDP's ranks: the stages of one replica already share the last stage's values. So they are
    # safe after self(x) too, where the last stage of every replica runs them, and nothing with one replica.
    # LightningModule.all_gather passes the default group, WORLD, for "every data-parallel rank".

    @override
    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        if group is not None and group is not dist.group.WORLD:
            self._check_collective("all_gather")
            return super().all_gather(tensor, group=group, sync_grads=sync_grads)
        if self._data_parallel_size == 1:
            return tensor  # one replica: as on a single device
        return super().all_gather(tensor, group=self.topology.replica_group, sync_grads=sync_grads)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        self._check_collective("barrier")
        if not _distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        self._check_collective("broadcast")
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def _all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if not _distributed_is_initialized():
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def _together(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on every rank; if it raised on any, raise on all, so no rank goes on to wait for the others."""
        failure = None
        try:
            fn()
        except Exception as error:
            failure = error
        failures = self._all_gather_object(None if failure is None else Failure.of(failure))
        if failure is not None:
            raise failure
        first = next((f for f in failures if f is not None), None)
        if first is not None:
            raise first.error

    @override
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Union[ReduceOp, str]] = "mean") -> Any:
        if not isinstance(tensor, Tensor):
            return tensor
        if group is not None and group is not dist.group.WORLD:
            self._check_collective("reduce")
        elif self._data_parallel_size == 1:
            return tensor  # one replica: as on a single device
        else:
            group = self.topology.replica_group
        return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """The decision of every rank (EarlyStopping's, ModelCheckpoint's), over the whole world."""
        self._check_collective("reduce_boolean_decision")
        if not _distributed_is_initialized():
            return decision
        votes = torch.tensor(int(decision), device=self.root_device)
        dist.all_reduce(votes, op=ReduceOp.SUM)
        return bool(votes == self.world_size) if all else bool(votes > 0)

    # -- state ----------------------------------------------------------------------------------

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The unpartitioned module's state dict on global rank 0 (empty elsewhere): every stage sends its own.

        With ``state_dict_type="sharded"``, this stage's own entries: each stage writes them itself.
        """
        assert self.lightning_module is not None
        if self.topology.k > 1:  # Lightning calls this first when it builds a checkpoint, on every rank
            self._saved.watch(self.lightning_module)
        with stage_view():
            local = self.lightning_module.state_dict()
        if self._state_dict_type == "sharded":
            return local
        full: dict[str, Any] = {}
        for part in self._gather_first_replica(local):
            full.update(part)
        for alias, name in self.tied_names.items():  # one tensor under every name, as on one device
            if alias in full and name in full:
                full[alias] = full[name]
        return full

    def _gather_first_replica(self, local: Any) -> list[Any]:
        """Every stage's ``local`` of the first replica on global rank 0 (``[]`` elsewhere; replicas are equal)."""
        topology = self.topology
        if topology.replica != 0:
            return []
        return gather_to_first(local, topology.stage, topology.k, topology.pipeline_ranks)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer state of all stages on global rank 0 (empty elsewhere), named and in the unpartitioned
        module's order; with ``state_dict_type="sharded"``, this stage's own, by parameter name."""
        optimizer = unwrapped(optimizer)
        assert self.lightning_module is not None
        local = optimizer_state_by_name(optimizer, self.lightning_module, self.tied_names)
        if self._state_dict_type == "sharded":
            return local
        states = self._gather_first_replica(local)
        if not states:
            return {}
        index = [unwrapped(o) for o in self.optimizers].index(optimizer)
        return merge_optimizer_states(states, self._optimizer_layouts[index])

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Union[str, Path], storage_options: Optional[Any] = None
    ) -> None:
        executor = self._executor
        assert executor is not None
        self._saved.take(checkpoint, self.topology, type(self.lightning_module).__name__)
        # Each stage's random stream, so dropout continues as if never interrupted (same K).
        topology = self.topology
        streams = self._gather_first_replica(executor.random.state_dict())
        checkpoint["gpipe"] = {
            "k": topology.k,
            "data_parallel_size": topology.d,
            "balance": self.balance,
            "microbatches": self._microbatches,
            "stage_random": streams,
            "rank_random": rank_random_state(self.root_device),
            "optimizer_param_names": self._optimizer_layouts,  # how optimizer_states numbers the parameters
        }
        if self._state_dict_type == "sharded":
            if storage_options is not None:
                raise TypeError(f"GPipeStrategy(state_dict_type='sharded') takes no storage_options, got {storage_options!r}")
            # Every replica writes its stage's tensors (the writer deduplicates them); the first replica's metadata.
            gather = partial(gather_to_first, stage=topology.stage, k=topology.k, ranks=topology.pipeline_ranks)
            save_sharded(
                checkpoint, filepath, self._optimizer_layouts, self.is_global_zero, self.barrier, gather, self.broadcast
            )
        elif self.is_global_zero:  # Lightning's checkpoint IO writes to a temporary file, then renames it
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Union[str, Path], weights_only: Optional[bool] = None) -> dict[str, Any]:
        module = self.lightning_module
        assert module is not None
        if is_sharded(checkpoint_path):
            names = list(parameter_names(module, self.tied_names).values())  # a tied parameter's state by its name
            checkpoint = load_sharded(checkpoint_path, module.state_dict(), names, weights_only=weights_only)
        elif type(self.checkpoint_io) is TorchCheckpointIO and Path(checkpoint_path).is_file():
            # Memory-mapped on the CPU: each rank reads only its own stage's tensors, not K copies of the model.
            checkpoint = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=weights_only)
        else:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._restored = checkpoint.get("gpipe")
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        own = module.state_dict()
        state = checkpoint["state_dict"]
        if self._executor is not None:  # already partitioned: keep this stage's entries only
            state = {key: value for key, value in state.items() if key in own}
        module.load_state_dict(state, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        assert self.lightning_module is not None
        saved_states = checkpoint["optimizer_states"]
        if len(saved_states) != len(self.optimizers):
            raise ValueError(
                f"the checkpoint holds {len(saved_states)} optimizer states, configure_optimizers returned"
                f" {len(self.optimizers)}: return as many optimizers as the run that saved it"
            )
        # Saved by GPipeStrategy, the names come with the checkpoint; a plain Lightning run numbered its
        # parameters as configure_optimizers builds them on the whole module.
        layouts = checkpoint.get("gpipe", {}).get("optimizer_param_names") or self._optimizer_layouts
        for optimizer, saved, layout in zip(self.optimizers, saved_states, layouts):
            optimizer.load_state_dict(optimizer_state_for(optimizer, self.lightning_module, saved, layout, self.tied_names))
        _optimizers_to_device(self.optimizers, self.root_device)
        # The last of the training state Lightning restores (loops, precision, optimizers, schedulers).
        self._restore_random()

    def _restore_random(self) -> None:
        """Put the random streams where the saving run had them, last, right before the data is first iterated."""
        restored, executor = self._restored, self._executor
        self._restored = None
        if restored is None or executor is None:
            return
        set_rank_random_state(restored["rank_random"], self.root_device)
        if restored["k"] == self.topology.k and restored["balance"] == self.balance:
            executor.random.load_state_dict(restored["stage_random"][self.topology.stage])
        else:
            rank_zero_info(
                f"GPipeStrategy: the checkpoint was saved with {restored['k']} stages (balance {restored['balance']}),"
                f" this run has {self.topology.k} (balance {self.balance}): training continues from the same state,"
                " but random draws inside the stages (dropout) differ from an uninterrupted run"
            )

    # -- lifecycle ------------------------------------------------------------------------------

    @override
    def process_dataloader(self, dataloader: object) -> object:
        # Seeded workers (seed_everything(workers=True)) draw as their replica's rank on every stage of it, as
        # that rank's DDP process would.
        return seed_workers_alike(dataloader, rank=self.topology.replica)

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True
        message = str(exception)
        if self.world_size > 1 and ("Connection closed by peer" in message or "Connection reset by peer" in message):
            place = f"stage {self.global_rank}"
            if self._topology is not None:
                place = f"stage {self._topology.stage}" + (f" of replica {self._topology.replica}" if self._topology.d > 1 else "")
            log.error(
                "GPipeStrategy: %s lost the connection to another stage, which most likely failed first;"
                " look for that stage's error above.",
                place,
            )

    @override
    def teardown(self) -> None:
        if self._flow is not None and not self._failed:
            self._flow.wait()
        self._run_patches.close()
        module = self.lightning_module
        if self._example_input_array is not None and module is not None:
            module.example_input_array = self._example_input_array
        undefer(self._deferred_norms)  # the user's own batch-norm layers again
        self._deferred_norms = []
        super().teardown()  # the module moves to the CPU
        if self._executor is not None and self.topology.k > 1:
            assert module is not None
            seq = module.get_submodule(self._sequential_name)
            topology = self.topology
            if self._gathers() and not self._failed and topology.replica == 0:
                prefix = f"{self._sequential_name}."
                tied = [[n.removeprefix(prefix) for n in tie.names if n.startswith(prefix)] for tie in self._ties]
                gather_layers(seq, topology.stage, topology.k, topology.pipeline_ranks, tied)  # tied copies: one
            for layer in seq:  # what this process does not hold now fails loudly when asked for
                if isinstance(layer, AbsentLayer):
                    layer.after_run = True

    def _gathers(self) -> bool:
        """Whether this run ends with the whole model on global rank 0 (``gather_model``)."""
        if self._gather_model is not None:
            return self._gather_model
        if self._built_deferred:
            rank_zero_info(
                "GPipeStrategy: the model was built deferred (configure_model or trainer.init_module()), so its stages"
                " stay on their ranks after the run (gather_model=None): global rank 0 may not fit the whole model."
                " Save a checkpoint (state_dict_type='sharded' never gathers it), or pass gather_model=True."
            )
        return not self._built_deferred

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="GPipe pipeline parallelism (lightning-gpipe)", override=True
        )


def _note_sigterm(connector: Any, signum: int, frame: Any) -> None:
    """Lightning's SIGTERM handler without its collective: forward the signal to the launched processes once, and
    note it for Lightning's loops, which end the run at the next batch boundary."""
    trainer = connector.trainer
    log.info("GPipeStrategy: rank %d received SIGTERM (%d); the run ends after this batch", trainer.global_rank, signum)
    if not connector.received_sigterm and trainer.strategy.launcher is not None:
        trainer.strategy.launcher.kill(signum)
    connector.received_sigterm = True


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
