"""NeuroOptima on FSDP-wrapped models: FSDP2 (``fully_shard``) and FSDP1 (``FullyShardedDataParallel``).

FSDP2 needs nothing here: its parameters are DTensors, and ``NeuroOptima`` itself runs the
kernels on their local shards and sums norms over their device mesh (``neurooptima.dtensor``).

FSDP1 with ``use_orig_params=True`` hands the optimizer plain tensors that are this rank's piece
of a flat shard (empty on some ranks). Nothing on such a tensor says it is a piece, so the
optimizer must be told: ``for_fsdp(optimizer, model)`` makes its SAM and clipping norms sum over
FSDP's process group, with one all-reduce per norm. Calling it on an FSDP2 model only validates.

``materialize_state`` prepares a fresh optimizer for ``torch.distributed.checkpoint`` loading.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from neurooptima import NeuroOptima
from neurooptima.dtensor import is_dtensor
from neurooptima.functional import state_keys

from .collectives import all_reduce_norm_stats

__all__ = ["for_fsdp", "materialize_state", "SAM_MODES"]

SAM_MODES = ("global", "local")


def _fsdp1_modules(model: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def _fsdp1_norm_group(modules: list[Any]) -> Any | None:
    """The process group over which FSDP1 shards parameters; None when it does not shard."""
    from torch.distributed.fsdp import ShardingStrategy

    groups = []
    for m in modules:
        if not m._use_orig_params:
            raise ValueError("for_fsdp needs FullyShardedDataParallel(use_orig_params=True): "
                             "NeuroOptima keeps per-parameter state and param groups, which "
                             "flat parameters do not have")
        if m.sharding_strategy != ShardingStrategy.NO_SHARD:
            # For hybrid sharding this is the intra-node shard group; replicas hold copies.
            groups.append(m.process_group)
    if not groups:
        return None
    if any(g is not groups[0] for g in groups):
        raise ValueError("all FullyShardedDataParallel instances of the model must shard over "
                         "the same process group")
    return groups[0]


def for_fsdp(optimizer: NeuroOptima, model: nn.Module, *, sam_mode: str = "global"
             ) -> NeuroOptima:
    """Check ``optimizer`` against the FSDP-wrapped ``model`` and connect its norms; returns it.

    Args:
        optimizer: a ``NeuroOptima`` built from ``model``'s parameters.
        model: the root module, wrapped with ``fully_shard`` or ``FullyShardedDataParallel``.
        sam_mode: ``"global"`` (exact SAM on the global batch). ``"local"`` (per-replica
            perturbation) needs every rank to hold full weights, which a sharded model does
            not, so it is refused.
    """
    if sam_mode not in SAM_MODES:
        raise ValueError(f"sam_mode must be one of {SAM_MODES}, got {sam_mode!r}")
    if not isinstance(optimizer, NeuroOptima):
        raise TypeError(f"optimizer must be a NeuroOptima, got {type(optimizer).__name__}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    fsdp1 = _fsdp1_modules(model)
    if any(is_dtensor(p) for p in params):
        if fsdp1:
            raise ValueError("model mixes FullyShardedDataParallel and fully_shard")
        sharded = True  # fully_shard shards every parameter it manages on dim 0
        group = None
    elif fsdp1:
        group = _fsdp1_norm_group(fsdp1)
        sharded = group is not None
    else:
        raise ValueError("model is not wrapped with fully_shard or FullyShardedDataParallel "
                         "(no DTensor parameter and no FullyShardedDataParallel submodule); "
                         "wrap it before building the optimizer")
    if sam_mode == "local" and sharded and optimizer.sam_enabled:
        raise ValueError("sam_mode='local' perturbs each replica with its own gradient and "
                         "needs every rank to hold full weights; an FSDP model is sharded, so "
                         "use sam_mode='global'")
    if group is not None:
        own = {id(p) for p in model.parameters()}
        if any(id(p) not in own for p in params):
            raise ValueError("optimizer holds parameters that are not the model's; build it "
                             "from the FSDP-wrapped model's parameters")
        if "_reduce_norm_stats" in vars(optimizer) or (
                type(optimizer)._reduce_norm_stats is not NeuroOptima._reduce_norm_stats):
            raise ValueError("optimizer already reduces its norms across ranks (for_fsdp "
                             "applied twice, or a distributed NeuroOptima subclass)")
        # The optimizer's own hook for distributed backends, set on this instance.
        optimizer._reduce_norm_stats = _AllReduceStats(group)
    optimizer._fsdp_connected = True  # checked: the core's FSDP1 guard lets it step
    return optimizer


class _AllReduceStats:
    """Sums packed norm statistics over one process group: a single all-reduce."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, stats: Tensor) -> Tensor:
        return all_reduce_norm_stats(stats, self.group)


@torch.no_grad()
def materialize_state(optimizer: NeuroOptima) -> NeuroOptima:
    """Create every per-parameter buffer a step would create, so a fresh optimizer can be loaded.

    ``get_optimizer_state_dict`` describes only the state that exists, and
    ``torch.distributed.checkpoint`` loads only what the description lists. NeuroOptima creates
    its update buffers at the first update (Lookahead's slow weights already exist, so torch's
    own zero-gradient warm-up step is skipped), so call this on a fresh optimizer before
    building the state dict to load into. The values are placeholders (step 0, zeros) that the
    load overwrites; it is not a substitute for loading.
    """
    for group in optimizer.param_groups:
        names = state_keys(group["update"])
        for p in group["params"]:
            if not p.requires_grad:
                continue
            state = optimizer.state[p]
            if names[0] in state:
                continue
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for name in names:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer
