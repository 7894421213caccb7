"""The single-process strategy every ``--strategy`` builds on, and what strategies share.

``launch.strategies`` (the distributed strategies and ``make_strategy``) and
``launch.deepspeed_strategy`` both import from here, so neither imports the other at load time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from neurooptima import frozen_batchnorm_stats

from .checkpoint_state import load_torch_file, save_torch_file
from .optimizers import build_optimizer

__all__ = ["BackendUnavailable", "LossFn", "Strategy"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class BackendUnavailable(RuntimeError):
    """The backend a strategy needs is not part of this installation."""


def _require_module(strategy: str, module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise BackendUnavailable(f"--strategy {strategy} needs {what} ({module}), which is not "
                                 f"available in this installation")


class Strategy:
    """Single process: the model and optimizer as they are."""

    name = "single"
    sharded_checkpoint = False

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.model: nn.Module | None = None    # what forward runs on (possibly wrapped)
        self.module: nn.Module | None = None   # the user's model
        self.optimizer: torch.optim.Optimizer | None = None

    # -------------------------------------------------------------- set-up

    def setup(self, model: nn.Module) -> None:
        self.module = model.to(self.device)
        self.model = self.wrap(self.module)
        self.optimizer = self.make_optimizer()

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def make_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.args, self.model.parameters())

    # -------------------------------------------------------------- steps

    def train_step(self, inputs: Tensor, targets: Tensor, loss_fn: LossFn) -> Tensor:
        """One update on this rank's batch; returns the (first-pass) loss, detached."""
        model, optimizer = self.model, self.optimizer
        model.train()

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            # The second SAM pass must not count the batch twice in BatchNorm statistics.
            frozen = getattr(optimizer, "in_second_pass", False)
            with frozen_batchnorm_stats(model) if frozen else contextlib.nullcontext():
                loss = loss_fn(model(inputs), targets)
            loss.backward()
            return loss

        if getattr(optimizer, "sam_enabled", False):
            loss = optimizer.step(closure)
        else:
            loss = closure()
            optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def eval_forward(self, inputs: Tensor) -> Tensor:
        self.model.eval()
        return self.model(inputs)

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """The weights to evaluate: under momentum ascent the model holds the ascent point
        while training, so the optimizer's ``eval()`` moves it to ``w`` and ``train()`` back
        (bit for bit) afterwards; a no-op for optimizers without them."""
        self.weights_eval()
        try:
            yield
        finally:
            self.weights_train()

    def weights_eval(self) -> None:
        switch = getattr(self.optimizer, "eval", None)
        if callable(switch):
            switch()

    def weights_train(self) -> None:
        switch = getattr(self.optimizer, "train", None)
        if callable(switch):
            switch()

    # -------------------------------------------------------------- checkpoints

    def save(self, directory: Path) -> None:
        """Collective: every rank calls it; writes the model and optimizer state."""
        save_torch_file(directory, self.module, self.optimizer, self.rank)

    def load(self, directory: Path) -> None:
        load_torch_file(directory, self.module, self.optimizer, self.device)
