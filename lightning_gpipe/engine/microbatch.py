"""Splitting a batch into micro-batches along dim 0, and merging stage outputs back."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from lightning_gpipe.schedule.split import uniform_split

__all__ = [
    "Tensors", "TensorOrTensors", "split", "split_sizes", "shape_keys", "merge", "as_tuple", "batch_size", "tensors_in",
]  # fmt: skip

Tensors = tuple[Tensor, ...]
#: What a stage takes and returns: a tensor, or a tuple of tensors.
TensorOrTensors = Union[Tensor, Tensors]


def as_tuple(x: TensorOrTensors) -> Tensors:
    """Normalise a stage input or output to a tuple of tensors, rejecting anything else."""
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and all(isinstance(t, Tensor) for t in x):
        return tuple(x)
    raise TypeError(
        "what crosses a pipeline stage boundary must be a tensor or a tuple of tensors, "
        f"got {_describe(x)}"
    )


def batch_size(batch: Any) -> int:
    """The size of dim 0, which must agree across every tensor of ``batch``."""
    sizes = {t.shape[0] for t in _leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"cannot split a batch whose tensors disagree on dim 0: sizes {sorted(sizes)}")
    return sizes.pop()


def split(batch: Any, m: int) -> list[Any]:
    """Split ``batch`` (a tensor, or a tuple, list or dict of tensors) into at most ``m`` micro-batches.

    Chunks follow :func:`torch.tensor_split`: a batch of 10 with ``m=3`` gives sizes 4, 3, 3.
    A batch smaller than ``m`` gives one micro-batch per sample.
    """
    sizes = split_sizes(batch_size(batch), m)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [_map(batch, lambda t, o=o, s=s: t.narrow(0, o, s)) for o, s in zip(offsets, sizes)]


def split_sizes(n: int, m: int) -> list[int]:
    """Micro-batch sizes for a batch of ``n`` samples: ``min(m, n)`` chunks, the larger ones first."""
    if m < 1:
        raise ValueError(f"microbatches must be at least 1, got {m}")
    if n < 1:
        raise ValueError(f"cannot split an empty batch (dim 0 has size {n})")
    return uniform_split(n, min(m, n))


def shape_keys(batch: Any, m: int, train: bool) -> list[Hashable]:
    """For each micro-batch of ``split(batch, m)``, a key of its shapes and dtypes (and of ``train``): the same on
    every stage that holds the same batch, so the stages agree on which micro-batches' shapes they have met before.
    Nothing is split or read from the device."""
    leaves = _leaves(batch)
    rest = tuple((tuple(t.shape[1:]), t.dtype) for t in leaves)
    return [(train, rows, rest) for rows in split_sizes(batch_size(batch), m)]


def merge(outputs: Sequence[TensorOrTensors]) -> TensorOrTensors:
    """Concatenate per-micro-batch outputs along dim 0, keeping the tensor-or-tuple structure."""
    if isinstance(outputs[0], Tensor):
        return torch.cat(list(outputs))  # type: ignore[arg-type]
    columns = zip(*(as_tuple(y) for y in outputs))
    return tuple(torch.cat(list(col)) for col in columns)


def _map(batch: Any, fn: Any) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)((key, _map(value, fn)) for key, value in batch.items())
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map(value, fn) for value in batch)
    raise TypeError(f"a batch to split must be a tensor or a tuple, list or dict of tensors, got {_describe(batch)}")


def tensors_in(batch: Any) -> list[Tensor]:
    """Every tensor of a tensor, or of a (nested) tuple, list or dict of tensors."""
    leaves: list[Tensor] = []
    _map(batch, lambda t: leaves.append(t))
    return leaves


def _leaves(batch: Any) -> list[Tensor]:
    leaves = tensors_in(batch)
    if not leaves:
        raise ValueError("cannot split a batch that holds no tensor")
    if any(t.dim() == 0 for t in leaves):
        raise ValueError("cannot split a batch holding a 0-dimensional tensor: micro-batches split dim 0")
    return leaves


def _describe(x: Any) -> str:
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__} of ({', '.join(type(v).__name__ for v in x)})"
    return type(x).__name__
