"""Measuring the memory a stage holds: activations kept for backward, parameters and optimizer state."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Optional

import torch
from torch import Tensor, nn

__all__ = ["ActivationMeter", "tensor_bytes", "optimizer_state_bytes", "host_peak_bytes", "state_bytes"]

_Key = tuple[int, int, torch.dtype]


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(module: nn.Module, optimizers: Iterable[torch.optim.Optimizer], extra: Iterable[Tensor] = ()) -> int:
    """The training state a process holds: ``module``'s parameters and their gradients, the optimizers' state, and
    ``extra`` tensors (a sharded stage's own elements); the bytes of each storage once, none of the placeholders
    on the meta device."""
    params = [p for _, p in nn.Module.named_parameters(module)]  # never a refusal (integration.contract)
    tensors = [*params, *(p.grad for p in params if p.grad is not None), *extra]
    tensors += [v for o in optimizers for state in o.state.values() for v in state.values() if isinstance(v, Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if not t.is_meta}
    return sum(storages.values())


def host_peak_bytes() -> Optional[int]:
    """This process's peak resident memory (``getrusage``), or None where the platform does not report it."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor))


class _Saved:
    """What autograd stores in place of a saved tensor while the meter counts it; uncounts itself when freed."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: Tensor, meter: ActivationMeter, key: _Key) -> None:
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self) -> None:
        self.meter._drop(self.key)


class ActivationMeter:
    """Bytes of activations held for backward: what autograd saves plus the inputs kept for re-materialization.

    Counting hooks what autograd saves (``saved_tensors_hooks``), so it measures the same on CPU and
    GPU. A tensor saved twice counts once; parameters do not count. Off, it installs no hook.
    """

    def __init__(self) -> None:
        self.active = False
        self.current = 0
        self.peak = 0
        self._refs: dict[_Key, list[int]] = {}  # key -> [references, bytes]
        self._excluded: set[int] = set()

    def start(self, parameters: Iterable[Tensor]) -> None:
        self._excluded = {p.data_ptr() for p in parameters}
        self.current = self.peak = sum(size for _, size in self._refs.values())
        self.active = True

    def stop(self) -> int:
        """Stop counting new tensors (those held keep being uncounted when freed); returns the peak."""
        self.active = False
        return self.peak

    def saving(self) -> ContextManager[None]:
        """Count what autograd saves inside the block."""
        return self._hooks() if self.active else nullcontext()

    @contextmanager
    def _hooks(self) -> Iterator[None]:
        def pack(t: Tensor) -> object:
            if t.data_ptr() in self._excluded:
                return t
            key = self._add(t)
            return _Saved(t, self, key)

        def unpack(saved: object) -> Tensor:
            return saved.tensor if isinstance(saved, _Saved) else saved  # type: ignore[return-value]

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def hold(self, tensors: Iterable[Tensor]) -> list[_Key]:
        """Count ``tensors`` as held until :meth:`release` is called with the returned keys."""
        return [self._add(t) for t in tensors] if self.active else []

    def release(self, keys: Iterable[_Key]) -> None:
        for key in keys:
            self._drop(key)

    def _add(self, t: Tensor) -> _Key:
        key = (t.data_ptr(), t.numel(), t.dtype)
        ref = self._refs.setdefault(key, [0, t.numel() * t.element_size()])
        ref[0] += 1
        if ref[0] == 1:
            self.current += ref[1]
            self.peak = max(self.peak, self.current)
        return key

    def _drop(self, key: _Key) -> None:
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.current -= ref[1]
            del self._refs[key]
