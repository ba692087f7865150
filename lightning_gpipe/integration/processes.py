"""The processes of a pipeline strategy: launching and connecting them, their topology, and Lightning's collectives.

:class:`PipelineProcesses` is the part of :class:`~lightning_gpipe.GPipeStrategy` that any strategy running one
process per device over a ``("data_parallel", "pipeline")`` mesh needs; the pipeline itself is the subclass's.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from lightning.fabric.utilities.distributed import (
    ReduceOp,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
)
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from typing_extensions import override

from lightning_gpipe.integration import collectives
from lightning_gpipe.integration.config import GPipeConfig
from lightning_gpipe.parallel.topology import Topology, check_layout

__all__ = ["PipelineProcesses"]


class PipelineProcesses(ParallelStrategy):
    """One process per device (``devices x num_nodes``), D replicas of a K-stage pipeline over them."""

    def __init__(self, config: GPipeConfig, **plugins: Any) -> None:
        super().__init__(**plugins)
        self.config = config
        self._topology: Optional[Topology] = None  # built with the process group
        self._process_group_backend = config.process_group_backend
        self._num_nodes = 1

    @property
    def topology(self) -> Topology:
        """This rank's stage and replica, and the process groups of its pipeline and of its stage's replicas."""
        if self._topology is None:
            raise RuntimeError("GPipeStrategy.topology exists once the processes are connected (setup_environment)")
        return self._topology

    @property
    def device_mesh(self) -> Any:
        """The ``("data_parallel", "pipeline")`` device mesh: row d is replica d, column j stage j of each."""
        return self.topology.mesh

    @property
    def num_nodes(self) -> int:
        """The machines the processes run on."""
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        """Processes per machine, one per device."""
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def is_distributed(self) -> bool:
        """Whether there are replicas (Lightning then shards the data and syncs logged values across them): the
        stages of one replica see the same batches in the same order; replicas get their own shards, as DDP's
        ranks do."""
        return self.config.data_parallel_size > 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """The data shard of this rank's replica: every stage of a replica reads the same one."""
        replica = self._topology.replica if self._topology is not None else self.global_rank // self._stages()
        return {"num_replicas": self.config.data_parallel_size, "rank": replica}

    def _stages(self) -> int:
        """K, the stage count of each replica (before the topology exists, from the world size)."""
        return check_layout(self.num_nodes * self.num_processes, self.config.data_parallel_size)

    @property
    def process_group_backend(self) -> Optional[str]:
        """The ``torch.distributed`` backend: gloo on CPU and NCCL on GPU unless given."""
        return self._process_group_backend

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def set_world_ranks(self) -> None:
        """This process's global rank and the world size, for the cluster environment and rank-zero utilities."""
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = fabric_rank_zero_only.rank = self.global_rank

    @override
    def setup_environment(self) -> None:
        self._stages()  # a world that does not split into the replicas fails here, on every rank, before connecting
        super().setup_environment()
        self.set_world_ranks()
        device = self.root_device
        self._process_group_backend = self._process_group_backend or _get_default_process_group_backend_for_device(device)
        assert self.cluster_environment is not None
        _init_dist_connection(
            self.cluster_environment, self._process_group_backend, timeout=self.config.timeout,
            device_id=device if device.type != "cpu" else None,
        )  # fmt: skip
        self._topology = Topology.build(self.world_size, self.config.data_parallel_size, self.global_rank, device.type)

    # Lightning's collectives for user code (see integration.collectives)

    def _check_collective(self, name: str) -> None:
        """Raise if user code starts a collective where other ranks cannot join it (the subclass knows where)."""

    @override
    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        if collectives.own_group(group):
            self._check_collective("all_gather")
        return collectives.all_gather(self.topology, tensor, group, sync_grads)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        self._check_collective("barrier")
        collectives.barrier(self.root_device)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        self._check_collective("broadcast")
        return collectives.broadcast(obj, src)

    @override
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Union[ReduceOp, str]] = "mean") -> Any:
        if isinstance(tensor, Tensor) and collectives.own_group(group):
            self._check_collective("reduce")
        return collectives.reduce(self.topology, tensor, group, reduce_op)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self._check_collective("reduce_boolean_decision")
        return collectives.reduce_boolean_decision(decision, all, self.root_device)
