"""Building the model without storage, then giving each rank only its own stage, initialised exactly.

Under :class:`DeferredInit` the model is built on the meta device, so no rank allocates it, while every tensor
operation of its construction (``nn.Linear``'s own initialisation, an ``apply(init_fn)`` pass, a buffer's fill)
is recorded. When the recording ends, the random draws of the construction run once more on scratch tensors, one
at a time, from the random state it started in: the generator ends where building the model on the CPU would
have left it, and the state before each draw is kept.

:meth:`DeferredInit.materialize` later replays, for the layers one stage keeps, only the operations that write
their tensors (and what those read), each draw from its kept state: the stage's initial values are those of
single-device construction, bit for bit, and no rank ever holds more than its stage plus one scratch tensor.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from lightning_gpipe.errors import DeferredInitError
from lightning_gpipe.patching import patched

__all__ = ["DeferredInit", "DeferredInitError", "has_meta_tensors", "storage_id"]

_META = torch.device("meta")


@dataclass
class _Op:
    func: Any  # an aten overload
    args: tuple
    kwargs: dict
    outputs: list[Tensor]  # the tensors it returned
    replay: bool = True  # False: built under empty_init=True, its values are not wanted
    random: Optional[Tensor] = None  # for a draw: the CPU generator's state before it, in single-device order


def storage_id(t: Tensor) -> int:
    """An identity of ``t``'s storage, shared by every view of it."""
    return t.untyped_storage()._cdata


def _tensors(tree: Any) -> list[Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, Tensor)]


def _draws(func: Any) -> bool:
    return torch.Tag.nondeterministic_seeded in func.tags


def _writes(op: _Op) -> list[Tensor]:
    """The tensors an operation writes: its mutated arguments (in-place and ``out=``), and what it returns."""
    written = []
    for i, argument in enumerate(op.func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            written += _tensors(op.args[i] if i < len(op.args) else op.kwargs.get(argument.name))
    return written + op.outputs


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list[_Op]) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _draws(func) and any(t.device != _META for t in _tensors((args, kwargs, out))):
            raise DeferredInitError(
                f"building the model drew random numbers on a real device ({func}); under GPipeStrategy's deferred"
                " construction build every tensor on the default device, so that each stage can be initialised as"
                " single-device construction would"
            )
        self.ops.append(_Op(func, args, kwargs, _tensors(out)))
        return out


class _Constants(TorchFunctionMode):
    """``torch.tensor(data)`` keeps its values for the replay: made on the CPU, then copied to the meta device (a
    copy the recorder sees, from a real tensor)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") in (None, _META, "meta"):
            return func(*args, **{**kwargs, "device": "cpu"}).to(_META)
        return func(*args, **kwargs)


class DeferredInit:
    """Records a model's construction on the meta device; materializes any part of it later."""

    def __init__(self) -> None:
        self.ops: list[_Op] = []
        self.skipped_by: Optional[str] = None  # a library that may have skipped its initialisation unrecorded
        self._recordings: list[tuple[int, int, Tensor]] = []  # each replayed recording's ops and starting RNG state

    @contextmanager
    def recording(self, replay: bool = True) -> Iterator[None]:
        """Build on the meta device inside the block. ``replay=False`` leaves what is built there uninitialised
        when materialized (for weights loaded from a checkpoint)."""
        start, first = torch.get_rng_state(), len(self.ops)
        imported = _TRANSFORMERS in sys.modules
        with torch.device(_META), _Constants(), _Recorder(self.ops), _libraries_initialise():
            yield
        if replay and not imported and _TRANSFORMERS in sys.modules:  # too late to let it initialise
            self.skipped_by = "transformers"
        for op in self.ops[first:]:
            op.replay = replay
        torch.set_rng_state(start)
        if replay:  # uninitialised, it draws nothing: as construction whose init functions are skipped
            self._recordings.append((first, len(self.ops), start))
            self._advance(self.ops[first:])

    @property
    def starts(self) -> list[Tensor]:
        """The CPU generator's state where each replayed recording began."""
        return [start for _, _, start in self._recordings]

    def restart(self, starts: Sequence[Tensor]) -> None:
        """Draw each recording's values as if it had begun in the state ``starts`` gives it (another rank's
        :attr:`starts`), so every rank materializes the same model."""
        if len(starts) != len(self._recordings):
            raise DeferredInitError(
                f"this rank built the model in {len(self._recordings)} recorded passes, global rank 0 in {len(starts)}:"
                " build it the same way on every rank"
            )
        for index, ((first, end, own), start) in enumerate(zip(self._recordings, starts)):
            if torch.equal(own, start):
                continue
            self._recordings[index] = (first, end, start)
            state = torch.get_rng_state()
            torch.set_rng_state(start)
            try:
                self._advance(self.ops[first:end])
            finally:
                torch.set_rng_state(state)

    def _advance(self, ops: list[_Op]) -> None:
        """Draw what single-device construction would have drawn, on scratch tensors one at a time, keeping the
        generator's state before each draw."""
        scratch = _Scratch()
        with torch.no_grad():
            for op in ops:
                if not _draws(op.func):
                    continue
                op.random = torch.get_rng_state()
                args, kwargs = scratch.stand_ins((op.args, op.kwargs))
                op.func(*args, **kwargs)

    def materialize(self, modules: Iterable[nn.Module]) -> None:
        """Give the parameters and buffers of ``modules`` (meta tensors built under :meth:`recording`) storage on
        the CPU and their initial values; the rest of the model stays on the meta device."""
        modules = list(modules)
        if self.skipped_by is not None:
            raise DeferredInitError(
                "transformers skips its models' weight initialisation when it sees the meta device, and its models"
                " were imported while the model was being built, so GPipeStrategy could not have that initialisation"
                " run: the stages would start from other weights than single-device construction gives. Import them"
                " before building the model (`from transformers import GPT2Model` at the top of the script; a bare"
                " `import transformers` loads them only when first used), or build the model whole"
                " (trainer.init_module(empty_init=False)), or load its weights (GPipeStrategy(weights=...))."
            )
        kept = {storage_id(t) for m in modules for t in [*m.parameters(), *m.buffers()] if t.device == _META}
        real: dict[int, Tensor] = {}
        with torch.no_grad():
            self._replay(self._needed(kept), real)
            created = {storage_id(t): t for op in reversed(self.ops) for t in op.outputs}  # the first op's wins
            for storage in kept - set(real):  # not replayed: uninitialised
                if storage not in created:
                    raise DeferredInitError("a meta tensor that was not built under GPipeStrategy's deferred construction")
                t = created[storage]
                real[storage] = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="cpu")
        swapped: dict[int, nn.Parameter] = {}
        for module in modules:
            for m in module.modules():
                for name, p in list(m._parameters.items()):
                    if p is not None and p.device == _META:
                        if id(p) not in swapped:  # a parameter shared within the stage stays one parameter
                            swapped[id(p)] = nn.Parameter(_real(p, real), requires_grad=p.requires_grad)
                        m._parameters[name] = swapped[id(p)]
                for name, b in list(m._buffers.items()):
                    if b is not None and b.device == _META:
                        m._buffers[name] = _real(b, real)

    def _needed(self, kept: set[int]) -> list[bool]:
        """Which operations the kept storages depend on: those that write them, and what those read, back to front."""
        needed_storages = set(kept)
        needed = [False] * len(self.ops)
        for index in range(len(self.ops) - 1, -1, -1):
            op = self.ops[index]
            if op.replay and any(storage_id(t) in needed_storages for t in _writes(op) if t.device == _META):
                needed[index] = True
                needed_storages.update(storage_id(t) for t in _tensors((op.args, op.kwargs)) if t.device == _META)
        return needed

    def _replay(self, needed: list[bool], real: dict[int, Tensor]) -> None:
        state = torch.get_rng_state()
        try:
            for op, wanted in zip(self.ops, needed):
                if not wanted:
                    continue
                if op.random is not None:
                    torch.set_rng_state(op.random)
                args, kwargs = tree_map(lambda x: _real(x, real) if _is_meta(x) else _on_cpu(x), (op.args, op.kwargs))
                out = op.func(*args, **kwargs)
                for meta, value in zip(op.outputs, _tensors(out)):
                    real.setdefault(storage_id(meta), value)
        finally:
            torch.set_rng_state(state)


_TRANSFORMERS = "transformers.modeling_utils"


@contextmanager
def _libraries_initialise() -> Iterator[None]:
    """Let libraries that skip their own weight initialisation on the meta device run it, to be recorded.

    transformers' ``PreTrainedModel.init_weights`` skips ``initialize_weights`` when
    ``modeling_utils.get_torch_context_manager_or_global_device()`` says meta; on one device it runs, drawing every
    weight anew. Inside the recording it answers "no device given", so the draws run on the meta tensors and are
    recorded in the order single-device construction makes them (tested with transformers 5.24; where that function
    is missing nothing is changed).
    """
    utils = sys.modules.get(_TRANSFORMERS)
    probe = getattr(utils, "get_torch_context_manager_or_global_device", None)
    if probe is None:
        yield
        return
    with patched(utils, "get_torch_context_manager_or_global_device", lambda: None):
        yield


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.device == _META for t in [*module.parameters(), *module.buffers()])


def _is_meta(x: Any) -> bool:
    return isinstance(x, Tensor) and x.device == _META


def _on_cpu(x: Any) -> Any:
    return torch.device("cpu") if isinstance(x, torch.device) and x.type == "meta" else x


def _real(meta: Tensor, real: dict[int, Tensor]) -> Tensor:
    """``meta``'s real counterpart: the same view of its storage's real tensor."""
    base = real.get(storage_id(meta))
    if base is None:
        raise DeferredInitError(f"a tensor of shape {list(meta.shape)} is read before anything built it")
    if base.dtype != meta.dtype:
        raise DeferredInitError(f"a {meta.dtype} view of a {base.dtype} tensor cannot be replayed")
    return base.as_strided(meta.size(), meta.stride(), meta.storage_offset())


class _Scratch:
    """Zero-filled CPU stand-ins for meta tensors, laid out as they are (how much a draw takes depends on the
    layout). One buffer per dtype serves every draw: a fresh tensor per draw, between the small states kept, would
    fragment the heap until it held the whole model."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, Tensor] = {}

    def stand_ins(self, tree: Any) -> Any:
        offsets: dict[int, int] = {}  # storage -> where its stand-in starts in its dtype's buffer
        ends: dict[torch.dtype, int] = {}
        for t in _tensors(tree):
            if _is_meta(t) and storage_id(t) not in offsets:
                offsets[storage_id(t)] = ends.get(t.dtype, 0)
                ends[t.dtype] = offsets[storage_id(t)] + t.untyped_storage().nbytes() // t.element_size()
        for dtype, end in ends.items():
            if dtype not in self._buffers or self._buffers[dtype].numel() < end:
                self._buffers.pop(dtype, None)
                self._buffers[dtype] = torch.zeros(end, dtype=dtype)
            else:
                self._buffers[dtype][:end].zero_()

        def stand_in(x: Any) -> Any:
            if isinstance(x, torch.device):
                return _on_cpu(x)
            if not _is_meta(x):
                return x
            return self._buffers[x.dtype].as_strided(x.size(), x.stride(), offsets[storage_id(x)] + x.storage_offset())

        return tree_map(stand_in, tree)
