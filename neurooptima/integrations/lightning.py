"""Momentum ascent under Lightning: validation, checkpoints and the trained model at ``w``.

With ``sam_ascent="momentum"`` the model holds the ascent point ``w~`` between steps. Lightning
trains it unchanged (one gradient a step), but never calls the optimizer's ``eval()``: without
help, validation scores ``w~`` and checkpoints store ``w~``. Add ``EvalAtWeights()`` to the
Trainer's callbacks:

* validation (and the sanity check) runs at ``w``;
* every checkpoint holds ``w`` and the optimizer state in eval mode (which keeps ``w~``), so
  resuming from it continues the exact trajectory;
* after ``fit`` the module is left at ``w``, ready to test, predict or export; a later ``fit``
  goes back to the ascent point before its first step.

Optimizers without momentum ascent are left alone, so the callback is harmless elsewhere.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils._pytree import tree_map_only

from . import back_to_ascent, to_weights, unwrap_optimizer

__all__ = ["EvalAtWeights"]


class EvalAtWeights(L.Callback):
    """Lightning callback: the model at ``w`` whenever Lightning reads it (see module doc)."""

    def __init__(self) -> None:
        self._moved: list[Any] = []

    @staticmethod
    def _train(trainer: L.Trainer) -> None:
        # A checkpoint resumes in eval mode (model at w): back to the ascent point.
        back_to_ascent(unwrap_optimizer(o) for o in trainer.optimizers
                       if callable(getattr(unwrap_optimizer(o), "train", None)))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._moved = to_weights(trainer.optimizers)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        back_to_ascent(self._moved)
        self._moved = []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        to_weights(trainer.optimizers)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Lightning has already read the weights (at w~, in training): read them again at w,
        # with the optimizer state in eval mode to match.
        moved = to_weights(trainer.optimizers)
        if not moved:
            return
        try:  # copies: state dicts share storage with tensors that train() overwrites
            checkpoint["state_dict"] = _cloned(trainer.strategy.lightning_module_state_dict())
            if "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = [_cloned(trainer.strategy.optimizer_state(o))
                                                  for o in trainer.optimizers]
        finally:
            back_to_ascent(moved)


def _cloned(tree: Any) -> Any:
    return tree_map_only(torch.Tensor, lambda t: t.detach().clone(), tree)
