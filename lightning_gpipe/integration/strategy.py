"""The Lightning strategy: GPipe pipeline parallelism for an unmodified LightningModule.

Lightning's hooks only: each delegates to the run's objects (:mod:`~lightning_gpipe.integration.runtime`), built in
``setup`` (:mod:`~lightning_gpipe.integration.build`); processes and collectives are the base class's
(:mod:`~lightning_gpipe.integration.processes`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gpipe.integration import saving
from lightning_gpipe.integration.backward import stage_backward
from lightning_gpipe.integration.build import open_run
from lightning_gpipe.integration.config import GPipeConfig
from lightning_gpipe.integration.contract import ClosureOnce, seed_workers_alike
from lightning_gpipe.integration.hooks import parameters_refused_on_stages, run_step, start_training_batch
from lightning_gpipe.integration.processes import PipelineProcesses
from lightning_gpipe.integration.report import publish_observed, start_observing
from lightning_gpipe.integration.runtime import Kept, PipelineRun, note_lost_connection
from lightning_gpipe.model.deferred import DeferredInit
from lightning_gpipe.model.partition import Balance
from lightning_gpipe.model.tied import tied_names

__all__ = ["GPipeStrategy"]


class GPipeStrategy(PipelineProcesses):
    """GPipe pipeline parallelism: K stages on K processes, M micro-batches, re-materialization.

    The LightningModule's ``nn.Sequential`` is cut into one stage per process (``devices x num_nodes``), every
    batch into ``microbatches`` along dim 0, which the stages run in the order of ``schedule`` (F-then-B by
    default). Gradients, parameters and logged metrics equal those of single-device training.

    Example:
        ```python
        trainer = L.Trainer(accelerator="gpu", devices=4, strategy=GPipeStrategy(microbatches=8, checkpoint="never"))
        ```

    Args:
        microbatches: M, the number of micro-batches per batch (a smaller batch gives fewer), or ``"auto"``: the
            fastest M predicted (a tie within 5%: the fewest) from a profile on the first batch, in ``memory_budget``.
        memory_budget: bytes per stage, or a string such as ``"24GiB"``, for ``"auto"``: by default the GPU's
            memory, on CPU 0.8 of the machine's memory split between its processes.
        balance: layers per stage as a list, or a rule: ``"uniform"`` (by layer count), ``"params"`` (by parameter
            count), ``"time"`` (each layer's measured forward and backward) or ``"memory"`` (its weights, gradients,
            optimizer state and activations), measured on a sample micro-batch, reporting their choice.
        checkpoint: re-materialization: ``"always"``, ``"except_last"`` (all but the last micro-batch) or ``"never"``.
        schedule: ``"gpipe"`` (F-then-B: the loss sees the whole batch), ``"1f1b"`` (each micro-batch's backward as
            soon as its forward leaves the last stage, which runs the step per micro-batch: a loss that is a mean over
            samples, logs as sample-weighted means) or ``"interleaved"`` (1F1B over ``virtual_stages`` chunks per rank).
        sequential: the ``nn.Sequential`` attribute to pipeline; by default the only Sequential holding all parameters.
        process_group_backend: ``torch.distributed`` backend; gloo on CPU and NCCL on GPU by default.
        timeout: how long a rank waits on a collective before giving up.
        observe_every_n_steps: every this many optimizer steps, time each stage's work and measure its memory,
            and log the bubble, compute, waits and memory, the schedule picture and a Chrome trace; 0 turns it off.
        state_dict_type: ``"full"``: one ordinary Lightning checkpoint file, gathered on global rank 0; ``"sharded"``:
            a folder in which every stage writes its own tensors. Either kind resumes with any K, M and balance.
        deferred_batchnorm: batch norms normalize each micro-batch by its own statistics, but update their running
            statistics once per mini-batch, from all of it, as on one device (without it, once per micro-batch).
        gather_model: when a run ends, move every stage's tensors to global rank 0: the whole trained model there
            (in its host memory); ``False``: every rank keeps its stage, and the module cannot run again. ``None``
            (default) gathers a model built whole (rank 0 held it all anyway), not one built deferred.
        data_parallel_size: D, the replicas of the pipeline; K = (devices x num_nodes) / D.
        shard: each stage's training state over its D replicas: ``"none"`` (whole on each), ``"optimizer"`` (the
            optimizer state split, ZeRO-1) or ``"full"`` (parameters and gradients too, between steps).
        weights: start the first run from these weights (fine-tuning): a Lightning checkpoint, a sharded folder or
            a ``torch.save``'d state dict you trust; each rank reads its stage's tensors; optimizer, loops start fresh.
        headers: ``"auto"`` sends a stage's output shapes only for input shapes not met before (no wait for the
            device); ``"always"`` with every micro-batch, for output shapes that depend on the input's values.
        virtual_stages: v, chunks per rank under ``"interleaved"`` (2 by default): rank r runs stages r, r+K, ...
    """

    strategy_name = "gpipe"

    def __init__(
        self,
        microbatches: Union[int, str] = 4,
        balance: Balance = "uniform",
        checkpoint: str = "except_last",
        schedule: str = "gpipe",
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
        headers: str = "auto",
        virtual_stages: Optional[int] = None,
        memory_budget: Union[int, float, str, None] = None,
        shard: str = "none",
    ) -> None:
        config = GPipeConfig(
            microbatches, schedule, balance, checkpoint, sequential, process_group_backend, timeout,
            observe_every_n_steps, state_dict_type, deferred_batchnorm, gather_model, data_parallel_size, weights,
            headers, virtual_stages, memory_budget, shard,
        )  # fmt: skip
        super().__init__(
            config, accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision_plugin=precision_plugin,
        )  # fmt: skip
        self._kept = Kept(weights=weights)  # what outlives a run
        self._run: Optional[PipelineRun] = None  # one run's objects, from setup to teardown

    @property
    def microbatches(self) -> Union[int, str]:
        """M, the micro-batches per batch (``"auto"`` until the first run has chosen)."""
        return self.config.microbatches

    @property
    def checkpoint(self) -> str:
        """The re-materialization mode."""
        return self.config.checkpoint

    @property
    def data_parallel_size(self) -> int:
        """D, the replicas of the pipeline."""
        return self.config.data_parallel_size

    @property
    def shard(self) -> str:
        """How each stage's training state is split over its replicas: ``none``, ``optimizer`` or ``full``."""
        return self.config.shard

    @property
    def balance(self) -> Optional[list[int]]:
        """Layers per stage (K*v of them under an interleaved schedule), once the model has been partitioned."""
        return None if self._kept.balance is None else list(self._kept.balance)

    @property
    def tied_names(self) -> dict[str, str]:
        """Each other name of a parameter tied across stages, mapped to its first in ``named_parameters()``."""
        return tied_names(self._kept.ties)

    def _check_collective(self, name: str) -> None:
        if self._run is not None:  # code after self(x) runs on the last stage alone: none other would join
            self._run.flow.check_collective(name)

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        """True: checkpoints load into the partitioned module, each stage reading only its own tensors."""
        return True

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self._run = open_run(self, trainer, self._kept)

    @override
    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Iterator[None]:
        """Where ``configure_model`` and ``trainer.init_module(empty_init=...)`` build the model: by default on the
        meta device, recorded, each rank then materializing only its stage as one device would build it (see
        `lightning_gpipe.model.deferred`); ``True``: the same, uninitialised (for loaded weights); ``False``: on CPU."""
        if empty_init is False:
            with torch.device("cpu"), self.precision_plugin.tensor_init_context():
                yield
            return
        self._kept.deferred = self._kept.deferred or DeferredInit()
        with self._kept.deferred.recording(replay=empty_init is None), self.precision_plugin.tensor_init_context():
            yield

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        # Seeded workers draw as their replica's rank on every stage of it, as that rank's DDP process would.
        return seed_workers_alike(dataloader, rank=self.topology.replica)

    @override
    def on_exception(self, exception: BaseException) -> None:
        if self._run is not None:
            self._run.failed = True
        note_lost_connection(exception, self.world_size, self._topology, self.global_rank)

    @override
    def teardown(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.close()
        super().teardown()  # the module moves to the CPU
        if run is not None:
            run.release_layers(self.topology, self._kept, self.config)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``strategy="gpipe"``."""
        description = "GPipe pipeline parallelism (lightning-gpipe)"
        strategy_registry.register(cls.strategy_name, cls, description=description, override=True)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        assert self._run is not None
        start_training_batch(self, self._run, batch, batch_idx)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._run is not None
        start_observing(self, self._run, self._kept)
        with self.precision_plugin.train_step_context():
            return run_step(self, self._run, "training_step", args, kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return run_step(self, self._run, "validation_step", args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return run_step(self, self._run, "test_step", args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return run_step(self, self._run, "predict_step", args, kwargs)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        run = self._run
        assert run is not None
        with parameters_refused_on_stages(self, run, "backward"):
            loss = stage_backward(self, run, closure_loss, optimizer, *args, **kwargs)
            if run.observing:
                publish_observed(self, run, self._kept)
            loss = self.precision_plugin.post_backward(loss, run.module)
            self.post_backward(loss)
            return loss

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # The hooks around the optimizer step run on each stage, where self.parameters() is the stage's alone.
        assert self._run is not None
        with parameters_refused_on_stages(self, self._run, "optimizer_step"), self._run.optimizer_stepping():
            once = closure if self.topology.k == 1 else ClosureOnce(closure, optimizer)
            return super().optimizer_step(optimizer, once, model, **kwargs)

    # -- checkpoints (integration.saving) ------------------------------------------------------------

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The whole module's state dict on global rank 0, from every stage (sharded: this stage's own entries)."""
        return saving.module_state(self, self._kept)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer state of all stages on global rank 0 (empty elsewhere), named and in the unpartitioned
        module's order; with ``state_dict_type="sharded"``, this stage's own, by parameter name."""
        return saving.optimizer_state(self, self._kept, optimizer)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Union[str, Path], storage_options: Any = None) -> None:
        saving.save(self, self._kept, checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Union[str, Path], weights_only: Optional[bool] = None) -> dict[str, Any]:
        """A full file memory-mapped, or this stage's tensors of a sharded folder; notes the saving pipeline."""
        checkpoint = saving.load(self, checkpoint_path, weights_only, super().load_checkpoint)
        if self._run is not None:
            self._run.restored = checkpoint.get("gpipe")
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """This stage's entries of the whole module's state dict."""
        assert self.lightning_module is not None
        saving.load_module_state(self, self._kept, checkpoint, strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """The optimizer state by parameter name (any K, or a plain Lightning run's), then the random streams."""
        saving.load_optimizer_states(self, self._kept, self._run, checkpoint)
