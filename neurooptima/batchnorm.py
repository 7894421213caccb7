"""Keep the second SAM pass from updating BatchNorm running statistics.

SAM evaluates the loss twice per step; in train mode both forwards would update BatchNorm's
running mean and variance (and ``num_batches_tracked``), so running statistics would see every
batch twice, once at perturbed weights. Inside ``frozen_batchnorm_stats(model)`` BatchNorm layers
still normalise with batch statistics (the gradient is unchanged) but leave their buffers alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Context manager: BatchNorm layers of ``model`` do not update their running statistics."""
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            saved.append(module)
            # In train mode, track_running_stats=False means: use batch statistics and touch
            # no buffer. That is exactly the second SAM pass.
            module.track_running_stats = False
    try:
        yield
    finally:
        for module in saved:
            module.track_running_stats = True
