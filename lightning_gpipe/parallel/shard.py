"""One stage's training state split over its D data-parallel replicas (ZeRO): each steps 1/D of every parameter.

Replica ``r`` owns elements ``[r*c, (r+1)*c)`` of every flattened parameter of ``n`` elements, ``c = ceil(n / D)``
(the last owners' share may be shorter or empty). It holds the optimizer's state for those elements alone and
steps them alone, on the gradient the replicas averaged; then the replicas gather the stepped elements, so every
replica's parameters are whole again. With ``full``, a replica keeps only its own elements between steps: the
rest of the parameters' storage and the gradients are freed after the optimizer step, and the parameters are
gathered whole before their next use, once per step however many micro-batches and accumulated batches it has.
Meanwhile the module holds a placeholder on the meta device in each parameter's place, so code that reads a
parameter there fails loudly (``Tensor.item() cannot be called on meta tensors``) instead of reading freed memory.

Splitting a parameter's elements keeps the optimizer's arithmetic only when its step is elementwise; the
optimizers allowed are listed in :data:`ELEMENTWISE`, with the state entries that are not per element.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gpipe.instrument.timeline import Timeline
from lightning_gpipe.parallel.replicas import buckets
from lightning_gpipe.patching import patched

__all__ = ["SHARD_MODES", "ELEMENTWISE", "StageShards", "GradientScatter", "check_elementwise"]

#: ``none``: every replica holds the whole stage (today's replicas); ``optimizer``: the optimizer state split
#: (ZeRO-1); ``full``: parameters and gradients too, between steps.
SHARD_MODES = ("none", "optimizer", "full")

#: Optimizers whose step is elementwise, so it can run on any part of a parameter's elements.
ELEMENTWISE: tuple[type[Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.RMSprop, torch.optim.Rprop, torch.optim.Adagrad, torch.optim.Adadelta,
)  # fmt: skip

#: State entries of those optimizers that are one number per parameter, not one per element.
_SCALAR_STATE = ("step", "mu_product")

# all_gather_single and reduce_scatter_single are the names from torch 2.13 on.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def check_elementwise(optimizer: Optimizer, mode: str) -> None:
    if type(optimizer) not in ELEMENTWISE:
        names = ", ".join(o.__name__ for o in ELEMENTWISE)
        raise ValueError(
            f"GPipeStrategy(shard={mode!r}) steps each replica's share of every parameter's elements, which keeps"
            f" the optimizer's arithmetic only for an elementwise step; {type(optimizer).__name__} is not one of"
            f" {names}: use one of them, or shard='none'"
        )


class StageShards:
    """The replicas' split of ``optimizer``'s parameters (one stage's, of ``module``); ``group`` is the stage's
    replicas, this one ``replica`` of ``d``. Built on every replica alike, right after the optimizer; it slices the
    optimizer's state that already exists, and with ``full`` frees the parameters' other elements (:meth:`gather`
    brings them back)."""

    def __init__(
        self, optimizer: Optimizer, module: nn.Module, group: Optional[dist.ProcessGroup], d: int, replica: int,
        full: bool, timeline: Timeline,
    ) -> None:  # fmt: skip
        self.optimizer, self.group, self.d, self.replica, self.full = optimizer, group, d, replica, full
        self.timeline = timeline
        self.params: list[Tensor] = list({id(p): p for g in optimizer.param_groups for p in g["params"]}.values())
        # Where each parameter sits in the module, and its placeholder there while it is freed.
        ids = {id(p) for p in self.params}
        self._owners = [
            (owner, name, p, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
            for owner in module.modules() for name, p in owner._parameters.items() if id(p) in ids
        ]  # fmt: skip
        if full:
            _check_storage_unshared(module, self.params)
        self._bounds = {id(p): _bounds(p.numel(), d, replica) for p in self.params}
        self._shards: dict[int, nn.Parameter] = {}
        self._nbytes = {id(p): p.untyped_storage().nbytes() for p in self.params}
        for p in self.params:
            lo, hi = self._bounds[id(p)]
            flat = p.detach().reshape(-1)  # a view of a contiguous parameter: stepping it steps the parameter
            own = flat[lo:hi].clone() if full or not p.is_contiguous() else flat[lo:hi]
            self._shards[id(p)] = nn.Parameter(own, requires_grad=p.requires_grad)
        self.gathered = True
        #: This replica's elements of the averaged gradients, by parameter id, when :class:`GradientScatter`
        #: averaged them (``None`` for a parameter no replica had a gradient for); ``None`` otherwise.
        self.scattered: Optional[dict[int, Optional[Tensor]]] = None
        self.shard_state()
        if full:
            self.release()

    def shard_parameters(self) -> list[nn.Parameter]:
        """This replica's elements of each parameter, as the optimizer steps them (views of the parameters with
        ``optimizer``, where they are contiguous)."""
        return list(self._shards.values())

    def shard_state(self) -> None:
        """Keep only this replica's elements of the optimizer's state entries that are whole (after loading a
        checkpoint's, or an optimizer that builds its state eagerly)."""
        for p in self.params:
            state = self.optimizer.state.get(p)
            lo, hi = self._bounds[id(p)]
            for key, value in (state or {}).items():
                if _per_element(key, value) and value.shape == p.shape:
                    state[key] = value.reshape(-1)[lo:hi].clone()

    def state_dict(self) -> dict[str, Any]:
        """``optimizer.state_dict()`` with every per-element entry gathered whole, in its parameter's shape (a
        collective over the replicas)."""
        state = self.optimizer.state_dict()
        order = [p for g in self.optimizer.param_groups for p in g["params"]]
        whole = {}
        for i, entries in state["state"].items():
            p = order[i]
            whole[i] = {k: self._whole(v, p).view_as(p) if _per_element(k, v) else v for k, v in entries.items()}
        return {**state, "state": whole}

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """A block around Lightning's optimizer step in which the optimizer steps this replica's elements: once
        the step's closure has run (forward, backward, the replicas' gradient average, clipping), the optimizer's
        parameters, gradients and state are the shards. After it, the replicas gather the parameters
        (``optimizer``), or the parameters' other elements and the gradients are freed (``full``)."""
        original = self.optimizer.step
        swapped: list[bool] = []

        def swap() -> None:
            self._swap(to_shards=True)
            swapped.append(True)

        def step(closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
            if closure is None:
                swap()
                return original(**kwargs)

            def closure_then_shards() -> Any:
                result = closure()
                swap()
                return result

            return original(closure_then_shards, **kwargs)

        try:
            with patched(self.optimizer, "step", step):
                yield
        finally:
            if swapped:
                self._swap(to_shards=False)
        self.scattered = None
        if not swapped:  # no step was taken: the parameters are as they were
            return
        if self.full:
            self.release()
        else:
            self.gathered = False
            self.gather()

    def gather(self) -> None:
        """Every replica's elements into the whole parameters, if they are not whole (a collective)."""
        if self.gathered:
            return
        with torch.no_grad(), self.timeline.span("allgather"):
            for index in buckets(self.params).values():
                params = [self.params[i] for i in index]
                sizes = [math.ceil(p.numel() / self.d) for p in params]
                mine = torch.cat(
                    [torch.nn.functional.pad(self._shards[id(p)].detach(), (0, c - self._shards[id(p)].numel()))
                     for p, c in zip(params, sizes)]
                )  # fmt: skip
                every = torch.empty(self.d * mine.numel(), dtype=mine.dtype, device=mine.device)
                _all_gather(every, mine, group=self.group)
                every = every.view(self.d, -1)
                offset = 0
                for p, c in zip(params, sizes):
                    if self.full:
                        p.untyped_storage().resize_(self._nbytes[id(p)])
                    p.detach().copy_(every[:, offset : offset + c].reshape(-1)[: p.numel()].view_as(p))
                    offset += c
        self._place(placeholders=False)
        self.gathered = True

    def release(self) -> None:
        """``full``: free the parameters' storage and gradients (this replica's elements stay), with placeholders in
        their places in the module."""
        for p in self.params:
            p.grad = None
            p.untyped_storage().resize_(0)
        self._place(placeholders=True)
        self.gathered = False

    def refresh(self) -> None:
        """After the whole parameters were written (a checkpoint loaded into them): this replica's elements from
        them, and with ``full`` the rest freed again."""
        for p in self.params:
            lo, hi = self._bounds[id(p)]
            shard = self._shards[id(p)]
            if shard.data_ptr() != p.detach().reshape(-1)[lo:hi].data_ptr():  # not a view of the parameter
                shard.detach().copy_(p.detach().reshape(-1)[lo:hi])
        if self.full:
            self.release()

    def abandon(self) -> None:
        """A failed run, whose replicas may be gone: the parameters back in the module, whole in size but NaN
        where this replica could not gather them, so that the module can still move and be inspected."""
        if self.gathered:
            return
        with torch.no_grad():
            for p in self.params:
                p.untyped_storage().resize_(self._nbytes[id(p)])
                p.fill_(float("nan"))
                if p.is_contiguous():  # this replica's own elements, as it stepped them
                    lo, hi = self._bounds[id(p)]
                    p.view(-1)[lo:hi].copy_(self._shards[id(p)])
        self._place(placeholders=False)
        self.gathered = True

    @contextmanager
    def named(self) -> Iterator[None]:
        """A block in which the module holds the parameters themselves, gathered or not: for looking them up by
        name, not for reading them."""
        self._place(placeholders=False)
        try:
            yield
        finally:
            self._place(placeholders=not self.gathered)

    def _place(self, placeholders: bool) -> None:
        for owner, name, p, placeholder in self._owners:
            owner._parameters[name] = placeholder if placeholders else p  # type: ignore[assignment]

    def close(self) -> None:
        """The end of the run: the parameters whole, and the optimizer's state whole too (a collective), so that what
        follows the run (saving, another fit, plain use) sees the stage as without shards."""
        self.gather()
        whole = self.state_dict()["state"]
        order = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, entries in whole.items():
            self.optimizer.state[order[i]].update(entries)

    def _swap(self, to_shards: bool) -> None:
        shard = self._shards
        whole = {id(s): p for p, s in ((p, shard[id(p)]) for p in self.params)}
        switch = (lambda t: shard[id(t)]) if to_shards else (lambda t: whole[id(t)])
        for group in self.optimizer.param_groups:
            group["params"] = [switch(t) for t in group["params"]]
        state = self.optimizer.state
        for old in [t for t in list(state) if id(t) in (shard if to_shards else whole)]:
            state[switch(old)] = state.pop(old)
        for p in self.params:
            lo, hi = self._bounds[id(p)]
            s = shard[id(p)]
            if self.scattered is not None:  # this replica's elements of the average, already
                s.grad = self.scattered[id(p)] if to_shards else None
            else:
                s.grad = p.grad.reshape(-1)[lo:hi] if to_shards and p.grad is not None else None

    def _whole(self, value: Tensor, p: Tensor) -> Tensor:
        c = math.ceil(p.numel() / self.d)
        mine = torch.nn.functional.pad(value.reshape(-1), (0, c - value.numel()))
        every = torch.empty(self.d * c, dtype=value.dtype, device=value.device)
        _all_gather(every, mine, group=self.group)
        return every[: p.numel()]


class GradientScatter:
    """The replicas' average of a sharded stage's gradients by reduce-scatter, as :class:`~lightning_gpipe.parallel.
    replicas.GradientAverager` averages them (each replica divides by D, the sum over replicas, a count of the
    replicas that had each gradient) but at half an all-reduce's traffic: each replica receives only its own
    elements, into :attr:`StageShards.scattered`, and the whole gradients are dropped. The same interface as
    ``GradientAverager``; the optimizer's parameters are the ones averaged."""

    def __init__(self, shards: StageShards) -> None:
        self.shards = shards
        self._pending: list[tuple[Any, Tensor, list[Tensor]]] = []
        self._count = 0

    @property
    def started(self) -> bool:
        return bool(self._pending)

    def start(self, params: list[Tensor], grads: list[Optional[Tensor]]) -> None:
        """Post the reduce-scatter of ``grads`` (``None`` where this replica has none) of ``params``."""
        if self._pending:
            raise RuntimeError("GradientScatter.start: the previous average was not finished")
        self._count = len(params)
        given = {id(p): g for p, g in zip(params, grads)}
        d = self.shards.d
        for index in buckets(self.shards.params).values():
            bucket = [self.shards.params[i] for i in index]
            sizes = [math.ceil(p.numel() / d) for p in bucket]
            total = sum(sizes)
            # Row r goes to replica r: its elements of every parameter, each padded to ceil(n / D), then the counts.
            flat = torch.zeros(d, total + len(bucket), dtype=bucket[0].dtype, device=bucket[0].device)
            offset = 0
            for j, (p, c) in enumerate(zip(bucket, sizes)):
                g = given.get(id(p))
                if g is not None:
                    flat[:, offset : offset + c] = torch.nn.functional.pad(g.reshape(-1), (0, d * c - p.numel())).view(d, c)
                    flat[:, total + j] = 1
                offset += c
            flat[:, :total].div_(d)
            mine = torch.empty(total + len(bucket), dtype=flat.dtype, device=flat.device)
            work = _reduce_scatter(mine, flat.view(-1), group=self.shards.group, async_op=True)
            self._pending.append((work, mine, bucket))

    def finish(self) -> list[Optional[Tensor]]:
        """Wait for the averages, put this replica's elements into :attr:`StageShards.scattered`; ``None`` for
        every parameter given to :meth:`start` (the whole gradients are not kept)."""
        scattered: dict[int, Optional[Tensor]] = {}
        with self.shards.timeline.span("allreduce"):
            for work, mine, bucket in self._pending:
                work.wait()
                counts = mine[mine.numel() - len(bucket) :].tolist()
                offset = 0
                for p, count in zip(bucket, counts):
                    lo, hi = _bounds(p.numel(), self.shards.d, self.shards.replica)
                    scattered[id(p)] = mine[offset : offset + hi - lo] if count else None
                    offset += math.ceil(p.numel() / self.shards.d)
        self._pending = []
        self.shards.scattered = scattered
        return [None] * self._count


def _check_storage_unshared(module: nn.Module, params: Sequence[Tensor]) -> None:
    """``full`` frees the parameters' storage between steps: no buffer may live in it."""
    stored = {p.untyped_storage().data_ptr() for p in params if p.numel()}
    shared = [n for n, b in module.named_buffers() if b.numel() and b.untyped_storage().data_ptr() in stored]
    if shared:
        raise ValueError(
            f"GPipeStrategy(shard='full') frees each parameter's storage between steps, and the buffers"
            f" {', '.join(shared)} live in a parameter's storage: use shard='optimizer' or 'none'"
        )


def _bounds(n: int, d: int, replica: int) -> tuple[int, int]:
    c = math.ceil(n / d)
    lo = min(replica * c, n)
    return lo, min(lo + c, n)


def _per_element(key: str, value: Any) -> bool:
    return isinstance(value, Tensor) and key not in _SCALAR_STATE
