"""Adapters for training loops that never pass a closure (Hugging Face Trainer, accelerate,
Lightning).

Each framework is imported only by its own module (``neurooptima.integrations.transformers``,
``neurooptima.integrations.accelerate``, ``neurooptima.integrations.lightning``), so importing
this package needs none of them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

from ..momentum_ascent import EVALUATING

__all__ = ["unwrap_optimizer", "to_weights", "back_to_ascent", "at_weights"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``, ...): the first object down the ``.optimizer`` /
    ``._optimizer`` chain that has ``first_step`` (NeuroOptima's SAM phases), else the
    innermost optimizer."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        if hasattr(type(optimizer), "first_step"):
            return optimizer
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


def to_weights(optimizers: Iterable[Any]) -> list[Any]:
    """``eval()`` on each optimizer (unwrapped) that has the phases and is in training mode:
    under momentum ascent the model moves from the ascent point to ``w``. Returns the ones it
    switched, for ``back_to_ascent``; optimizers without the phases are left alone."""
    moved = []
    for optimizer in optimizers:
        inner = unwrap_optimizer(optimizer)
        if callable(getattr(inner, "eval", None)) and hasattr(inner, "param_groups") and \
                not any(group.get(EVALUATING) for group in inner.param_groups):
            inner.eval()
            moved.append(inner)
    return moved


def back_to_ascent(moved: Iterable[Any]) -> None:
    """``train()`` on the optimizers ``to_weights`` switched: back to the ascent point."""
    for optimizer in moved:
        optimizer.train()


@contextlib.contextmanager
def at_weights(*optimizers: Any) -> Iterator[None]:
    """The model at ``w`` inside; afterwards where it was (a model already at ``w`` stays)."""
    moved = to_weights(o for o in optimizers if o is not None)
    try:
        yield
    finally:
        back_to_ascent(moved)
