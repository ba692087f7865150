"""Where each rank sits: D data-parallel replicas of a K-stage pipeline, on a 2-D device mesh.

Ranks are laid out replica-major: global rank r runs stage ``r % K`` of replica ``r // K``, so the stages of one
replica are neighbouring ranks, on one node whenever a node's device count is a multiple of K. Activations
cross stage boundaries every micro-batch, while gradients cross replicas once per step, so the faster links go
to the pipeline. The mesh's dimensions are ``("data_parallel", "pipeline")``: row d is replica d, column j
holds stage j of every replica.

Every collective of the strategy takes its group from here: the pipeline's own (the stages of this rank's
replica) or the replicas' (stage j of every replica). With one replica the pipeline is the whole world and
its collectives use the default group, so D=1 costs nothing beyond building the mesh once. The mesh is built
once per default process group and layout: every run in the process (each ``fit``, ``validate``, ``predict``) reuses it,
where building it anew would leave a process group, with its threads and sockets, behind each time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["Topology", "MESH_DIMS", "check_layout", "check_replicas"]

#: The device mesh's dimension names, replicas first.
MESH_DIMS = ("data_parallel", "pipeline")


#: The meshes built in this process, by layout, with the default process group they were built in.
_MESHES: dict[tuple[str, int, int], tuple[Any, DeviceMesh]] = {}


def _mesh(device_type: str, d: int, k: int) -> DeviceMesh:
    """The device mesh of ``d`` replicas of ``k`` stages; built (a collective, on every rank alike) the first time
    a process asks for it in its current default process group."""
    key, world = (device_type, d, k), dist.group.WORLD
    for stale in [layout for layout, (built_in, _) in _MESHES.items() if built_in is not world]:
        del _MESHES[stale]  # built in a default group since destroyed: its groups are gone with it
    if key not in _MESHES:
        _MESHES[key] = (world, init_device_mesh(device_type, (d, k), mesh_dim_names=MESH_DIMS))
    return _MESHES[key][1]


def check_replicas(d: Any) -> None:
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"GPipeStrategy(data_parallel_size={d!r}): need a whole number of replicas, at least 1")


def check_layout(world: int, d: Any) -> int:
    """The stage count K of a world of ``world`` processes split into ``d`` replicas; raises if it does not split."""
    check_replicas(d)
    if world % d:
        raise ValueError(
            f"GPipeStrategy(data_parallel_size={d}): the {world} processes (devices x num_nodes) do not split into"
            f" {d} equal pipelines; use a world that is a multiple of {d}, or a data_parallel_size that divides {world}"
        )
    return world // d


@dataclass(frozen=True)
class Topology:
    """This rank's place: stage ``stage`` of ``k``, replica ``replica`` of ``d``, and the groups to talk over."""

    k: int
    d: int
    rank: int  # global
    mesh: Optional[DeviceMesh] = field(default=None, compare=False)

    @classmethod
    def build(cls, world: int, d: int, rank: int, device_type: str) -> Topology:
        """The topology of global ``rank``; with more than one process, also its device mesh (a collective)."""
        k = check_layout(world, d)
        return cls(k, d, rank, _mesh(device_type, d, k) if world > 1 else None)

    @property
    def stage(self) -> int:
        return self.rank % self.k

    @property
    def replica(self) -> int:
        return self.rank // self.k

    def rank_of(self, stage: int, replica: Optional[int] = None) -> int:
        """The global rank of ``stage`` in ``replica`` (this rank's replica by default)."""
        return (self.replica if replica is None else replica) * self.k + stage

    @property
    def pipeline_ranks(self) -> list[int]:
        """The global ranks of this replica's stages, in stage order."""
        return [self.rank_of(j) for j in range(self.k)]

    @property
    def pipeline_group(self) -> Optional[dist.ProcessGroup]:
        """The group of this replica's stages; ``None`` (the default group) when there is one replica."""
        if self.d == 1 or self.mesh is None:
            return None
        return self.mesh.get_group(MESH_DIMS[1])

    @property
    def replica_group(self) -> dist.ProcessGroup:
        """The group of this stage's replicas (only with more than one replica)."""
        if self.d == 1 or self.mesh is None:
            raise RuntimeError("a pipeline with one replica has no data-parallel group")
        if self.k == 1:
            return dist.group.WORLD  # type: ignore[return-value]
        return self.mesh.get_group(MESH_DIMS[0])
