"""DTensor parameters (FSDP2 ``fully_shard``): local views and norms over the device mesh.

The optimizer keeps parameters and state as DTensors, so ``torch.distributed.checkpoint`` sees
sharded tensors and can reshard them, but it runs every kernel on the local shards: DTensor
dispatch costs far more than the arithmetic on small tensors, and some ops the kernels use
(``torch._foreach_copy_``, DTensor minus Tensor) have no DTensor rule.

A global norm over DTensors needs their local sums of squares added across the mesh dimensions
they are sharded on: one all-reduce of the packed statistics per (mesh, sharded dims), i.e.
exactly one per norm for an FSDP2 model on a 1-D mesh. Replicated mesh dimensions (HSDP) hold
copies and are not summed.
"""

from __future__ import annotations

import sys
from typing import Any, Hashable

import torch
from torch import Tensor

from .norms import local_norm_stats

__all__ = ["is_dtensor", "local", "local_list", "split_for_norm", "mesh_norm_stats"]


_PLAIN = (Tensor, torch.nn.Parameter)


def _dtensor_type() -> type | None:
    # A DTensor can only exist once its module is imported; looking it up in sys.modules keeps
    # single-process users from paying for the torch.distributed.tensor import.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(t: Tensor) -> bool:
    if type(t) in _PLAIN:  # the common case, answered without the module lookup
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (aliasing its storage), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def local_list(tensors: list[Tensor]) -> list[Tensor]:
    cls = _dtensor_type()
    if cls is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, cls) else t for t in tensors]


def _mesh_key(dt: Tensor) -> tuple[Hashable, tuple[int, ...]]:
    from torch.distributed.tensor import Partial, Shard

    sharded = []
    for dim, placement in enumerate(dt.placements):
        if isinstance(placement, Partial):
            raise ValueError("a norm over a DTensor with a Partial placement is undefined before "
                             "its reduction; reduce the gradient first (FSDP2 gradients are "
                             "Shard(0))")
        if isinstance(placement, Shard):
            sharded.append(dim)
    return dt.device_mesh, tuple(sharded)


def split_for_norm(tensors: list[Tensor], owners: list[Tensor]
                   ) -> tuple[list[Tensor], dict[tuple, list[Tensor]]]:
    """Split ``tensors`` by how their norm contributions must be summed.

    ``owners[i]`` is the tensor whose placement ``tensors[i]`` shares (the parameter of a
    gradient, say), so local views can be passed in. Returns the plain tensors and, per
    (mesh, sharded mesh dims), the local shards of the DTensor ones.
    """
    cls = _dtensor_type()
    if cls is None:
        return list(tensors), {}
    plain: list[Tensor] = []
    sharded: dict[tuple, list[Tensor]] = {}
    for t, owner in zip(tensors, owners, strict=True):
        if isinstance(owner, cls):
            sharded.setdefault(_mesh_key(owner), []).append(
                t.to_local() if isinstance(t, cls) else t)
        else:
            plain.append(t)
    return plain, sharded


def mesh_norm_stats(sharded: dict[tuple, list[Tensor]]) -> Tensor | None:
    """Packed norm statistics of DTensor shards, summed over their meshes; None if empty.

    Every rank of a mesh holds the same DTensor parameters (some shards may be empty), so the
    keys and their order agree across ranks and the collectives pair up.
    """
    total = None
    for (mesh, dims), shards in sharded.items():
        stats = local_norm_stats(shards)
        for dim in dims:
            # Looked up at call time so communication accounting can wrap it.
            torch.distributed.all_reduce(stats, group=mesh.get_group(dim))
        total = stats if total is None else total + stats.to(total.device)
    return total


def check_fsdp1_connected(optimizer: Any) -> None:
    """Refuse FSDP1 pieces whose norms nobody sums across ranks.

    FSDP1 (``use_orig_params=True``) hands the optimizer plain tensors that are this rank's piece
    of a flat shard; nothing but FSDP's ``_fsdp_flattened`` mark tells them from whole
    parameters. Without ``for_fsdp`` the SAM and clipping norms and the non-finite check would
    be this rank's alone: a different perturbation, clip and skip decision on every rank.
    """
    if getattr(optimizer, "_fsdp_connected", False):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if getattr(p, "_fsdp_flattened", False):
                raise RuntimeError(
                    "the optimizer holds parameters of a FullyShardedDataParallel (FSDP1) "
                    "model, whose pieces are sharded across ranks, but its norms are this "
                    "rank's alone; call neurooptima.distributed.for_fsdp(optimizer, model) "
                    "after building the optimizer")
