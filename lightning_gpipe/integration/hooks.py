"""What the strategy's step hooks do on one stage: check the batch, place the backward, run the user's step."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any

from lightning_gpipe.integration.backward import BackwardPlan
from lightning_gpipe.integration.contract import parameters_refused
from lightning_gpipe.integration.invariants import check_same_batch
from lightning_gpipe.integration.runtime import PipelineRun
from lightning_gpipe.parallel.collectives import all_gather_object

__all__ = ["start_training_batch", "run_step", "parameters_refused_on_stages"]


def start_training_batch(strategy: Any, run: PipelineRun, batch: Any, batch_idx: int) -> None:
    """``on_train_batch_start``: where this step's backward runs, whether it ends an accumulation window, and, on
    an epoch's first batch, the check that every stage holds the same batch."""
    trainer = run.module.trainer
    run.plan = BackwardPlan.of(trainer, run.module, batch_idx)
    if batch_idx == 0:  # every epoch: a data module's setup may draw a new split
        where = f"the first training batch of epoch {trainer.current_epoch}"
        _check_same_batch(strategy, batch, where, trainer.num_training_batches)
    # Replicas average once per optimizer step, on its last batch of accumulation, as DDP does.
    run.stepping = not trainer.fit_loop.epoch_loop._should_accumulate()
    run.flow.averager = run.averager if run.stepping else None


def run_step(strategy: Any, run: Any, hook: str, args: tuple, kwargs: dict) -> Any:
    """The user's ``hook`` (``training_step``, ...) with ``self(x)`` through the pipeline; an evaluation loop's
    first batch is checked to be the same on every stage."""
    assert run is not None
    train = hook == "training_step"
    if not train and (args[1] if len(args) > 1 else kwargs.get("batch_idx")) == 0:
        trainer = run.module.trainer
        loop = trainer.predict_loop if hook == "predict_step" else trainer._evaluation_loop
        dataloader = args[2] if len(args) > 2 else kwargs.get("dataloader_idx", 0)
        where = f"the first batch of {hook.removesuffix('_step')} dataloader {dataloader}"
        _check_same_batch(strategy, args[0] if args else kwargs.get("batch"), where, list(loop.max_batches))
    if run.shards is not None:  # shard='full': the stage's parameters whole, once per step
        run.shards.gather()
    return run.flow.run(run.module, hook, train, args, kwargs, run.plan if train else None)


#: The user code around Lightning's backward and optimizer step, which runs on every stage.
_AROUND = {
    "backward": "code run around the backward (on_before_backward, on_after_backward)",
    "optimizer_step": "code run around the optimizer step (on_before_optimizer_step, a callback's hook)",
}


def parameters_refused_on_stages(strategy: Any, run: PipelineRun, hook: str) -> Any:
    """A block around Lightning's ``hook`` (``"backward"``, ``"optimizer_step"``) in which ``self.parameters()``
    raises, as it would see this stage alone (nothing with one stage)."""
    if strategy.topology.k == 1:
        return nullcontext()
    return parameters_refused(run.module, run.module.get_submodule(run.sequential), _AROUND[hook])


def _check_same_batch(strategy: Any, batch: Any, where: str, batches: Any) -> None:
    """Raise on every stage of this pipeline if they hold different batches (a collective over its stages)."""
    topology = strategy.topology
    if topology.k == 1:
        return
    gather = partial(all_gather_object, group=topology.pipeline_group)
    check_same_batch(batch, batches, where, gather, range(topology.k))
