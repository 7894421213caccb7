"""The steady state of a fused param group, checked once per step instead of found again.

After its first steps a fused group's parameters, gradients, step counters, rule buffers and
Lookahead slow weights are each consecutive views of one flat tensor (see ``fused``). Finding those runs means reading
the address, size and contiguity of every tensor, and the step needs them several times (the
gradient check, the counters, the update); for a model with many tensors that bookkeeping costs
as much as a good part of the kernel. ``FusedLayout`` records the runs once and ``intact``
confirms them at the next step with one pass over the parameters: the same parameter, gradient
and state objects, and the parameters at the same addresses. Anything else (a new gradient tensor, a loaded state
dict, moved parameters) fails the check and the step takes the general path, which lays the
tensors out again.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch
from torch import Tensor

from .fused import _one_flat_run, flat_view

__all__ = ["FusedLayout"]

_STEP = "step"


class FusedLayout:
    """Flat parameters, gradients, step counters and buffers of one param group.

    Gradients are held weakly: a layout must not keep gradients alive that the user dropped
    (``zero_grad(set_to_none=True)`` before evaluation, say). ``grads`` and ``flat_grad`` hold
    them only from a successful ``intact`` (or ``of``) to ``release``, i.e. for one step.
    """

    __slots__ = ("params", "grads", "names", "slow_key", "flat_param", "flat_grad",
                 "flat_buffers", "flat_step", "flat_slow", "_grad_refs", "_state", "_states",
                 "_entries", "_ptrs")

    def __init__(self, state: dict[Tensor, dict[str, Any]], params: list[Tensor],
                 grads: list[Tensor], names: Sequence[str], slow_key: str | None,
                 flat_param: Tensor, flat_grad: Tensor, flat_buffers: list[Tensor],
                 flat_step: Tensor, flat_slow: Tensor | None) -> None:
        self.params, self.grads, self.names = params, grads, tuple(names)
        self.slow_key = slow_key
        self._grad_refs = [weakref.ref(g) for g in grads]
        self.flat_param, self.flat_grad = flat_param, flat_grad
        self.flat_buffers, self.flat_step, self.flat_slow = flat_buffers, flat_step, flat_slow
        self._state = state
        self._states = [state[p] for p in params]
        self._entries = [[st[name] for st in self._states] for name in self._keys()]
        self._ptrs = _addresses(params)

    def _keys(self) -> tuple[str, ...]:
        return (_STEP, *self.names) + ((self.slow_key,) if self.slow_key else ())

    @classmethod
    def of(cls, state: dict[Tensor, dict[str, Any]], params: Sequence[Tensor],
           names: Sequence[str], slow_key: str | None = None, *,
           same_count: bool = True) -> FusedLayout | None:
        """The layout of ``params`` if each of their lists (parameters, gradients, counters,
        each buffer in ``names``, the slow weights under ``slow_key``) is one flat run and all
        step counts are equal (``same_count``: the caller knows it without reading them),
        else None."""
        params = list(params)
        grads = [p.grad for p in params]
        flats = _one_flat_run(params, grads)
        if not same_count or flats is None or any(p not in state for p in params):
            return None
        states = [state[p] for p in params]
        keys = (_STEP, *names) + ((slow_key,) if slow_key else ())
        if any(name not in st for st in states for name in keys):
            return None
        flat_step = flat_view([st[_STEP] for st in states])
        flat_buffers = [flat_view([st[name] for st in states]) for name in names]
        flat_slow = flat_view([st[slow_key] for st in states]) if slow_key else None
        if (flat_step is None or any(b is None for b in flat_buffers)
                or (slow_key and flat_slow is None)):
            return None
        return cls(state, params, grads, names, slow_key, *flats, flat_buffers, flat_step,
                   flat_slow)

    def intact(self, state: dict[Tensor, dict[str, Any]], params: Sequence[Tensor]) -> bool:
        """Whether ``params`` and their gradients and state are still this layout's views."""
        if state is not self._state or len(params) != len(self.params):
            return False
        grads = [p.grad for p in params]
        for p, mine, g, ref, st in zip(params, self.params, grads, self._grad_refs,
                                       self._states):
            # A dropped gradient's weak reference is None, which no gradient is.
            if p is not mine or g is not ref() or g is None or state.get(p) is not st:
                return False
        for name, entries in zip(self._keys(), self._entries):
            for st, entry in zip(self._states, entries):
                if st.get(name) is not entry:
                    return False
        if _addresses(self.params) != self._ptrs:
            return False
        # The same gradient objects: the run starts where it did and is as long as before.
        first = grads[0]
        self.grads = grads
        self.flat_grad = torch.empty(0, dtype=first.dtype, device=first.device).set_(
            first.untyped_storage(), first.storage_offset(), (self.flat_param.numel(),), (1,))
        return True

    def release(self) -> None:
        """Drop the references to the gradients taken for this step."""
        self.grads = self.flat_grad = None

    @property
    def count(self) -> int:
        """The common step count, read on the host (for inspection; a step never reads it)."""
        return int(self.flat_step[0].item())


def _addresses(params: Sequence[Tensor]) -> tuple[int, ...]:
    # Assigning p.data (model.to(), say) moves a parameter without changing its identity; a
    # gradient is replaced as a whole (p.grad = ...), which the identity check sees.
    return tuple([p.data_ptr() for p in params])
