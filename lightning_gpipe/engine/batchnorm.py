"""Batch normalization under micro-batching: running statistics left alone on recompute, and deferred updates.

A batch-norm layer in training mode normalizes each micro-batch with that micro-batch's statistics, as
GPipe does. Left as it is, it also updates its running statistics once per micro-batch, so after a step they
differ from single-device training and ``num_batches_tracked`` counts micro-batches. With deferred batch
norm the layer only accumulates each micro-batch's statistics during the forward phase; :func:`commit`
then updates the running statistics once, from the whole mini-batch, exactly as one forward over the whole
batch would (``GPipeStrategy(deferred_batchnorm=True)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["batchnorm_stats_kept", "defer", "undefer", "commit", "deferred_norms"]

#: The running statistics of a batch-norm layer.
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class _Deferred:
    """Mixed into a batch-norm class: normalize by the micro-batch, accumulate its statistics for :func:`commit`."""

    count: int  # samples (per feature) seen since the last commit
    mean: Optional[Tensor]  # their float64 mean and sum of squared deviations
    m2: Optional[Tensor]

    def forward(self, input: Tensor) -> Tensor:
        norm: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        if not (norm.training and norm.track_running_stats):
            return super().forward(input)  # type: ignore[misc]
        norm._check_input_dim(input)
        _accumulate(self, input.detach())
        return F.batch_norm(input, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)


class DeferredBatchNorm1d(_Deferred, nn.BatchNorm1d):
    pass


class DeferredBatchNorm2d(_Deferred, nn.BatchNorm2d):
    pass


class DeferredBatchNorm3d(_Deferred, nn.BatchNorm3d):
    pass


_DEFERRED = {nn.BatchNorm1d: DeferredBatchNorm1d, nn.BatchNorm2d: DeferredBatchNorm2d, nn.BatchNorm3d: DeferredBatchNorm3d}


def defer(layers: Sequence[nn.Module]) -> list[nn.Module]:
    """Turn every batch-norm layer inside ``layers`` into its deferred form, in place; returns them."""
    norms = []
    for layer in layers:
        for name, m in layer.named_modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, _Deferred):
                continue
            if type(m) not in _DEFERRED:
                raise TypeError(
                    f"GPipeStrategy(deferred_batchnorm=True) defers nn.BatchNorm1d, 2d and 3d; layer {name or 'itself'}"
                    f" of {type(layer).__name__} is a {type(m).__name__}, which it cannot: use one of those, or leave"
                    " deferred_batchnorm off"
                )
            if m.track_running_stats:
                m.__class__ = _DEFERRED[type(m)]
                _reset(m)
                norms.append(m)
    return norms


def undefer(norms: Sequence[nn.Module]) -> None:
    """Give deferred layers back their own batch-norm class (after a run: the module is the user's again)."""
    originals = {deferred: plain for plain, deferred in _DEFERRED.items()}
    for m in norms:
        m.__class__ = originals[type(m)]
        for name in ("count", "mean", "m2"):
            m.__dict__.pop(name, None)


def deferred_norms(layers: Sequence[nn.Module]) -> list[nn.Module]:
    return [m for layer in layers for m in layer.modules() if isinstance(m, _Deferred)]


def commit(norms: Sequence[nn.Module]) -> None:
    """Update each layer's running statistics once, from every micro-batch it saw since the last commit."""
    for m in norms:
        if m.count == 0:  # type: ignore[union-attr]
            continue
        norm: nn.modules.batchnorm._BatchNorm = m  # type: ignore[assignment]
        n = m.count  # type: ignore[union-attr]
        assert norm.num_batches_tracked is not None and norm.running_mean is not None and norm.running_var is not None
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
            unbiased = m.m2 / max(n - 1, 1)  # type: ignore[union-attr]
            norm.running_mean.mul_(1 - momentum).add_(m.mean.to(norm.running_mean.dtype), alpha=momentum)  # type: ignore[union-attr]
            norm.running_var.mul_(1 - momentum).add_(unbiased.to(norm.running_var.dtype), alpha=momentum)
        _reset(m)


def _accumulate(m: _Deferred, x: Tensor) -> None:
    dims = [0, *range(2, x.dim())]
    n = x.numel() // x.size(1)
    x = x.to(torch.float64)
    mean = x.mean(dims)
    m2 = (x - mean.view(1, -1, *[1] * (x.dim() - 2))).square().sum(dims)
    if m.count == 0:
        m.count, m.mean, m.m2 = n, mean, m2
        return
    total = m.count + n  # Chan et al.'s pairwise update of a mean and a sum of squared deviations
    delta = mean - m.mean
    m.mean = m.mean + delta * (n / total)
    m.m2 = m.m2 + m2 + delta.square() * (m.count * n / total)
    m.count = total


def _reset(m: nn.Module) -> None:
    m.count, m.mean, m.m2 = 0, None, None  # type: ignore[assignment]


@contextmanager
def batchnorm_stats_kept(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Let a recomputed forward update batch-norm statistics on copies: the first forward updated them.

    The copies are swapped in rather than the originals restored in place afterwards, since the recomputed
    graph saves those buffers for its backward. Deferred layers keep their accumulated statistics the same way.
    """
    norms = [
        m for layer in layers for m in layer.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]  # fmt: skip
    originals = [{name: getattr(m, name) for name in _names(m)} for m in norms]
    for m, values in zip(norms, originals):
        for name, value in values.items():
            if isinstance(value, Tensor):
                setattr(m, name, value.clone())
    try:
        yield
    finally:
        for m, values in zip(norms, originals):
            for name, value in values.items():
                setattr(m, name, value)


def _names(m: nn.Module) -> tuple[str, ...]:
    return (*STATISTICS, "count", "mean", "m2") if isinstance(m, _Deferred) else STATISTICS
