"""Adapters for training loops that never pass a closure (Hugging Face Trainer, accelerate).

Each framework is imported only by its own module (``neurooptima.integrations.transformers``,
``neurooptima.integrations.accelerate``), so importing this package needs none of them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["unwrap_optimizer"]


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
