"""The backward of a training step: where the stages run it, the gradients it leaves, and Lightning's steps around it."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["BackwardPlan", "overridden", "HeldGradients", "stage_backward", "loss_backward", "microbatch_backward", "loss_problem", "clip_grad_by_global_norm"]


class BackwardPlan(Enum):
    """Where the stages run their backward in a training step, decided alike on every rank.

    In the step (step 4 of the diagram) unless user code runs between the step and the backward: Lightning's
    on_before_zero_grad, optimizer_zero_grad and on_before_backward hooks, of the module or of a callback. They
    may read gradients, which must then be what they are on one device, or start a collective, which every stage
    must join; so with any of them the backward waits for the results (LATE), as before.
    """

    #: Lightning zeroes the gradients after the step: the step's fresh gradients are held aside from it, and
    #: the old ones are released before the backward (nobody reads them again).
    FRESH = "fresh"
    #: Accumulating, no zero_grad follows: the backward adds into ``.grad`` as Lightning's would, in the same order.
    ACCUMULATE = "accumulate"
    #: User code runs between the step and its backward: the backward waits for the last stage's results.
    LATE = "late"

    @classmethod
    def of(cls, trainer: Trainer, module: LightningModule, batch_idx: int) -> BackwardPlan:
        if overridden(trainer, module, _CALLBACK_HOOKS, module_only=("optimizer_zero_grad",)):
            return cls.LATE
        return cls.FRESH if batch_idx % trainer.accumulate_grad_batches == 0 else cls.ACCUMULATE


#: The hooks of callbacks and modules that Lightning calls between ``training_step`` and the backward; modules
#: also have ``optimizer_zero_grad``.
_CALLBACK_HOOKS = ("on_before_zero_grad", "on_before_backward")


def overridden(
    trainer: Trainer, module: LightningModule, hooks: tuple[str, ...], module_only: tuple[str, ...] = ()
) -> list[str]:
    """``Class.hook`` for each of ``hooks`` that the module or one of the trainer's callbacks overrides, and each
    of ``module_only`` that the module overrides."""
    found = [f"{type(module).__name__}.{h}" for h in (*hooks, *module_only) if is_overridden(h, module, LightningModule)]
    return found + [
        f"{type(c).__name__}.{h}" for c in trainer.callbacks for h in hooks if is_overridden(h, c, Callback)
    ]


class HeldGradients:
    """A stage's gradients from a backward run inside the step, held from Lightning's zero_grad."""

    def __init__(self) -> None:
        self._held: list[tuple[Tensor, Tensor]] = []

    def compute(self, backward: Callable[[], None], params: list[Tensor], plan: BackwardPlan) -> None:
        """Run ``backward`` into ``params``' gradients as ``plan`` says."""
        if plan is BackwardPlan.ACCUMULATE:
            backward()
            return
        assert plan is BackwardPlan.FRESH
        for p in params:
            p.grad = None  # zero_grad would free them before the backward: free them now
        try:
            backward()
        finally:
            self._held = [(p, p.grad) for p in params if p.grad is not None]
            for p in params:
                p.grad = None

    def of(self, params: list[Tensor]) -> list[Optional[Tensor]]:
        """The held gradient of each of ``params`` (``None`` where there is none)."""
        held = {id(p): g for p, g in self._held}
        return [held.get(id(p)) for p in params]

    def replace(self, params: list[Tensor], grads: list[Optional[Tensor]]) -> None:
        self._held = [(p, g) for p, g in zip(params, grads) if g is not None]

    def discard(self) -> None:
        self._held = []

    def release(self) -> None:
        """Hand the held gradients to the parameters (after zero_grad, which may have left zeros)."""
        for p, g in self._held:
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        self._held = []


def stage_backward(
    strategy: Any, run: Any, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any
) -> Tensor:
    """Lightning's ``strategy.backward`` on one stage: the pipeline's backward, unless it already ran in the step,
    then what every stage does with its gradients before Lightning's hooks read them."""
    executor, flow = run.executor, run.flow
    if not flow.backward_ran:
        if executor.is_last:
            # The loss (already divided by accumulate_grad_batches) fills the gradients of the stage outputs ...
            loss_backward(strategy, closure_loss, optimizer, *args, **kwargs)
        else:
            before_backward(strategy, closure_loss)
        # ... which drive each micro-batch's backward, in reverse, through every stage.
        executor.backward()
        flow.start_average()
    elif not executor.is_last or executor.schedule.loss_per_microbatch:
        # It ran in the step (step.py's step 4, or per micro-batch); a last stage whose loss ran whole called these
        # hooks there.
        before_backward(strategy, closure_loss)
    flow.finish_average()  # the replicas' average, before on_after_backward and clipping read it
    flow.held.release()
    if run.tied and run.stepping:  # once per optimizer step, as the replicas' average
        run.tied.sum_gradients()
    flow.wait()
    return closure_loss


def before_backward(strategy: Any, loss: Tensor) -> Tensor:
    """Lightning's steps before a backward: the strategy's and the precision plugin's (which may scale the loss),
    and with them the on_before_backward hooks."""
    strategy.pre_backward(loss)
    return strategy.precision_plugin.pre_backward(loss, strategy.lightning_module)


def loss_backward(strategy: Any, loss: Tensor, optimizer: Optional[Optimizer] = None, *args: Any, **kwargs: Any) -> None:
    """Last stage: Lightning's backward of the step's loss, into the gradients of the stage's outputs."""
    module = strategy.lightning_module
    if optimizer is None:  # in the step (step.py's step 4): automatic optimization has exactly one
        optimizer = module.trainer.optimizers[0]
    strategy.precision_plugin.backward(before_backward(strategy, loss), module, optimizer, *args, **kwargs)


def microbatch_backward(strategy: Any, loss: Tensor) -> None:
    """Last stage, a per-micro-batch loss: one micro-batch's (scaled) loss backward, as Lightning runs a step's
    (``LightningModule.backward`` through the precision plugin); the hooks around it run once per step."""
    module = strategy.lightning_module
    strategy.precision_plugin.backward(loss, module, module.trainer.optimizers[0])


def clip_grad_by_global_norm(
    topology: Any, run: Any, device: torch.device, optimizer: Optimizer, clip_val: Union[int, float]
) -> None:
    """``clip_grad_norm_`` with the 2-norm taken over every stage's gradients."""
    if run.shards is not None and run.shards.scattered is not None:  # each replica holds its share of them
        _clip_shares(run.shards, device, clip_val)
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    local = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:  # a tied parameter's summed gradient counts once, on the first of its stages
        if run.tied is None or run.tied.counted_here(p):
            local += torch.linalg.vector_norm(p.grad, 2, dtype=torch.float32) ** 2
    if topology.k > 1:  # one replica's stages: every replica holds the same averaged gradients
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=topology.pipeline_group)
    coef = torch.clamp(clip_val / (local.sqrt() + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))


def _clip_shares(shards: Any, device: torch.device, clip_val: Union[int, float]) -> None:
    """Norm clipping of gradients split over the replicas: every rank's shares together make up every stage's
    gradients once (ties are refused with shards), so one all-reduce over all ranks gives the squared norm."""
    grads = [g for g in shards.scattered.values() if g is not None]
    local = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        local += torch.linalg.vector_norm(g, 2, dtype=torch.float32) ** 2
    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    coef = torch.clamp(clip_val / (local.sqrt() + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))


def loss_problem(output: Any, where: str) -> Optional[Exception]:
    """Why Lightning's automatic optimization would refuse ``output`` of a training step, or ``None``."""
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if isinstance(loss, Tensor):
        return None
    if output is None:
        return RuntimeError(
            f"GPipeStrategy: {where} returned None. A pipeline cannot skip a step (its other stages are already in"
            " their backward), as distributed Lightning cannot: return the loss."
        )
    what = "a dict without a 'loss' tensor" if isinstance(output, Mapping) else f"a {type(output).__name__}"
    return TypeError(
        f"GPipeStrategy: {where} returned {what}; in automatic optimization it returns the loss, or a dict with"
        " the loss under 'loss'"
    )
