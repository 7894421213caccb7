"""Exact two-pass SAM with Hugging Face accelerate: ``sam_step``.

``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``, which forwards
``step``/``zero_grad`` but not SAM's phases (reach them through ``unwrap_optimizer`` or the
wrapper's ``.optimizer``). Two things in accelerate break ``optimizer.step(closure)`` for SAM,
and the optimizer refuses both (see ``guards``): inside ``accelerator.accumulate`` the wrapper
drops ``step`` on all but the last micro-batch, so the closure would see one micro-batch in N;
with fp16 the gradient scaler unscales before calling ``step(closure)``, so the second pass
would reach the update still scaled. ``sam_step`` runs one optimizer step over the micro-batches
of that step itself: both passes over every micro-batch (gradients reduced once per pass under
DDP), the scaler's unscale, skip and update as ``GradScaler`` does for a plain step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..batchnorm import frozen_batchnorm_stats
from . import unwrap_optimizer

__all__ = ["sam_step", "unwrap_optimizer"]


def _backward_all(accelerator: Any, model: nn.Module, micro_batches: Sequence[Any],
                  loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> torch.Tensor:
    """Backward of the mean loss over the micro-batches (each ``loss_fn`` a micro-batch mean);
    only the last backward reduces gradients across processes."""
    # accelerator.backward divides by its gradient_accumulation_steps; scale to 1/len instead.
    scale = accelerator.gradient_accumulation_steps / len(micro_batches)
    total = torch.zeros(())
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = loss_fn(model, batch)
            accelerator.backward(loss * scale)
        total = total + loss.detach().float().cpu()
    return total / len(micro_batches)


def sam_step(accelerator: Any, optimizer: Any, model: nn.Module, micro_batches: Sequence[Any],
             loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> torch.Tensor:
    """One optimizer step of NeuroOptima over ``micro_batches`` (one or more; their mean loss
    is the objective), SAM exact when the optimizer runs it on this step. Call it outside
    ``accelerator.accumulate`` (it accumulates itself). ``optimizer`` is the prepared one;
    ``loss_fn(model, batch)`` returns a micro-batch's mean loss. Returns the mean first-pass
    loss, at ``w``."""
    inner = unwrap_optimizer(optimizer)
    if not hasattr(inner, "first_step"):
        raise TypeError(f"sam_step needs a NeuroOptima optimizer (prepared or not), got "
                        f"{type(inner).__name__}")
    if not micro_batches:
        raise ValueError("micro_batches is empty: pass the micro-batches of one step")
    if not accelerator.sync_gradients:
        raise RuntimeError("sam_step was called inside accelerator.accumulate(), which holds "
                           "back the optimizer step: call it outside, with all the "
                           "micro-batches of one step (it accumulates them itself)")
    optimizer.zero_grad()
    if not getattr(inner, "sam_due", inner.sam_enabled):
        loss = _backward_all(accelerator, model, micro_batches, loss_fn)
        optimizer.step()
        optimizer.zero_grad()
        return loss
    loss = _backward_all(accelerator, model, micro_batches, loss_fn)  # at w
    inner.first_step(zero_grad=True)  # to w + e (the direction ignores a loss scale)
    with frozen_batchnorm_stats(model):
        _backward_all(accelerator, model, micro_batches, loss_fn)  # at w + e
    scaler = accelerator.scaler
    if scaler is not None:
        # As GradScaler.step does for a plain step, but second_step() also runs when the
        # gradients overflowed: it skips the update and takes the weights back to w.
        scaler.unscale_(inner)
        inner.second_step()
        scaler.update()
    else:
        optimizer.step()  # the wrapper's step completes the step first_step() began
    optimizer.zero_grad()
    return loss
