"""What every stage of a pipeline must share, checked instead of assumed: the same batches and the same weights.

Each stage loads its own batches and builds its own copy of the model, so nothing but the user's code makes
them agree. A data module that draws an unseeded ``random_split``, or shards by ``trainer.global_rank``, gives
each stage other samples: stage 0 would forward one sample's inputs while the last stage takes the loss against
another's targets. A model built without a seed gives each stage other initial weights. Both train wrong
without a word, so both are checked: the batches at the first batch of every epoch and evaluation loop (a digest
of their bytes, one small all-gather), the weights at setup (digests, then global rank 0's values where any
differ, as DDP broadcasts rank 0's module).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_gpipe.errors import DataMismatchError
from lightning_gpipe.model.deferred import DeferredInit, has_meta_tensors
from lightning_gpipe.model.partition import rank_layers
from lightning_gpipe.parallel.topology import Topology

__all__ = [
    "DataMismatchError",
    "digest",
    "batch_summary",
    "check_same_batch",
    "state_digest",
    "start_from_first_ranks_weights",
]


def digest(tensors: Sequence[Tensor]) -> str:
    """A digest of the shapes, dtypes and bytes of ``tensors``, in order (16 hex digits)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        if t.numel():  # a copy: numpy's view of a tensor's own storage would pin its size for good
            h.update(t.to("cpu", copy=True).contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _leaves(batch: Any) -> list[Any]:
    """The leaves of a batch in a fixed order: tensors, and the repr of anything else (strings, numbers)."""
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [leaf for key in batch for leaf in [repr(key), *_leaves(batch[key])]]
    if isinstance(batch, (tuple, list)):
        return [leaf for item in batch for leaf in _leaves(item)]
    return [repr(batch)]


def batch_summary(batch: Any) -> tuple[str, int]:
    """The digest of a batch (its tensors and its other values) and its size along dim 0 (0 without a tensor)."""
    leaves = _leaves(batch)
    tensors = [x for x in leaves if isinstance(x, Tensor)]
    others = "|".join(x for x in leaves if not isinstance(x, Tensor))
    h = hashlib.blake2b(digest(tensors).encode() + others.encode(), digest_size=8).hexdigest()
    size = tensors[0].shape[0] if tensors and tensors[0].dim() else 0
    return h, size


def check_same_batch(
    batch: Any, batches: Any, where: str, gather: Callable[[Any], list[Any]], stages: Sequence[int]
) -> None:
    """Raise :class:`DataMismatchError` on every stage if the stages of this pipeline hold different batches.

    ``batches``: this loop's batch count, which must agree too; ``where`` names the batch for the message;
    ``gather`` all-gathers a small object over the pipeline's ranks, which run ``stages`` (in their order).
    """
    mine = (*batch_summary(batch), batches)
    seen = gather(mine)
    if all(s == seen[0] for s in seen):
        return
    described = "; ".join(
        f"stage {stage}: {size} samples, digest {h}, {count} batches" for stage, (h, size, count) in zip(stages, seen)
    )
    raise DataMismatchError(
        f"GPipeStrategy: the stages hold different data at {where} ({described}). Stage 0 would forward one batch's"
        " inputs while the last stage takes the loss against another's targets. Every stage must load the same"
        " batches in the same order: seed random splits (random_split(..., generator=torch.Generator()"
        ".manual_seed(0))), and do not shard data by trainer.global_rank or world_size in a DataModule"
        " (GPipeStrategy(data_parallel_size=D) shards the data by replica itself)."
    )


def state_digest(layers: Sequence[nn.Module]) -> str:
    """A digest of the parameters and buffers of ``layers`` (their state dicts, in order)."""
    return digest([t for layer in layers for t in layer.state_dict(keep_vars=True).values() if isinstance(t, Tensor)])


def start_from_first_ranks_weights(
    module: nn.Module, layers: Sequence[nn.Module], balance: Sequence[int], topology: Topology,
    deferred: Optional[DeferredInit], gather: Callable[[Any], list[Any]],
) -> None:  # fmt: skip
    """Make every rank's stage start from the initial weights global rank 0 built, before the model is cut.

    Built on the meta device (``deferred``), every rank replays its construction from global rank 0's random state;
    built whole, every rank compares a digest of its stage's tensors with rank 0's and takes rank 0's values where
    they differ. Every rank of the world calls it; ``gather`` all-gathers a small object over the world.
    """
    k, stage = topology.k, topology.stage
    if has_meta_tensors(module):
        if deferred is None:
            return  # refused when the stage is materialized, on every rank
        seen = gather(deferred.starts)
        differ = [r for r, starts in enumerate(seen) if len(starts) != len(seen[0]) or not all(
            torch.equal(a, b) for a, b in zip(starts, seen[0]))]  # fmt: skip
        deferred.restart(seen[0])
    else:
        stages = [[layers[i] for i in rank_layers(balance, j, k)] for j in range(k)]
        first = topology.rank == 0
        digests = [state_digest(part) for part in stages] if first else None  # global rank 0 digests every stage
        seen = gather((digests[stage] if digests else state_digest(stages[stage]), digests))
        reference = seen[0][1]
        differ = [r for r, (mine, _) in enumerate(seen) if mine != reference[r % k]]  # rank r runs stage r % k
        for rank in differ:
            if first:
                dist.send_object_list([{i: layers[i].state_dict() for i in rank_layers(balance, rank % k, k)}], dst=rank)
            elif rank == topology.rank:
                box: list[Any] = [None]
                dist.recv_object_list(box, src=0)
                for i, state in box[0].items():
                    layers[i].load_state_dict(state)
    if differ:
        rank_zero_info(
            f"GPipeStrategy: ranks {differ} built {type(module).__name__} with other initial weights than global rank"
            " 0 (no seed_everything before building it?); every stage starts from global rank 0's, as DDP does"
        )
