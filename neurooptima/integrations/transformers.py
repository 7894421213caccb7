"""Exact two-pass SAM inside the Hugging Face ``Trainer``.

``Trainer`` runs forward and backward in ``training_step`` and then calls ``optimizer.step()``
without a closure, so SAM's second gradient (at ``w + e``) never happens on its own. Here
``training_step`` runs it: every micro-batch of the optimizer step goes through the first pass
(at ``w``) as Trainer runs it; after the last one, ``first_step()`` moves to ``w + e`` and every
micro-batch goes through the second pass; Trainer's own ``optimizer.step()`` then finishes the
SAM step (back to ``w``, the update). With gradient accumulation both passes see every
micro-batch, so a step equals ``step(closure)`` on the concatenated batch.

Trainer's gradient clipping (``max_grad_norm``, default 1.0) acts on the second-pass gradient,
the one the update uses, as NeuroOptima's own ``max_grad_norm`` does. The one-gradient form
(``sam_ascent="momentum"``) and SAM off need none of this: plain ``Trainer`` runs them, and it
calls the optimizer's ``train()``/``eval()`` around training and evaluation itself. It does not
around saving: plain Trainer saves the model at the ascent point ``w~``. ``SAMTrainer`` saves at
``w``: models, and checkpoints whose optimizer state (in eval mode, holding ``w~``) resumes
the exact trajectory.

Combinations that cannot be exact raise ``SAMTrainerError`` at the first SAM step: DeepSpeed
(its engine steps the optimizer per partition), FSDP through accelerate, fp16 with a gradient
scaler (an overflow skips the step after the weights moved to ``w + e``; use ``bf16=True``)
and SageMaker model parallelism.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..batchnorm import frozen_batchnorm_stats
from . import at_weights, unwrap_optimizer

__all__ = ["SAMTrainerMixin", "SAMTrainer", "SAMTrainerError"]


class SAMTrainerError(RuntimeError):
    """A Trainer setting with which two-pass SAM cannot be exact."""


_FIX = ("; use sam_ascent='momentum' (one gradient a step, which plain Trainer runs), or "
        "train this configuration in a loop of your own with step(closure)")


def _check_exact(trainer: Any) -> None:
    args = trainer.args
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise SAMTrainerError(
            "two-pass SAM under Trainer's DeepSpeed integration cannot be exact: the DeepSpeed "
            "engine steps the optimizer once per partition without a closure; drive SAM at "
            "engine level with neurooptima.distributed.deepspeed.sam_step" + _FIX)
    if getattr(trainer, "is_fsdp_enabled", False):
        raise SAMTrainerError(
            "two-pass SAM under Trainer's FSDP integration is not supported by SAMTrainer: "
            "see docs/distributed.md for SAM with FSDP (for_fsdp)" + _FIX)
    if getattr(trainer.accelerator, "scaler", None) is not None:
        raise SAMTrainerError(
            "two-pass SAM with fp16=True (a gradient scaler) cannot be exact in Trainer: an "
            "overflow makes the scaler skip optimizer.step() after first_step() moved the "
            "weights to w + e; use bf16=True (no scaler)" + _FIX)
    if getattr(args, "n_gpu", 1) > 1:
        raise SAMTrainerError(
            "two-pass SAM with torch.nn.DataParallel (several GPUs in one process) is not "
            "supported: launch one process per GPU (torchrun), which Trainer runs as DDP" + _FIX)


class SAMTrainerMixin:
    """Put before ``Trainer`` (or a Trainer subclass) in the bases: ``class MyTrainer(
    SAMTrainerMixin, Trainer)``. Steps on which the optimizer runs no two-pass SAM
    (``sam_rho=0``, ``sam_ascent="momentum"``, a scheduled plain step, another optimizer)
    go through Trainer's ``training_step`` unchanged. Models and checkpoints are saved at
    ``w`` (``optimizer.eval()`` around them), never at a momentum-ascent point."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        with at_weights(self.optimizer):
            super().save_model(output_dir, _internal_call)  # type: ignore[misc]

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # The model and the optimizer's state in one mode: at w, the state in eval mode
        # (holding w~), so that Trainer's train() on resuming restores the ascent point.
        with at_weights(self.optimizer):
            super()._save_checkpoint(model, trial)  # type: ignore[misc]

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        optimizer = unwrap_optimizer(self.optimizer)
        pending: list = self.__dict__.setdefault("_sam_micro_batches", [])
        if not getattr(optimizer, "sam_due", False):
            pending.clear()
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        _check_exact(self)
        pending.append((inputs, num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        if not self.accelerator.gradient_state.sync_gradients:  # type: ignore[attr-defined]
            return loss  # more micro-batches of this step to come
        micro_batches = list(pending)
        pending.clear()
        optimizer.first_step(zero_grad=True)  # to w + e
        # The second pass, as Trainer ran the first: the gradients of all but the last
        # micro-batch stay local (DDP reduces once); BatchNorm counts each batch once.
        with frozen_batchnorm_stats(model):
            for i, (batch, count) in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                with (contextlib.nullcontext() if last
                      else self.accelerator.no_sync(model)):  # type: ignore[attr-defined]
                    super().training_step(model, batch, count)  # type: ignore[misc]
        return loss  # the first-pass loss, at w, as step(closure) returns it


class SAMTrainer(SAMTrainerMixin, Trainer):
    """``transformers.Trainer`` with exact two-pass SAM for a NeuroOptima optimizer."""
