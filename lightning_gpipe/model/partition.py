"""Finding the pipelined ``nn.Sequential`` and cutting it into K contiguous stages."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_gpipe.errors import AbsentLayerError, BalanceError
from lightning_gpipe.model.deferred import storage_id
from lightning_gpipe.schedule.split import optimal_split, stage_owners, uniform_split

__all__ = [
    "AbsentLayer",
    "AbsentLayerError",
    "Balance",
    "BalanceError",
    "check_forward",
    "check_stages_have_parameters",
    "check_stages_optimized",
    "find_sequential",
    "keep_stage",
    "live_layers",
    "rank_layers",
    "release_absent",
    "resolve_balance",
    "stage_layers",
    "stage_view",
    "absent_parameters_refused",
]

#: Set while user code must not read parameters (see :func:`absent_parameters_refused`): names that code.
_REFUSING: ContextVar[Optional[str]] = ContextVar("gpipe_refusing", default=None)
#: Set while the strategy itself reads a cut module (see :func:`stage_view`).
_STAGE_VIEW: ContextVar[bool] = ContextVar("gpipe_stage_view", default=False)

#: Layer counts per stage, or a rule: ``"uniform"`` (by layer count), ``"params"`` (by parameter count),
#: ``"time"`` or ``"memory"`` (by per-layer costs measured on a sample, see :mod:`lightning_gpipe.model.profile`).
Balance = Union[str, Sequence[int]]
BALANCE_RULES = ("uniform", "params", "time", "memory")
PROFILED_RULES = ("time", "memory")


class AbsentLayer(nn.Module):
    """Stands in for a layer that another stage runs: it holds nothing, and using it raises an error that says so.

    It keeps the layer's place in the Sequential, so the kept layers keep their names (``"5.weight"``) and
    ``state_dict`` keys stay those of the unpartitioned module. It also keeps the layer itself, out of sight (not a
    submodule), once :func:`release_absent` has freed its tensors' storage: when the layer comes back, only its
    tensors travel, into the very module objects the user built (see :mod:`lightning_gpipe.model.assemble`).
    """

    def __init__(self, index: int, kind: str, stage: int, layer: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.index, self.kind, self.stage = index, kind, stage
        self.after_run = False  # set when a run ends and this process keeps only its stage
        self.__dict__["held"] = layer  # the layer, not registered: no parameters, no state, no device moves
        self.__dict__["freed"] = []  # (tensor, bytes) whose storage release_absent freed

    def __getstate__(self) -> dict[str, Any]:
        # A copy (pickled, deep-copied) stands in without the layer: its tensors' storage is freed.
        return {**super().__getstate__(), "held": None, "freed": []}

    def message(self, what: str) -> str:
        return (
            f"GPipeStrategy: {what} layer {self.index} ({self.kind}) of the pipelined Sequential, which stage"
            f" {self.stage} holds, not this process. Each process holds only its own stage's layers while a run is"
            " under way; the step's `self(x)` runs the whole pipeline, and after a run the whole model is on global"
            " rank 0 (GPipeStrategy(gather_model=True))."
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise AbsentLayerError(
            self.message("the code called") + " In a step, call the module (`self(x)`) rather than its layers."
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            raise AbsentLayerError(self.message(f"the code read {name!r} of")) from None

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        where = _REFUSING.get()
        if where is not None:  # a sum over these would silently leave out another stage's parameters
            raise AbsentLayerError(self.message(f"{where} read the parameters of"))
        return super().named_parameters(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        if self.after_run and not _STAGE_VIEW.get():  # this process's module is not the whole model: say so
            raise AbsentLayerError(self.message("the code asked for the state of"))
        return super().state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.kind} on stage {self.stage}"


def find_sequential(module: nn.Module, name: Optional[str] = None) -> tuple[str, nn.Sequential]:
    """The ``nn.Sequential`` to pipeline: the one named ``name``, or the only Sequential child holding every parameter."""
    if name is None:
        candidates = [(n, c) for n, c in module.named_children() if isinstance(c, nn.Sequential)]
        if len(candidates) != 1:
            found = ", ".join(repr(n) for n, _ in candidates) or "none"
            raise ValueError(
                f"GPipeStrategy pipelines one `nn.Sequential` of {type(module).__name__}, and could not pick it:"
                f" Sequential children found: {found}. Pass `GPipeStrategy(sequential='<attribute name>')`."
            )
        name, seq = candidates[0]
    else:
        try:
            seq = module.get_submodule(name)
        except AttributeError:
            seq = None
        if not isinstance(seq, nn.Sequential):
            raise ValueError(
                f"GPipeStrategy(sequential={name!r}): {type(module).__name__}.{name} must be an `nn.Sequential`,"
                f" found {type(seq).__name__}."
            )
    inside = {id(p) for p in seq.parameters()}
    outside = [n for n, p in module.named_parameters() if id(p) not in inside]
    if outside:
        shown = ", ".join(outside[:5]) + (", ..." if len(outside) > 5 else "")
        raise ValueError(
            f"GPipeStrategy needs every parameter of {type(module).__name__} inside the pipelined Sequential"
            f" {name!r}, but {len(outside)} are outside it: {shown}. Move those layers into the Sequential."
        )
    return name, seq


class _Probe(nn.Module):
    """Stands in for the Sequential to see what ``forward`` feeds it and does with its output."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Any = None
        self.output = torch.empty(0)

    def forward(self, x: Any) -> torch.Tensor:
        self.seen = x
        return self.output


def check_forward(module: nn.Module, name: str, x: Any) -> None:
    """Raise unless ``module.forward(x)`` is exactly ``module.<name>(x)``, which the pipeline computes instead."""
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name)
    seq, probe = parent._modules[attr], _Probe()
    parent._modules[attr] = probe
    try:
        output = type(module).forward(module, x)
    except Exception:
        output = None
    finally:
        parent._modules[attr] = seq
    if probe.seen is not x or output is not probe.output:
        cls = type(module).__name__
        raise ValueError(
            f"GPipeStrategy runs {cls}.{name} in place of {cls}.forward, so forward(x) must be exactly"
            f" `return self.{name}(x)`; {cls}.forward does something else with its input or output."
            " Move that work into the Sequential's layers or into the step."
        )


def resolve_balance(balance: Balance, seq: nn.Sequential, k: int, chunks: int = 1) -> list[int]:
    """Layer counts per stage for ``k`` ranks of ``chunks`` stages each (K*v stages) of ``seq``, each stage at least
    one layer."""
    n, ranks = len(seq._modules), k
    k *= chunks
    if k > n:
        raise BalanceError(f"cannot cut {n} layers into {k} stages: a pipeline needs at least one layer per stage")
    if isinstance(balance, str):
        if balance == "uniform":
            return uniform_split(n, k)
        if balance == "params":
            layers = list(seq._modules.values())
            if any(isinstance(layer, AbsentLayer) for layer in layers):
                raise BalanceError(
                    "balance='params' needs every layer, but this Sequential was already partitioned;"
                    " pass the balance as a list of layer counts"
                )
            return optimal_split([sum(p.numel() for p in layer.parameters()) for layer in layers], k)
        raise BalanceError(
            f"balance must be 'uniform', 'params' or a list of layer counts here ('time' and 'memory' are measured"
            f" by GPipeStrategy), got {balance!r}"
        )
    counts = list(balance)
    if len(counts) != k:
        cut = "devices x nodes" + (f" x virtual_stages: {ranks} x {chunks}" if chunks > 1 else "")
        raise BalanceError(f"balance {counts} has {len(counts)} stages, but the pipeline has {k} ({cut})")
    if any(not isinstance(c, int) or c < 1 for c in counts):
        raise BalanceError(f"balance {counts} must hold positive integers: every stage needs at least one layer")
    if sum(counts) != n:
        raise BalanceError(f"balance {counts} sums to {sum(counts)}, but the Sequential has {n} layers")
    return counts


def stage_layers(balance: Sequence[int], stage: int) -> range:
    """Indices of the layers that ``stage`` runs."""
    start = sum(balance[:stage])
    return range(start, start + balance[stage])


def rank_layers(balance: Sequence[int], rank: int, k: int) -> list[int]:
    """Indices of the layers that ``rank`` of ``k`` runs: its stages ``rank``, ``rank + k``, ... of ``balance``'s
    (one stage per rank when ``balance`` has ``k`` entries; v each under an interleaved schedule)."""
    return [i for stage in range(rank, len(balance), k) for i in stage_layers(balance, stage)]


def keep_stage(seq: nn.Sequential, balance: Sequence[int], stage: int, k: Optional[int] = None) -> list[nn.Module]:
    """Free every layer of ``seq`` that rank ``stage`` of ``k`` (by default one per entry of ``balance``) does not
    run, in place, and return the kept ones in order.

    Each freed layer is replaced by an :class:`AbsentLayer` that names the rank holding it.
    """
    k = len(balance) if k is None else k
    layers = rank_layers(balance, stage, k)
    owners = [owner % k for owner in stage_owners(balance)]
    kept = []
    for index, (name, layer) in enumerate(list(seq._modules.items())):
        if index in layers:
            if isinstance(layer, AbsentLayer):
                raise BalanceError(f"layer {index} belongs to this stage, but an earlier partitioning freed it here")
            kept.append(layer)
        elif not isinstance(layer, AbsentLayer):
            seq._modules[name] = AbsentLayer(index, type(layer).__name__, owners[index], layer)
    return kept


def release_absent(seq: nn.Sequential, live: set[int]) -> None:
    """Free the storage of every tensor the absent layers of ``seq`` hold, except those whose storage is in
    ``live`` (storage ids, :func:`storage_id`, of what the module still uses: a tied parameter, a layer the user
    also keeps elsewhere). The tensors keep their shapes, and the layers everything else."""
    for absent in seq._modules.values():
        if not isinstance(absent, AbsentLayer) or absent.held is None:
            continue
        seen = set()
        for t in [*absent.held.parameters(), *absent.held.buffers()]:
            storage = t.untyped_storage()
            key = storage_id(t)
            if t.device.type == "meta" or key in live or key in seen or storage.nbytes() == 0:
                continue
            seen.add(key)
            absent.freed.append((t, storage.nbytes()))
            storage.resize_(0)


def live_layers(seq: nn.Sequential) -> list[tuple[int, nn.Module]]:
    """The layers of ``seq`` this process holds, with their indices."""
    return [(i, layer) for i, layer in enumerate(seq._modules.values()) if not isinstance(layer, AbsentLayer)]


def check_stages_have_parameters(balance: Sequence[int], layers: list[nn.Module]) -> None:
    """Raise if a stage would hold no trainable parameter: its optimizer would be empty."""
    for stage in range(len(balance)):
        indices = stage_layers(balance, stage)
        stage_modules = [layers[i] for i in indices]
        if not any(p.requires_grad for layer in stage_modules for p in layer.parameters()):
            kinds = ", ".join(type(layer).__name__ for layer in stage_modules)
            raise BalanceError(
                f"stage {stage} (layers {indices.start}..{indices.stop - 1}: {kinds}) has no trainable parameters,"
                f" so its optimizer would be empty; balance {list(balance)} needs changing so every stage holds"
                " a layer with parameters"
            )


def check_stages_optimized(
    balance: Sequence[int], seq_name: str, layers: list[nn.Module], optimized: set[str], aliases: Mapping[str, str] = {}
) -> None:
    """Raise if ``configure_optimizers`` (which optimizes the parameters named in ``optimized``) gives some stage
    none of its parameters: that stage's optimizer would be empty. ``aliases`` name tied parameters as
    ``optimized`` does."""
    for stage in range(len(balance)):
        indices = stage_layers(balance, stage)
        names = {f"{seq_name}.{i}.{n}" for i in indices for n, _ in layers[i].named_parameters(remove_duplicate=False)}
        names = {aliases.get(n, n) for n in names}
        if not names & optimized:
            shown = sorted(optimized)
            listed = ", ".join(shown[:4]) + (", ..." if len(shown) > 4 else "")
            raise BalanceError(
                f"configure_optimizers optimizes {len(shown)} parameters ({listed}), none of them in stage {stage}"
                f" (layers {indices.start}..{indices.stop - 1}), so that stage's optimizer would be empty; with"
                f" balance {list(balance)}, every stage must hold a parameter the optimizer trains: choose another"
                " balance or optimize more of the model"
            )


def stage_view() -> AbstractContextManager[None]:
    """Let the strategy read the state of this process's stage after a run, where user code gets an error."""
    return _set(_STAGE_VIEW, True)


def absent_parameters_refused(where: str) -> AbstractContextManager[None]:
    """Inside the block, reading the parameters of an absent layer raises, naming ``where``."""
    return _set(_REFUSING, where)


@contextmanager
def _set(var: ContextVar[Any], value: Any) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)
