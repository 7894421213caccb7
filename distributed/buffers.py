"""Module buffers (BatchNorm running statistics) kept equal across data-parallel ranks.

As DDP's ``broadcast_buffers=True``: before every forward that records gradients, the group's
first rank broadcasts its buffers, one collective per (device, dtype). Each rank's forward then
updates them from its own batch, and the next forward starts again from rank 0's values.
"""

from __future__ import annotations

import datetime
from collections import defaultdict

import torch
from torch import Tensor, nn

from .collectives import broadcast_

__all__ = ["BufferBroadcast"]


class BufferBroadcast:
    """A forward pre-hook on ``module`` that broadcasts its buffers from the group's first rank."""

    def __init__(self, module: nn.Module, groups: list | None = None,
                 timeout: datetime.timedelta | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        # Broadcast in each group in turn (across replicas, then within the shard group).
        self.groups = groups if groups is not None else [None]
        self.timeout = timeout
        self.handle = module.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            self.broadcast()

    @torch.no_grad()
    def broadcast(self) -> None:
        groups: dict[tuple, list[Tensor]] = defaultdict(list)
        for buffer in self.module.buffers():
            groups[(buffer.device, buffer.dtype)].append(buffer)
        for buffers in groups.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            for group in self.groups:
                broadcast_(flat, group, self.timeout, "broadcast of module buffers")
            for b, piece in zip(buffers, flat.split([b.numel() for b in buffers])):
                b.copy_(piece.view_as(b))

    def remove(self) -> None:
        self.handle.remove()
