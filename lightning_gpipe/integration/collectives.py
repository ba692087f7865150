"""Lightning's collectives for user code (``self.all_gather``, ``self.log(sync_dist=True)``, ``EarlyStopping``).

They go over the replicas, as they go over DDP's ranks: the stages of one replica already share the last stage's
values. So they are safe after ``self(x)`` too, where the last stage of every replica runs them, and do nothing
with one replica. ``LightningModule.all_gather`` passes the default group, WORLD, for "every data-parallel rank";
another group is the user's own, used as given.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import (
    ReduceOp,
    _all_gather_ddp_if_available,
    _distributed_is_initialized,
    _sync_ddp_if_available,
)
from torch import Tensor

from lightning_gpipe.parallel.topology import Topology

__all__ = ["own_group", "all_gather", "barrier", "broadcast", "reduce", "reduce_boolean_decision"]


def own_group(group: Optional[Any]) -> bool:
    """Whether ``group`` is one the user made (not the default, which means every data-parallel rank)."""
    return group is not None and group is not dist.group.WORLD


def all_gather(topology: Topology, tensor: Tensor, group: Optional[Any], sync_grads: bool) -> Tensor:
    if own_group(group):
        return _all_gather_ddp_if_available(tensor, group=group, sync_grads=sync_grads)
    if topology.d == 1:
        return tensor  # one replica: as on a single device
    return _all_gather_ddp_if_available(tensor, group=topology.replica_group, sync_grads=sync_grads)


def barrier(device: torch.device) -> None:
    if not _distributed_is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    if not _distributed_is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def reduce(topology: Topology, tensor: Any, group: Optional[Any], reduce_op: Optional[Union[ReduceOp, str]]) -> Any:
    if not isinstance(tensor, Tensor):
        return tensor
    if not own_group(group):
        if topology.d == 1:
            return tensor  # one replica: as on a single device
        group = topology.replica_group
    return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)


def reduce_boolean_decision(decision: bool, all: bool, device: torch.device) -> bool:
    """The decision of every rank (EarlyStopping's, ModelCheckpoint's), over the whole world."""
    if not _distributed_is_initialized():
        return decision
    votes = torch.tensor(int(decision), device=device)
    dist.all_reduce(votes, op=ReduceOp.SUM)
    world = dist.get_world_size()
    return bool(votes == world) if all else bool(votes > 0)
