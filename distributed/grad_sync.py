"""Gradient synchronization of ``ShardedNeuroOptima``: from each rank's ``p.grad`` to the reduced
gradient chunks the inner optimizer updates with.

    backward: post-accumulate-grad hook per parameter -> a bucket whose gradients are all ready
              starts its reduce-scatter, buckets strictly in index order (every rank issues the
              same collectives in the same order, whatever its own graph produced)
    end of backward (autograd callback): every remaining bucket that holds a trainable
              parameter starts its reduce-scatter, missing gradients sent as zeros
    step: wait, average over ranks, hand each chunk its reduced gradient

A parameter gets a gradient if any rank produced one: the mean with zeros from the ranks that
did not, as DDP with ``find_unused_parameters=True``; one that no rank produced gets none and is
not updated, as in one process. The use counts ride in the reduce-scatter (``flat_shards``).

After backward the gradients belong to the optimizer: they are already on their way to their
owners, so an edit of ``p.grad`` (``torch.nn.utils.clip_grad_norm_``, a manual rescale) would be
silently lost. Each packed gradient's identity and version counter are recorded, and ``reduce``
raises when one changed. Clipping and loss-scale unscaling go through the optimizer instead.
``requires_grad`` may change between steps: hooks are added for parameters that start to train.

Host reads: one per gradient reduction, of the use counts (a few bytes): the inner update's
parameter list depends on which parameters some rank produced a gradient for. Everything else
of the step (the finite check, clipping, the SAM norm, the update) stays on the device.
"""

from __future__ import annotations

import datetime
import sys
import weakref
from typing import Callable

import torch
from torch import Tensor
from torch.autograd import Variable

from .collectives import all_reduce_flat, reduce_scatter_flat, wait
from .flat_shards import Bucket

__all__ = ["GradientSync", "GRADIENT_EDIT_ERROR", "BUCKETS_IN_FLIGHT"]

# Reduce-scatters in flight at once. Each holds a full-size send buffer (and on gloo a full-size
# receive buffer) of its bucket; launching a third first completes the oldest, so these
# transients stay within a few buckets however large the model is.
BUCKETS_IN_FLIGHT = 2

GRADIENT_EDIT_ERROR = (
    "ShardedNeuroOptima reduces gradients across ranks during backward(), so an edit of p.grad "
    "after backward would be lost. Clip with max_grad_norm=... or optimizer.clip_grad_norm_("
    "max_norm) between backward and step; with mixed precision use "
    "neurooptima.distributed.ShardedGradScaler (its unscale_ and step work on the reduced "
    "gradients); change gradients before they are reduced with a hook on the tensor "
    "(p.register_hook) instead")


# Every live GradientSync, to tell a second optimizer on the same parameters from accumulation.
_LIVE: "weakref.WeakSet[GradientSync]" = weakref.WeakSet()


def _in_nested_backward() -> bool:
    """Whether this runs inside a backward started from a Python autograd function's backward
    (reentrant activation checkpointing re-runs its segment and calls ``torch.autograd.backward``
    there): the backward that called it is still producing gradients."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "apply" and code.co_filename.endswith(
                ("torch/autograd/function.py", "torch\\autograd\\function.py")):
            return True
        frame = frame.f_back
    return False


class GradientSync:
    """Hooks, bucket launches and the wait for the reduced gradients of one optimizer."""

    def __init__(self, buckets: list[Bucket], process_group, world_size: int,
                 timeout: datetime.timedelta | None, suspended: Callable[[], bool],
                 replicate_group=None, replicas: int = 1) -> None:
        self.buckets = buckets
        self.process_group = process_group  # the shard group: the reduce-scatter's
        self.world_size = world_size
        # Hybrid sharding: each reduced chunk is then summed over the replicas of the shard.
        self.replicate_group = replicate_group
        self.replicas = replicas
        self.timeout = timeout
        self._suspended = suspended  # no_sync(), or SAM-local's first pass
        self._slots = {slot.param: (i, slot) for i, bucket in enumerate(buckets)
                       for slot in bucket.slots}
        self._next = 0  # the first bucket not launched yet: launches go in index order
        self._callback_queued = False
        self.reduced = False  # this step's gradients are in the chunks
        self.ready_order: list[int] = []  # slot indices in the order the hooks fired
        self.record_order = True
        self._sent: list[Bucket] = []  # buckets sent this step
        self._in_flight: list[tuple[int, Bucket]] = []  # sent and not yet completed
        self._packed: dict[int, tuple[weakref.ref | None, int]] = {}  # slot index -> grad, version
        self._hooked: set[int] = set()
        self._hooks: list = []
        self.add_hooks()
        _LIVE.add(self)

    # ------------------------------------------------------------------ hooks

    def add_hooks(self) -> None:
        """Hook every parameter that trains now and has no hook yet (gradual unfreezing)."""
        owner = weakref.ref(self)  # the hooks must not keep a discarded optimizer alive

        def hook(p: Tensor) -> None:
            sync = owner()
            if sync is not None:
                sync._grad_ready(p)

        for param, (_, slot) in self._slots.items():
            if param.requires_grad and slot.index not in self._hooked:
                self._hooks.append(param.register_post_accumulate_grad_hook(hook))
                self._hooked.add(slot.index)

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._hooked = [], set()

    def _grad_ready(self, p: Tensor) -> None:
        if self._suspended():
            return
        position, slot = self._slots[p]
        if position < self._next:  # its bucket is already on its way
            raise RuntimeError(self._twice_message(p, slot.index))
        if not self._callback_queued:
            Variable._execution_engine.queue_callback(self._backward_ended)
            self._callback_queued = True
        if self.record_order:
            self.ready_order.append(slot.index)
        self.buckets[position].ready.add(slot.index)
        self._launch_ready()

    def _twice_message(self, p: Tensor, index: int) -> str:
        shape = tuple(p.shape)
        if any(other is not self and other._hooks and p in other._slots
               for other in list(_LIVE)):
            return (f"the gradient of parameter {index} (shape {shape}) reached a "
                    f"ShardedNeuroOptima that has not stepped since its last backward, while "
                    f"another ShardedNeuroOptima synchronizes the same parameter: two optimizers "
                    f"are hooked to it. Call remove_hooks() on the one you no longer use (e.g. "
                    f"before building a resumed optimizer), or drop every reference to it")
        return (f"the gradient of parameter {index} (shape {shape}) was produced twice before "
                f"step(): its bucket had already been reduced. To accumulate micro-batches, run "
                f"all but the last backward inside optimizer.no_sync(); to run SAM's two passes, "
                f"call first_step() between the backwards")

    def _launch_ready(self) -> None:
        """Start the reduce-scatter of every complete bucket up to the first incomplete one."""
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if bucket.trainable() and len(bucket.ready) < bucket.expected():
                return
            self._launch_next()

    def _launch_next(self) -> None:
        bucket = self.buckets[self._next]
        self._next += 1
        if not bucket.trainable():
            return  # frozen on every rank: nothing to reduce
        while len(self._in_flight) >= BUCKETS_IN_FLIGHT:
            self._complete(*self._in_flight.pop(0))
        bucket.send = bucket.pack_grads()
        for slot in bucket.slots:
            g = slot.param.grad
            self._packed[slot.index] = (None, 0) if g is None else (weakref.ref(g), g._version)
        bucket.work = reduce_scatter_flat(bucket.received, bucket.send, self.process_group)
        bucket.ready.clear()
        self._sent.append(bucket)
        self._in_flight.append((self._next - 1, bucket))

    def _complete(self, position: int, bucket: Bucket) -> None:
        """Wait for one bucket's reduce-scatter, free its buffers, average over ranks."""
        wait(bucket.work, self.timeout, f"reduce-scatter of gradient bucket {position}")
        bucket.work, bucket.send = None, None
        if self.replicate_group is not None:
            wait(all_reduce_flat(bucket.received, self.replicate_group), self.timeout,
                 f"all-reduce of gradient bucket {position} across replicas")
        bucket.average(self.world_size * self.replicas)  # mean over all ranks, as DDP

    def _backward_ended(self) -> None:
        self._callback_queued = False
        if _in_nested_backward():
            # The end of a reentrant checkpoint's inner backward, not of the user's: the next
            # gradient of the outer backward queues the callback again (or step() launches).
            return
        self.launch_all()

    def launch_all(self) -> None:
        """Start every bucket not started yet (the end of backward, or a step without hooks)."""
        self.add_hooks()
        while self._next < len(self.buckets):
            self._launch_next()

    # ------------------------------------------------------------------ step

    def _check_unchanged(self) -> None:
        for bucket in self._sent:
            for slot in bucket.slots:
                ref, version = self._packed[slot.index]
                g = slot.param.grad
                packed = ref() if ref is not None else None
                if g is not packed or (g is not None and g._version != version):
                    raise RuntimeError(
                        f"the gradient of parameter {slot.index} (shape "
                        f"{tuple(slot.param.shape)}) changed after backward. "
                        + GRADIENT_EDIT_ERROR)

    @torch.no_grad()
    def reduce(self, chunks: dict[Tensor, Tensor]) -> None:
        """Wait for every reduce-scatter; give each chunk the mean gradient, or None when no rank
        produced one. A rank that ran no backward still sends zeros, so the collectives match.
        Idempotent until ``discard``."""
        if self.reduced:
            return
        self.launch_all()  # no-op after a backward; else gradients set by hand, or none here
        self._check_unchanged()
        while self._in_flight:
            self._complete(*self._in_flight.pop(0))
        self.reduced = True
        sent = {id(bucket) for bucket in self._sent}
        for bucket in self.buckets:
            if id(bucket) not in sent:
                for slot in bucket.slots:
                    chunks[slot.param].grad = None
        if not self._sent:
            return
        # One host read for all buckets: which parameters some rank produced a gradient for.
        used = torch.cat([bucket.use_counts for bucket in self._sent]).tolist()
        flags = iter(used)
        for bucket in self._sent:
            for slot in bucket.slots:
                chunks[slot.param].grad = (bucket.chunk_view(bucket.grad, slot)
                                           if next(flags) > 0 else None)

    def discard(self) -> None:
        """Forget this step's gradients: wait for what is in flight, reset for a new backward."""
        for position, bucket in self._in_flight:
            wait(bucket.work, self.timeout, f"reduce-scatter of gradient bucket {position}")
            bucket.work, bucket.send = None, None
        for bucket in self.buckets:
            bucket.ready.clear()
        self._in_flight, self._sent = [], []
        self._next = 0
        self._packed.clear()
        self.reduced = False
        self.add_hooks()
