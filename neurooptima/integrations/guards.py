"""Refuse the framework paths that would run SAM wrong, before the step changes anything.

Four callers hand NeuroOptima a step that cannot be SAM's two passes, and each looks like an
ordinary call from inside the optimizer:

* accelerate's ``AcceleratedOptimizer`` under gradient accumulation drops ``step(closure)`` on
  all but the last micro-batch: the closure would see one micro-batch in N;
* ``GradScaler.step(optimizer, closure)`` (accelerate with fp16 passes the closure positionally)
  unscales the gradients before the step, so the closure's passes would reach the update
  scaled;
* Lightning's ``MixedPrecision`` plugin with a scaler runs the closure itself and then calls
  ``step()`` without it: the core's generic "pass step(closure)" error would name a call the
  user never wrote.
* Lightning's ``accumulate_grad_batches > 1`` runs the closure of the last micro-batch only
  inside ``step(closure)``, the others before it: the second pass would see one micro-batch.

``check_step``, a step pre-hook that NeuroOptima and ShardedNeuroOptima register on
themselves, looks for these callers on the stack, only on steps that run two-pass SAM; every
other step returns at once. Nothing here imports a framework.
"""

from __future__ import annotations

import os
import sys
from types import FrameType
from typing import Any

__all__ = ["check_step", "ACCUMULATION", "SCALER_CLOSURE", "LIGHTNING_FP16",
           "LIGHTNING_ACCUMULATION"]

ACCUMULATION = (
    "accelerate's gradient accumulation (gradient_accumulation_steps={steps}) skips "
    "optimizer.step(closure) on all but the last micro-batch, so SAM's two passes would see "
    "one micro-batch in {steps}: call neurooptima.integrations.accelerate.sam_step(accelerator, "
    "optimizer, model, micro_batches, loss_fn) once per step, outside accelerator.accumulate(), "
    "or use sam_ascent='momentum' (one gradient a step, no closure needed)")
SCALER_CLOSURE = (
    "GradScaler.step(optimizer, closure) (accelerate does this with mixed_precision='fp16') "
    "unscales the gradients before SAM's passes run, so the second pass would reach the update "
    "still scaled: with accelerate call neurooptima.integrations.accelerate.sam_step, "
    "elsewhere scale, unscale_ and second_step() yourself (README, AMP recipe); or use bf16 "
    "(no scaler), or sam_ascent='momentum'")
LIGHTNING_FP16 = (
    "Lightning's MixedPrecision plugin (precision='16-mixed', a GradScaler) runs the "
    "training_step closure itself and then calls optimizer.step() without it, so SAM's second "
    "pass cannot run: use manual optimization (self.automatic_optimization = False; "
    "first_step()/second_step() in training_step, docs/lightning.md), or precision="
    "'bf16-mixed' (no scaler: the closure reaches the optimizer), or sam_ascent='momentum'")
LIGHTNING_ACCUMULATION = (
    "Lightning's gradient accumulation (accumulate_grad_batches={steps}) runs the closure of "
    "only the last micro-batch inside optimizer.step, so SAM's second pass would see one "
    "micro-batch in {steps}: use manual optimization (both passes over the micro-batches, "
    "docs/lightning.md), or sam_ascent='momentum'")

_SEP = os.sep


def _frames(limit: int = 16) -> list[FrameType]:
    frame, out = sys._getframe(2), []
    while frame is not None and len(out) < limit:
        out.append(frame)
        frame = frame.f_back
    return out


def _two_pass_due(optimizer: Any) -> bool:
    if optimizer.__dict__.get("_sam_phase") is not None:
        return False  # the second half of first_step()/second_step(): no closure is right
    if not any(group.get("sam_rho", 0) > 0 for group in optimizer.param_groups):
        return False
    return bool(getattr(optimizer, "sam_due", True))


def check_step(optimizer: Any, args: tuple, kwargs: dict) -> None:
    """Raise ``RuntimeError`` when ``optimizer.step`` was called by one of the framework paths
    above on a step that runs two-pass SAM; else return None (the step goes on). ``args`` and
    ``kwargs`` are the step's, as torch hands them to a step pre-hook (``args[0]`` is the
    optimizer)."""
    if not hasattr(type(optimizer), "first_step") or not _two_pass_due(optimizer):
        return
    closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
    for frame in _frames():
        path, name = frame.f_code.co_filename, frame.f_code.co_name
        owner = frame.f_locals.get("self")
        if closure is None:
            module = frame.f_locals.get("model")  # manual optimization gets the core's error
            if (name == "optimizer_step" and "lightning" in path
                    and getattr(owner, "scaler", None) is not None
                    and getattr(module, "automatic_optimization", True)):
                raise RuntimeError(LIGHTNING_FP16)
            continue
        if name == "optimizer_step" and "lightning" in path:
            steps = getattr(getattr(owner, "trainer", None), "accumulate_grad_batches", 1)
            if isinstance(steps, int) and steps > 1:
                raise RuntimeError(LIGHTNING_ACCUMULATION.format(steps=steps))
        if name in ("step", "_maybe_opt_step") and path.endswith(
                f"amp{_SEP}grad_scaler.py"):
            raise RuntimeError(SCALER_CLOSURE)
        if name == "step" and path.endswith(f"accelerate{_SEP}optimizer.py"):
            steps = getattr(getattr(owner, "gradient_state", None), "num_steps", 1)
            if steps > 1:
                raise RuntimeError(ACCUMULATION.format(steps=steps))

