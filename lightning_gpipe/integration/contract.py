"""What user code sees of a partitioned module: the whole model's answer where the pipeline can give it,
a clear error where it cannot.

While a run is under way each process holds one stage. Code that sums over ``self.parameters()`` (a
penalty in the loss, a gradient norm in a hook) would cover that stage alone, so in the step and around
the optimizer step it is refused; :func:`grad_norm` gives the whole model's gradient norms instead, and the
model summary is taken from the whole module before it is cut.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.data import _auto_add_worker_init_fn
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    BatchSizeFinder,
    ModelSummary,
    StochasticWeightAveraging,
)
from lightning.pytorch.utilities.model_summary import summarize
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gpipe.checkpointing.state import unwrapped
from lightning_gpipe.errors import StageError
from lightning_gpipe.model.partition import AbsentLayer, absent_parameters_refused
from lightning_gpipe.parallel.topology import Topology
from lightning_gpipe.patching import patched, shadow, unshadow

__all__ = [
    "StageError",
    "ClosureOnce",
    "LastStageSaved",
    "grad_norm",
    "parameters_refused",
    "parameters_refused_in_end_hooks",
    "refuse_callbacks",
    "refuse_closure_optimizers",
    "stage_parameters",
    "frozen_summaries",
    "seed_workers_alike",
]


@contextmanager
def parameters_refused(module: LightningModule, seq: nn.Module, where: str) -> Iterator[None]:
    """Make ``parameters()`` and ``named_parameters()`` of ``module``, of its pipelined Sequential ``seq`` and of the
    layers other stages hold raise inside the block; the layers this stage holds still answer for themselves.

    ``where`` names the code that runs in the block, for the message.
    """

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _parameters_read(where)

    with ExitStack() as stack:
        for owner in (module, seq):
            stack.enter_context(patched(owner, "parameters", refuse))
            stack.enter_context(patched(owner, "named_parameters", refuse))
        stack.enter_context(absent_parameters_refused(where))
        yield


#: The hooks whose code logs what a batch or an epoch ended with: a value taken over ``self.parameters()`` there
#: would reach the logger or a checkpoint from global rank 0 as its stage's alone.
_END_HOOKS = re.compile(r"on_(train|validation|test|predict)_(batch|epoch)_end")


@contextmanager
def parameters_refused_in_end_hooks(module: LightningModule, seq: nn.Module) -> Iterator[None]:
    """For a whole run: ``parameters()`` and ``named_parameters()`` of ``module`` and of ``seq`` raise inside the
    batch-end and epoch-end hooks (the module's and every callback's, which Lightning names in
    ``module._current_fx_name``); elsewhere they answer for this stage, as ``configure_optimizers`` needs."""

    def guarded(owner: nn.Module, name: str) -> Callable[..., Any]:
        method = getattr(type(owner), name)

        def read(*args: Any, **kwargs: Any) -> Any:
            hook = module._current_fx_name
            if hook is not None and _END_HOOKS.fullmatch(hook):
                raise _parameters_read(f"code run in {hook} (the module's or a callback's)")
            return method(owner, *args, **kwargs)

        return read

    with ExitStack() as stack:
        for owner in (module, seq):
            for name in ("parameters", "named_parameters"):
                stack.enter_context(patched(owner, name, guarded(owner, name)))
        yield


def _parameters_read(where: str) -> StageError:
    return StageError(
        f"GPipeStrategy: {where} read the whole model's parameters (self.parameters(), self.named_parameters(),"
        " or the pipelined Sequential's). Under the pipeline each process holds one stage, so a sum over them"
        " (a penalty in the loss, a norm in a log) would cover that stage alone. For an L2 penalty use the"
        " optimizer's weight_decay; for gradient norms use `lightning_gpipe.grad_norm(self, norm_type)`, which"
        " covers every stage; for the device or dtype use self.device and self.dtype."
    )


try:  # Lightning 2.6's EMA and weight-averaging callbacks
    from lightning.pytorch.callbacks import WeightAveraging

    _AVERAGING: tuple[type, ...] = (StochasticWeightAveraging, WeightAveraging)
except ImportError:
    _AVERAGING = (StochasticWeightAveraging,)

#: Callbacks that cannot run on a pipeline of several stages, and why.
_REFUSED_CALLBACKS: tuple[tuple[tuple[type, ...], str], ...] = (
    (_AVERAGING, "it copies the whole module before the pipeline cuts it, then pairs the copy's parameters with one"
     " stage's by position. Average weights after training, on the whole model that global rank 0 holds then."),
    ((BaseFinetuning,), "BaseFinetuning.unfreeze_and_add_param_group adds a parameter group only on the stages that"
     " hold the layers it unfreezes, so the stages' optimizers no longer match each other nor the whole module's,"
     " and no checkpoint can be written or resumed. Put the layers to unfreeze in a parameter group of their own in"
     " configure_optimizers (with their own learning rate) and set requires_grad in a hook (on_train_epoch_start):"
     " an optimizer skips parameters without gradients."),
    ((BatchSizeFinder,), "Lightning's batch-size finder (Tuner(trainer).scale_batch_size adds it) runs on no"
     " distributed strategy: every rank would restore its trials from a temporary checkpoint of its own name, and"
     " an out-of-memory on one stage must shrink every stage's batch alike. Find the batch size on one device, or"
     " try sizes in separate runs."),
)  # fmt: skip


def refuse_callbacks(callbacks: Sequence[Callback]) -> None:
    """Raise, naming them, if ``callbacks`` hold any that a pipeline of several stages cannot run."""
    for kinds, why in _REFUSED_CALLBACKS:
        names = [type(c).__name__ for c in callbacks if isinstance(c, kinds)]
        if names:
            raise ValueError(f"GPipeStrategy cannot run {', '.join(names)}: {why}")


def refuse_closure_optimizers(optimizers: Sequence[Optimizer]) -> None:
    """Refuse optimizers that reduce over all their parameters and decide from that how often to run the closure:
    on a pipeline each stage's copy would see its own stage's parameters only."""
    for optimizer in optimizers:
        if isinstance(unwrapped(optimizer), torch.optim.LBFGS):
            raise ValueError(
                "GPipeStrategy cannot train with LBFGS: it takes dot products over all the parameters it optimizes and"
                " its line search decides how often to run the closure (each a forward and backward), so on a"
                " pipeline every stage would run its own LBFGS on its own stage, and the stages would disagree on how"
                " many forwards to run. Use a first-order optimizer (SGD, Adam, ...), or train LBFGS on one device."
            )


class ClosureOnce:
    """Lightning's closure (the step's forward and backward) for an optimizer that must call it exactly once per
    step: every stage runs one forward and backward per batch, so a second call could only wait for a stage that
    never joins it."""

    def __init__(self, closure: Callable[[], Any], optimizer: Any) -> None:
        self.closure, self.optimizer, self.calls = closure, optimizer, 0

    def __call__(self) -> Any:
        self.calls += 1
        if self.calls > 1:
            name = type(unwrapped(self.optimizer)).__name__
            raise StageError(
                f"GPipeStrategy: {name}.step called its closure a second time in one step. Under"
                " the pipeline each stage runs one forward and backward per batch, and a second call decided by one"
                " stage's own values would leave the others behind: use an optimizer that calls the closure once."
            )
        return self.closure()


class LastStageSaved:
    """What the module's ``on_save_checkpoint`` sets, taken from the last stage into the checkpoint global rank 0
    writes: every stage runs the hook, but state the step's code keeps after ``self(x)`` exists on the last alone."""

    def __init__(self) -> None:
        self.saved: dict[str, Any] = {}

    def watch(self, module: LightningModule) -> None:
        """Note the entries the module's next ``on_save_checkpoint`` sets. Called as Lightning begins a checkpoint
        (its first call into the strategy), on every rank; the hook's call undoes it."""
        unshadow(module, "on_save_checkpoint")  # left by a save that failed before the hook
        hook = module.on_save_checkpoint

        def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
            unshadow(module, "on_save_checkpoint")
            before = dict(checkpoint)
            hook(checkpoint)
            self.saved = {k: v for k, v in checkpoint.items() if k not in before or before[k] is not v}

        self.saved = {}
        shadow(module, "on_save_checkpoint", on_save_checkpoint)

    def take(self, checkpoint: dict[str, Any], topology: Topology, module_name: str) -> None:
        """Global rank 0 puts the last stage's entries into ``checkpoint``; the last stage of the first replica
        sends them (point to point), or, if they cannot travel, an error that both raise."""
        saved, self.saved = self.saved, {}
        if topology.k == 1 or topology.replica != 0 or topology.stage not in (0, topology.k - 1):
            return
        if topology.stage == topology.k - 1:
            try:
                pickle.dumps(saved)
            except Exception as error:  # rank 0 waits for it: send the error instead
                failure = TypeError(
                    f"GPipeStrategy: what {module_name}.on_save_checkpoint put into the checkpoint cannot be sent to"
                    f" global rank 0, which writes it ({error}); save tensors and plain Python values"
                )
                dist.send_object_list([failure], dst=0)
                raise failure from error
            dist.send_object_list([apply_to_collection(saved, Tensor, lambda t: t.detach().cpu())], dst=0)
            return
        box: list[Any] = [None]
        dist.recv_object_list(box, src=topology.rank_of(topology.k - 1))
        if isinstance(box[0], TypeError):
            raise box[0]
        checkpoint.update(box[0])


def stage_parameters(module: nn.Module) -> list[Tensor]:
    """The parameters this rank holds, for the strategy's own use: never refused."""
    return [p for _, p in nn.Module.named_parameters(module)]


def grad_norm(module: nn.Module, norm_type: Union[float, int, str], group_separator: str = "/") -> dict[str, Tensor]:
    """Lightning's `lightning.pytorch.utilities.grad_norm` over the whole model, on every stage.

    The same keys and values as Lightning's function on the unpartitioned module: each parameter's gradient
    norm and their total. Under a pipeline, pass the LightningModule, and every rank must call it (it gathers each
    stage's norms), as they all do in ``on_before_optimizer_step``; elsewhere it is Lightning's function.
    """
    norm_type = float(norm_type)
    if norm_type <= 0:
        raise ValueError(f"`norm_type` must be a positive number or 'inf' (infinity norm). Got {norm_type}")
    prefix = f"grad_{norm_type}_norm"
    topology = _pipeline(module)
    aliases = module.trainer.strategy.tied_names if topology else {}  # type: ignore[union-attr]
    local = {  # a parameter tied across stages under its single-device name: once in the gathered norms
        f"{prefix}{group_separator}{aliases.get(name, name)}": p.grad.data.norm(norm_type)
        for name, p in nn.Module.named_parameters(module)  # the module's own method, never a refusal
        if p.grad is not None
    }
    norms = local
    if topology is None and any(isinstance(m, AbsentLayer) for m in module.modules()):
        raise StageError(
            f"GPipeStrategy: grad_norm of a {type(module).__name__} that other stages hold part of would cover this"
            " stage alone; pass the LightningModule itself: grad_norm(self, norm_type)"
        )
    if topology is not None:  # one replica's stages: the replicas hold the same averaged gradients
        parts: list[Any] = [None] * topology.k
        dist.all_gather_object(parts, {key: value.cpu() for key, value in local.items()}, group=topology.pipeline_group)
        device = next(iter(local.values())).device if local else torch.device("cpu")
        norms = {key: value.to(device) for part in parts for key, value in part.items()}
    if norms:
        norms[f"{prefix}_total"] = torch.tensor([float(v) for v in norms.values()]).norm(norm_type)
    return norms


def _pipeline(module: nn.Module) -> Optional[Topology]:
    """The topology of the pipeline of several stages that trains ``module`` (a GPipeStrategy's, once its processes
    are connected), else ``None``; read from the strategy without importing it, which imports this module."""
    trainer = getattr(module, "_trainer", None)
    topology = getattr(getattr(trainer, "strategy", None), "_topology", None)
    return topology if isinstance(topology, Topology) and topology.k > 1 else None


@dataclass
class _FrozenSummary:
    """A model summary taken before the module was cut, with what Lightning's ``ModelSummary`` callback reads."""

    data: list[tuple[str, list[str]]]
    total_parameters: int
    trainable_parameters: int
    model_size: float
    total_training_modes: dict[str, int]
    total_flops: int

    def _get_summary_data(self) -> list[tuple[str, list[str]]]:
        return self.data


@contextmanager
def frozen_summaries(trainer: Trainer, module: LightningModule, example_input: bool) -> Iterator[None]:
    """Inside the block, the trainer's model-summary callbacks show ``module`` as it is now, whole.

    ``example_input``: run ``example_input_array`` through it for the input and output sizes (one rank does).
    """
    callbacks = [c for c in trainer.callbacks if isinstance(c, ModelSummary) and c._max_depth]
    with ExitStack() as stack:
        for callback in callbacks:
            frozen = _freeze(module, callback._max_depth, example_input)
            stack.enter_context(patched(callback, "_summary", lambda *args, frozen=frozen: frozen))
        yield


def _freeze(module: LightningModule, max_depth: int, example_input: bool) -> _FrozenSummary:
    kept = module.example_input_array
    if not example_input:
        module.example_input_array = None
    try:
        summary = summarize(module, max_depth=max_depth)
        data = summary._get_summary_data()
    finally:
        module.example_input_array = kept
    return _FrozenSummary(
        data,
        summary.total_parameters,
        summary.trainable_parameters,
        summary.model_size,
        summary.total_training_modes,
        getattr(summary, "total_flops", 0),
    )


def seed_workers_alike(dataloader: Any, rank: int) -> Any:
    """Seed ``dataloader``'s workers as Lightning does after ``seed_everything(workers=True)``, but with ``rank``
    (the data-parallel rank) in place of the global rank, so every stage draws the same augmentations."""
    _auto_add_worker_init_fn(dataloader, rank)  # only where seeding is asked for and no worker_init_fn is set
    return dataloader

