"""Porting from torchgpipe: its state dicts, renamed for the same ``nn.Sequential`` under this strategy.

A torchgpipe state dict differs in three ways. ``GPipe.state_dict()`` puts each layer under its partition
(``partitions.1.3.weight``); a ``@skippable`` layer wraps the user's module, so its tensors sit under ``module``
(``3.module.lin.weight``, here ``3.lin.weight``); and its deferred batch norm keeps accumulators of its own
(``sum``, ``sum_squares``) and commits the *biased* variance of each mini-batch to ``running_var``, where
``nn.BatchNorm`` and this project (``deferred_batchnorm=True``) commit the unbiased one. Pass the number of values
per channel in one mini-batch (batch size x spatial positions) to rescale ``running_var`` by n / (n - 1); the
initial value's share of the average is rescaled with it, which after a few updates is small (against torchgpipe
0.0.7 after three steps: 2.6e-6 apart rescaled, 3e-2 not).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional

from torch import Tensor, nn

__all__ = ["from_torchgpipe"]

_PARTITION = re.compile(r"partitions\.\d+\.")
_ACCUMULATORS = ("sum", "sum_squares")  # torchgpipe's DeferredBatchNorm's own buffers


def from_torchgpipe(
    state_dict: Mapping[str, Tensor], seq: nn.Sequential, prefix: str = "", batchnorm_values: Optional[int] = None
) -> dict[str, Tensor]:
    """``state_dict`` of a torchgpipe model (``GPipe`` or its ``nn.Sequential``) with the names ``seq`` gives its
    tensors, each under ``prefix`` (the Sequential's name in your LightningModule and a dot, ``"body."``).

    ``batchnorm_values``: values per channel in one mini-batch (batch size x spatial positions) of a model trained
    with torchgpipe's ``deferred_batch_norm=True``, to turn its biased ``running_var`` into the unbiased one.
    Raises ``KeyError`` naming a tensor that ``seq`` has no place for, or one of ``seq``'s that the state dict lacks.
    """
    if batchnorm_values is not None and batchnorm_values < 2:
        raise ValueError(f"from_torchgpipe(batchnorm_values={batchnorm_values}): need at least 2 values per channel")
    wanted = seq.state_dict()
    renamed: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = _PARTITION.sub("", key, count=1) if key.startswith("partitions.") else key
        if name not in wanted:
            layer, _, rest = name.partition(".")
            unwrapped = f"{layer}.{rest.removeprefix('module.')}"
            if rest.startswith("module.") and unwrapped in wanted:
                name = unwrapped
            elif name.rpartition(".")[2] in _ACCUMULATORS:
                continue
            else:
                raise KeyError(f"from_torchgpipe: {key!r} has no place in the Sequential (its tensors: {_few(wanted)})")
        if batchnorm_values is not None and name.endswith("running_var"):
            value = value * (batchnorm_values / (batchnorm_values - 1))
        renamed[name] = value
    missing = [name for name in wanted if name not in renamed]
    if missing:
        raise KeyError(f"from_torchgpipe: the state dict has nothing for {_few(missing)}")
    return {f"{prefix}{name}": value for name, value in renamed.items()}


def _few(names: Mapping[str, object] | list[str]) -> str:
    shown = list(names)
    return ", ".join(shown[:4]) + (f", ... ({len(shown)} in all)" if len(shown) > 4 else "")
