"""The collectives NeuroOptima's distributed backends call, each one counted and time-bounded.

``all_reduce_norm_stats`` is the collective-aware norm: every holder of a piece of the
gradients computes ``neurooptima.norms.local_norm_stats`` over what it holds (the packed
float64 ``[sum of squares, non-finite count]``), and one all-reduce of those 16 bytes makes the
global statistics. Sharded, FSDP and DeepSpeed backends all reuse it.

Every call goes through ``wait`` so a peer that raised and never joins the collective turns
into an error naming the collective on this rank after ``timeout`` (or the process group's own
timeout when ``timeout`` is None), never a hang.
"""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist
from torch import Tensor

from .comm_accounting import record

__all__ = ["all_reduce_norm_stats", "reduce_scatter_flat", "all_gather_flat", "all_reduce_flat",
           "broadcast_", "wait", "CollectiveError"]

# torch 2.13 renamed the flat collectives; older releases (>= 2.6 is supported) have the
# former names only.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CollectiveError(RuntimeError):
    """A collective failed or timed out, usually because another rank raised or stopped."""


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def wait(work, timeout: datetime.timedelta | None, what: str, group=None) -> None:
    """Wait for ``work``; turn a timeout or a lost peer into a ``CollectiveError``.

    With a ``timeout`` the work is polled on the host (gloo's ``wait(timeout)`` is not honoured
    by every collective), so this rank raises after ``timeout`` even while the collective is
    still pending in the background. With None the process group's own timeout applies.
    ``group`` is accepted for symmetry with the other helpers; the work already knows it.
    """
    if work is None:
        return
    try:
        if timeout is not None:
            deadline = time.monotonic() + timeout.total_seconds()
            pause = 1e-5
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out after {timeout.total_seconds():g} s")
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)
        work.wait()
    except Exception as error:  # gloo raises RuntimeError, NCCL DistBackendError
        raise CollectiveError(
            f"{what} failed on rank {dist.get_rank()}: another rank probably raised or "
            f"stopped before joining it ({type(error).__name__}: {error})") from error


def all_reduce_norm_stats(stats: Tensor, group=None,
                          timeout: datetime.timedelta | None = None) -> Tensor:
    """Sum packed ``[sum_sq, nonfinite]`` statistics over the ranks of ``group`` (in place)."""
    record("all_reduce", _nbytes(stats), dist.get_world_size(group))
    work = dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group, async_op=True)
    wait(work, timeout, "all-reduce of the gradient-norm statistics", group)
    return stats


class _AllToAllSum:
    """A reduce-scatter made of an all-to-all and a local sum of the N received sections.

    gloo's reduce-scatter all-reduces the whole buffer and keeps a chunk: it moves all-reduce
    bytes (2 S (N-1)/N, not S (N-1)/N) and its handle can neither be polled nor time out.
    An all-to-all sends each rank exactly the section it owns, S (N-1)/N bytes per rank as a
    reduce-scatter should, and its handle can be polled.
    """

    def __init__(self, output: Tensor, input: Tensor, group) -> None:
        self._output = output
        self._received = torch.empty_like(input)
        self._world = dist.get_world_size(group)
        self._work = dist.all_to_all_single(self._received, input, group=group, async_op=True)
        self._summed = False

    def is_completed(self) -> bool:
        return self._work.is_completed()

    def wait(self) -> bool:
        self._work.wait()
        if not self._summed:
            torch.sum(self._received.view(self._world, -1), dim=0, out=self._output)
            self._summed = True
        return True


def reduce_scatter_flat(output: Tensor, input: Tensor, group=None):
    """Start a sum reduce-scatter of flat ``input`` (N equal sections) into ``output``."""
    record("reduce_scatter", _nbytes(input), dist.get_world_size(group))
    if dist.get_backend(group) == "gloo":
        return _AllToAllSum(output, input, group)
    return _reduce_scatter(output, input, op=dist.ReduceOp.SUM, group=group, async_op=True)


def all_gather_flat(output: Tensor, input: Tensor, group=None):
    """Start an all-gather of every rank's flat ``input`` into ``output`` (rank order)."""
    record("all_gather", _nbytes(output), dist.get_world_size(group))
    return _all_gather(output, input, group=group, async_op=True)


def all_reduce_flat(tensor: Tensor, group=None):
    """Start a sum all-reduce of ``tensor`` in place over ``group`` (the replicas of a chunk)."""
    record("all_reduce", _nbytes(tensor), dist.get_world_size(group))
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)


def broadcast_(tensor: Tensor, group=None, timeout: datetime.timedelta | None = None,
               what: str = "broadcast") -> Tensor:
    """Overwrite ``tensor`` on every rank of ``group`` with the group's first rank's copy."""
    group_ = group if group is not None else dist.group.WORLD
    src = dist.get_global_rank(group_, 0)
    record("broadcast", _nbytes(tensor), dist.get_world_size(group))
    work = dist.broadcast(tensor, src=src, group=group, async_op=True)
    wait(work, timeout, what, group)
    return tensor

