"""Which ranks shard the state and which hold replicas of it: ZeRO within a group, or hybrid.

Plain sharding: one group, every rank owns 1/N of the state. Hybrid sharding (FSDP2's HSDP,
ZeRO++'s hpZ): a 2-D ``DeviceMesh`` ``(replicate, shard)``, typically nodes x GPUs per node;
the state is sharded over the ``shard`` dimension (within a node) and replicated over
``replicate`` (across nodes). Gradients are reduce-scattered within the shard group and the
reduced chunk is all-reduced across the replicate group; norms sum over the shard group only
(replicas hold equal chunks); weights are all-gathered within the shard group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["Topology", "resolve_topology"]


@dataclass(frozen=True)
class Topology:
    shard_group: Any  # None: the default group
    replicate_group: Any  # None: no replicas
    shard_size: int
    shard_rank: int
    replicas: int
    mesh: DeviceMesh | None  # what sharded checkpoints place their DTensors on

    @property
    def groups(self) -> list[Any]:
        """Groups whose broadcasts, in this order, spread one rank's values to every rank:
        across replicas first, then within each shard group."""
        return ([self.replicate_group] if self.replicate_group is not None else []) + [
            self.shard_group]


def resolve_topology(process_group: Any, device_mesh: DeviceMesh | None) -> Topology:
    if device_mesh is None:
        rank = dist.get_rank(process_group)
        if rank < 0:
            raise ValueError("process_group must contain this rank")
        return Topology(process_group, None, dist.get_world_size(process_group), rank, 1, None)
    if process_group is not None:
        raise ValueError("pass either process_group or device_mesh, not both")
    if not isinstance(device_mesh, DeviceMesh):
        raise TypeError(f"device_mesh must be a torch.distributed.device_mesh.DeviceMesh, got "
                        f"{type(device_mesh).__name__}")
    if device_mesh.ndim == 1:
        group = device_mesh.get_group(0)
        return Topology(group, None, device_mesh.size(0), device_mesh.get_local_rank(0), 1,
                        device_mesh)
    if device_mesh.ndim != 2:
        raise ValueError(f"device_mesh must have 1 dimension (shard) or 2 (replicate, shard), "
                         f"got {device_mesh.ndim}")
    replicas = device_mesh.size(0)
    return Topology(device_mesh.get_group(1), device_mesh.get_group(0) if replicas > 1 else None,
                    device_mesh.size(1), device_mesh.get_local_rank(1), replicas, device_mesh)
