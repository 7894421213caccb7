"""Loss scaling for ``ShardedNeuroOptima``: torch's ``GradScaler`` protocol on the reduced gradients.

By the time ``scaler.unscale_(optimizer)`` or ``scaler.step(optimizer)`` runs, the gradients have
left ``p.grad``: each rank holds its chunk of the reduced (mean) gradient. torch's own scalers
would unscale and inspect the local ``p.grad`` and decide overflow on each rank alone, so ranks
would keep different loss scales. ``ShardedGradScaler`` hands both jobs to the optimizer: it
unscales the reduced chunks and checks them with one all-reduce, so every rank takes the same
skip decision and keeps the same scale. Everything else (``scale``, ``update``, the growth and
backoff schedule, ``state_dict``) is torch's.

    scaler = ShardedGradScaler("cuda")
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)            # optional: only to clip
    optimizer.clip_grad_norm_(1.0)        # optional
    scaler.step(optimizer)
    scaler.update()
"""

from __future__ import annotations

from types import FrameType
from typing import Any

import torch
from torch.amp.grad_scaler import GradScaler, OptState

__all__ = ["ShardedGradScaler", "TORCH_SCALER_ERROR", "torch_scaler_reading"]

TORCH_SCALER_ERROR = (
    "torch's GradScaler unscales and checks each rank's own p.grad, which ShardedNeuroOptima has "
    "already reduced and sent to the ranks that own it: the update would keep the loss scale, "
    "and ranks would take different overflow decisions and keep different loss scales; use "
    "neurooptima.distributed.ShardedGradScaler (same arguments) with ShardedNeuroOptima")


def torch_scaler_reading(frame: FrameType | None) -> bool:
    """Whether ``frame`` is a torch loss scaler unscaling gradients (``torch.amp.GradScaler``,
    its CUDA alias, FSDP's ``ShardedGradScaler``): they reach the gradients through the
    optimizer's ``param_groups``, so ``ShardedNeuroOptima`` refuses them there."""
    return (frame is not None and frame.f_code.co_name == "_unscale_grads_"
            and frame.f_globals.get("__name__", "").startswith("torch."))


def _is_sharded(optimizer: Any) -> bool:
    return getattr(optimizer, "_unscale_reduced_", None) is not None


class ShardedGradScaler(GradScaler):
    """``torch.amp.GradScaler`` whose overflow check and unscaling run on ``ShardedNeuroOptima``'s
    reduced gradient chunks, with one decision for all ranks. Other optimizers get torch's
    behaviour unchanged. Arguments as ``torch.amp.GradScaler`` (``device`` first)."""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if not _is_sharded(optimizer):
            return super().unscale_(optimizer)
        if not self._enabled:
            return None
        scale, _ = self._check_scale_growth_tracker("unscale_")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the "
                               "last update().")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        # As torch does: the reciprocal in float64, then float32.
        inv_scale = scale.double().reciprocal().float()
        found_inf = optimizer._unscale_reduced_(inv_scale).to(scale.device)
        state["found_inf_per_device"] = {found_inf.device: found_inf}
        state["stage"] = OptState.UNSCALED
        return None

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[Any, Any]:
        if not _is_sharded(optimizer):
            return super()._check_inf_per_device(optimizer)
        scale, _ = self._check_scale_growth_tracker("_check_inf_per_device")
        found_inf = optimizer._unscale_reduced_(None).to(scale.device)
        self._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = {
            found_inf.device: found_inf}
        return self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
