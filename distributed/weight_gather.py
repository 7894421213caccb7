"""The all-gather of the updated weights at the end of a step: at once, or prefetched.

At once (default): every bucket's all-gather is started and written into the module's
parameters before ``step()`` returns, with at most ``BUCKETS_IN_FLIGHT`` full-size receive
buffers alive at a time.

Prefetched (``overlap_param_gather=True``, as Megatron's ``overlap_param_gather``): ``step()``
starts every bucket's all-gather, in the order the forward uses them (the reverse of the
gradient buckets), and returns. A forward pre-hook on each submodule that owns parameters waits
only for the buckets of those parameters and writes them, so the first layers compute while the
last layers' weights are still in flight. Everything that reads the weights otherwise waits for
all of them first: the optimizer's own next phase, ``module.state_dict()`` and
``load_state_dict()``, the optimizer's ``load_state_dict``, and
``ShardedNeuroOptima.wait_for_weights()`` for code that reads ``p`` directly. The cost is
memory: all receive buffers are alive until the forward reaches them.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
from torch import Tensor, nn

from .collectives import all_gather_flat, wait
from .flat_shards import Bucket

__all__ = ["WeightGather", "BUCKETS_IN_FLIGHT"]

BUCKETS_IN_FLIGHT = 2  # all-gathers in flight at once when not prefetching


class WeightGather:
    def __init__(self, buckets: list[Bucket], process_group, timeout: datetime.timedelta | None,
                 module: nn.Module | None = None, prefetch: bool = False) -> None:
        if prefetch and module is None:
            raise ValueError("overlap_param_gather=True needs module=...: the forward "
                             "pre-hooks of its submodules wait for their weights")
        self.buckets = buckets
        self.process_group = process_group
        self.timeout = timeout
        self.prefetch = prefetch
        self._pending: dict[int, tuple[Tensor, Any]] = {}  # bucket position -> (out, work)
        self._handles: list = []
        if prefetch:
            position = {slot.param: i for i, b in enumerate(buckets) for slot in b.slots}
            for sub in module.modules():
                mine = sorted({position[p] for p in sub.parameters(recurse=False)
                               if p in position})
                if mine:
                    self._handles.append(sub.register_forward_pre_hook(
                        lambda _m, _a, mine=mine: self.flush(mine)))
            # Reading or loading the module's weights: first let the gathers land.
            self._handles.append(module.register_state_dict_pre_hook(
                lambda *_: self.flush()))
            self._handles.append(module.register_load_state_dict_pre_hook(
                lambda *_: self.flush()))

    def _start(self, position: int) -> tuple[Tensor, Any]:
        bucket = self.buckets[position]
        out = torch.empty(bucket.full_numel(), dtype=bucket.dtype, device=bucket.device)
        return out, all_gather_flat(out, bucket.owned_for_gather(), self.process_group)

    def _finish(self, position: int, out: Tensor, work: Any) -> None:
        wait(work, self.timeout, f"all-gather of weight bucket {position}")
        self.buckets[position].write_params(out)

    @torch.no_grad()
    def gather(self) -> None:
        """All-gather every bucket's updated chunks into the module's parameters."""
        self.flush()
        if self.prefetch:
            for position in reversed(range(len(self.buckets))):  # the forward's order
                self._pending[position] = self._start(position)
            return
        in_flight: list[tuple[int, Tensor, Any]] = []
        for position in range(len(self.buckets)):
            if len(in_flight) >= BUCKETS_IN_FLIGHT:
                self._finish(*in_flight.pop(0))
            in_flight.append((position, *self._start(position)))
        for item in in_flight:
            self._finish(*item)

    @torch.no_grad()
    def flush(self, positions: list[int] | None = None) -> None:
        """Wait for (and write) the prefetched buckets at ``positions``, or all of them."""
        if not self._pending:
            return
        for position in (sorted(self._pending, reverse=True) if positions is None
                         else positions):
            item = self._pending.pop(position, None)
            if item is not None:
                self._finish(position, *item)

    def remove(self) -> None:
        self.flush()
        for handle in self._handles:
            handle.remove()
        self._handles = []
