"""The fused step: one compiled pass over flat buffers, from the same kernels as the eager path.

An optimizer step is bound by memory traffic: Adan reads ``w, g, m, v, n, g_prev`` and writes
``w, m, v, n, g_prev`` (44 bytes per float32 parameter), and the eager kernels move several times
that through temporaries. Here ``rules.run_elementwise`` (the rule's elementwise kernel from
``functional``, with the optional upcast of reduced-precision state) is compiled by
``torch.compile`` (inductor) for one flat tensor per buffer, so each element is loaded once,
updated in registers and stored once. There is no second copy of the equations: the compiled
graph is traced from the same kernels.

``fused_rule_`` is the building block for any holder of flat tensors. ``fused_update_`` serves
``NeuroOptima(fused=True)`` and the sharded optimizer's chunks (already views of one bucket
buffer, which are used in place and never moved): it groups the parameters of a param group by
(device, dtype, step count) and keeps, per group, the parameters, the gradients and every rule
buffer as consecutive views of one flat tensor each, so the kernel runs once per group with no
gathering. The first fused step lays them out (the parameters'
``.data`` and ``.grad`` become views of new flat tensors, with the same values); later steps
find the layout intact and use it directly. Gradients keep the layout only while backward
accumulates into them (``zero_grad(set_to_none=False)``); fresh gradients are copied once into
a flat tensor per step. DTensor, float64 and non-contiguous parameters are left to the eager
(foreach) kernels. ``fused_norm_stats`` gives the gradient statistics over the same flat runs.

Compilation happens once per (rule, dtypes) with dynamic shapes, so every tensor size shares
one kernel. The step's coefficients (``functional.rule_scalars``: bias corrections, ``1 - beta``,
the decay factor) are computed in Python once per step and read from a tensor inside the
graph, so schedules and the step count do not recompile it.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from . import functional as F
from .dtensor import is_dtensor
from .norms import local_norm_stats
from .rules import compute_dtype_for, run_elementwise

__all__ = ["fused_rule_", "group_rule_", "fused_update_", "fused_norm_stats", "adopt_grads_",
           "flat_view"]

# Each distinct dtype combination adds a graph per rule; the default limit of 8 would
# silently fall back to eager for models with many dtype combinations.
_RECOMPILE_LIMIT = 64


def _flat_body(rule, param, grad, buffers, scalars, no_prox, compute_dtype):
    # The step's coefficients (bias corrections, 1 - beta, decay) arrive precomputed in one
    # float64 tensor and enter the kernel as 0-d tensors: a new learning rate or step count is
    # data, not a reason to recompile (Python floats are specialised into the graph), and no
    # power or other scalar expression is left for inductor to evaluate per element.
    fields = F.SCALAR_TYPES[rule]._fields
    s = F.SCALAR_TYPES[rule](*[scalars[i] for i in range(len(fields))])
    run_elementwise(rule, param, grad, buffers, s, no_prox=no_prox, compute_dtype=compute_dtype)


# One Python function per rule, so each rule has its own compile cache.
def _flat_adan(*args):
    _flat_body("adan", *args)


def _flat_lion(*args):
    _flat_body("lion", *args)


def _flat_lion_adan(*args):
    _flat_body("lion_adan", *args)


_FLAT_FUNCTIONS: dict[str, Callable[..., None]] = {
    "adan": _flat_adan, "lion": _flat_lion, "lion_adan": _flat_lion_adan}
_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}
# Argument kinds each kernel was called with: only a new kind can compile another graph, so
# only its call raises the recompile limit (entering that patch costs as much as a small call).
_SEEN: set[tuple] = set()


def _compile_once(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled for any tensor size (dynamic shapes), compiled on first use only."""
    compiled = _COMPILED.get(fn)
    if compiled is None:
        compiled = _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return compiled


def _compiled(rule: str) -> Callable[..., None]:
    if rule not in _FLAT_FUNCTIONS:
        raise ValueError(f"update must be one of {', '.join(map(repr, _FLAT_FUNCTIONS))}, "
                         f"got {rule!r}")
    return _compile_once(_FLAT_FUNCTIONS[rule])


def fused_rule_(rule: str, param: Tensor, grad: Tensor, buffers: Sequence[Tensor],
                step: int | float, *, lr: float, betas: Sequence[float], eps: float = 0.0,
                weight_decay: float = 0.0, no_prox: bool = False,
                compute_dtype: torch.dtype | None = None) -> None:
    """One update of ``rule`` on same-shaped (typically flat) tensors, in one compiled pass.

    ``buffers`` are the rule's buffers in ``functional.RULE_BUFFERS`` order; all elements share
    the 1-based update count ``step``. Buffers stored in another dtype than ``compute_dtype``
    are upcast for the math (see ``rules.run_rule``). Same equations, same order of operations
    as the eager kernels; results agree with them to rounding (the compiler may contract
    multiply-adds).
    """
    fn = _compiled(rule)
    scalars = torch.tensor(F.rule_scalars(rule, int(step), lr=float(lr),
                                          betas=tuple(map(float, betas)), eps=float(eps),
                                          weight_decay=float(weight_decay),
                                          no_prox=bool(no_prox)), dtype=torch.float64)
    args = (param, grad, tuple(buffers), scalars, bool(no_prox), compute_dtype)
    signature = (rule, param.dtype, grad.dtype, *(b.dtype for b in buffers), param.device,
                 bool(no_prox), compute_dtype)
    if signature in _SEEN:
        fn(*args)
        return
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        fn(*args)
    _SEEN.add(signature)


# ------------------------------------------------------------------------------------------
# Flat layout: consecutive views of one tensor
# ------------------------------------------------------------------------------------------


# Lists of tensors recently found to be one flat run, by their addresses and sizes: each step
# checks the same lists several times, and the full check reads more attributes per tensor.
_KNOWN_RUNS: OrderedDict[tuple, tuple[torch.dtype, torch.device]] = OrderedDict()
_KNOWN_RUNS_LIMIT = 256


def flat_view(tensors: Sequence[Tensor]) -> Tensor | None:
    """The 1-D tensor of which ``tensors`` are consecutive, gap-free contiguous views, or None.

    Checks pointers, sizes, contiguity and dtype; the extent must lie in the first tensor's
    storage, so separate allocations that merely happen to be adjacent never count as one. A
    list with the addresses, sizes and contiguity of a run verified before (the steady state of
    a fused step) skips the pointer arithmetic and the dtype check.
    """
    first = tensors[0]
    itemsize = first.element_size()
    ptrs = tuple([t.data_ptr() for t in tensors])
    sizes = tuple([t.numel() * itemsize for t in tensors])
    key = (ptrs, sizes)
    if not all([t.is_contiguous() for t in tensors]):
        return None
    known = _KNOWN_RUNS.get(key)
    if known is None or known != (first.dtype, first.device):
        known = None
        if list(ptrs) != list(itertools.accumulate(sizes[:-1], initial=ptrs[0])):
            return None
        if {t.dtype for t in tensors} != {first.dtype}:
            return None
    total = (ptrs[-1] + sizes[-1] - ptrs[0]) // itemsize
    storage = first.untyped_storage()
    offset = first.storage_offset()
    if (offset + total) * itemsize > storage.nbytes():
        return None
    if known is None:
        _KNOWN_RUNS[key] = (first.dtype, first.device)
        if len(_KNOWN_RUNS) > _KNOWN_RUNS_LIMIT:
            _KNOWN_RUNS.popitem(last=False)
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        storage, offset, (total,), (1,))


def _gather(tensors: Sequence[Tensor], rebind: Callable[[int, Tensor], None] | None,
            dtype: torch.dtype | None = None) -> Tensor:
    """Copy ``tensors`` into a new flat tensor; ``rebind(i, view)`` hands out the views."""
    first = tensors[0]
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype or first.dtype,
                       device=first.device)
    views, offset = [], 0
    for t in tensors:
        views.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    torch._foreach_copy_(views, list(tensors))
    if rebind is not None:
        for i, view in enumerate(views):
            rebind(i, view)
    return flat


def _flat(tensors: Sequence[Tensor], rebind: Callable[[int, Tensor], None] | None) -> Tensor:
    flat = flat_view(tensors)
    return flat if flat is not None else _gather(tensors, rebind)


def _flat_runs(tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Flat tensors over the maximal runs of consecutive views (two or more tensors, or one
    large tensor), and the rest."""
    whole = flat_view(tensors) if len(tensors) > 1 else None
    if whole is not None:
        return [whole], []
    flats, rest = [], []
    for run in _runs(tensors):
        members = [tensors[i] for i in run]
        big = len(members) > 1 or members[0].numel() >= _ONE_PASS_NUMEL
        flat = flat_view(members) if big else None
        if flat is None:
            rest += members
        else:
            flats.append(flat)
    return flats, rest


# A single tensor at least this large gets a pass of its own; smaller ones share one foreach call.
_ONE_PASS_NUMEL = 1 << 16


def _sum_of_squares(flat: Tensor) -> Tensor:
    return flat.to(torch.float64).square().sum()


def fused_norm_stats(tensors: list[Tensor], device: torch.device | None = None, *,
                     norm: bool = True) -> Tensor:
    """``norms.local_norm_stats`` with one pass per flat run of ``tensors``.

    The eager statistics convert every tensor to float64 before its norm (a full copy); here a
    compiled reduction converts element by element while it reads, so it costs one read of
    the gradients. It needs no separate finiteness test: the square of any finite float32 (or
    narrower) value is far below float64's range, so the float64 sum of squares is finite
    exactly when every entry is. float64 runs, whose squares can overflow, stay eager. With
    ``norm=False`` a run is first checked with a plain sum in its own dtype (inf and nan
    propagate through it); only a non-finite sum, which an overflow can also cause, is decided
    by the float64 sum of squares. The count is of non-finite runs and tensors; only zero
    matters.
    """
    if device is None and tensors:
        device = tensors[0].device
    flats, rest = _flat_runs([t for t in tensors if t.dtype != torch.float64])
    stats = local_norm_stats(rest + [t for t in tensors if t.dtype == torch.float64], device,
                             norm=norm)
    if not norm:
        flats = [flat for flat in flats if not math.isfinite(flat.sum().item())]
    if flats:
        fn = _compile_once(_sum_of_squares)
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            sums = [fn(flat).item() for flat in flats]
        if norm:
            stats[0] += math.fsum(x for x in sums if math.isfinite(x))
        stats[1] += sum(not math.isfinite(x) for x in sums)
    return stats


def _fusable(p: Tensor, g: Tensor) -> bool:
    # float64 stays eager: inside the compiled graph the hyperparameters are float32 values,
    # which is exact enough for float32 and narrower parameters only.
    return (p.dtype != torch.float64 and not is_dtensor(p) and p.is_contiguous()
            and g.is_contiguous()
            and g.dtype == p.dtype and g.device == p.device and p.numel() > 0)


@torch.no_grad()
def adopt_grads_(params: Sequence[Tensor]) -> bool:
    """Lay the gradients of ``params`` out as consecutive views of one flat tensor per
    (device, dtype), copying them once if backward left them apart; True if nothing moved.

    Done before the gradient statistics, so the norm and the update both read one flat run;
    backward keeps accumulating into the views while gradients are zeroed, not set to None.
    """
    if _one_flat_run(params, [p.grad for p in params]) is not None:
        return True  # the steady state: nothing to lay out
    buckets: dict[tuple, list[Tensor]] = defaultdict(list)
    for p in params:
        g = p.grad
        if g is not None and not g.is_sparse and _fusable(p, g):
            buckets[(p.device, p.dtype)].append(p)
    moved = False
    for ps in buckets.values():
        grads = [p.grad for p in ps]
        if len(ps) > 1 and flat_view(grads) is None:
            _gather(grads, lambda j, v, ps=ps: setattr(ps[j], "grad", v))
            moved = True
    return not moved


def flat_counters(states: Sequence[dict[str, Any]]) -> list[int]:
    """Advance every ``state["step"]`` by one and return the new counts.

    The 0-d counters are laid out once as views of one tensor, so the increment is one op, not
    one per parameter.
    """
    counters = [state["step"] for state in states]
    flat = flat_view(counters)
    if flat is None:
        flat = _gather(counters, lambda j, v: states[j].__setitem__("step", v))
    flat.add_(1)
    return [int(k) for k in flat.tolist()]


def _runs(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped into maximal runs of consecutive, contiguous views."""
    runs: list[list[int]] = []
    end = None
    for i, t in enumerate(tensors):
        if end is not None and t.data_ptr() == end and t.is_contiguous():
            runs[-1].append(i)
        else:
            runs.append([i])
        end = t.data_ptr() + t.numel() * t.element_size() if t.is_contiguous() else None
    return runs


def _one_flat_run(params: Sequence[Tensor],
                  grads: Sequence[Tensor | None]) -> tuple[Tensor, Tensor] | None:
    """The flat parameter and gradient tensors when each list is one fusable flat run.

    Answers the steady state of a fused step with a few list-wide checks instead of the
    per-tensor ones (``_fusable``): contiguity and one dtype per list come with the run.
    """
    if not params or any([g is None for g in grads]) or any([is_dtensor(p) for p in params]):
        return None
    flat_p = flat_view(params)
    if flat_p is None or flat_p.dtype == torch.float64:
        return None
    flat_g = flat_view(grads)
    if flat_g is None or (flat_g.dtype, flat_g.device) != (flat_p.dtype, flat_p.device):
        return None
    return flat_p, flat_g


def _owns_storage(t: Tensor) -> bool:
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


@torch.no_grad()
def fused_update_(state: dict[Tensor, dict[str, Any]], group: dict[str, Any],
                  params: list[Tensor], grads: list[Tensor], names: Sequence[str],
                  steps: Sequence[int]) -> list[int]:
    """Apply ``group``'s rule to ``params`` in flat groups; returns the indices left undone.

    Parameters that each own their storage (a fresh model) are moved once into one flat tensor
    per (device, dtype, step count). Parameters that are views of someone else's buffer (the
    sharded optimizer's chunks, or a layout made by an earlier step) are never moved: the
    kernel runs once per run of consecutive views. ``state[p][name]`` holds each parameter's
    buffers (``names`` in kernel order) and is rebound to views of flat buffers when needed.
    ``grads[i]`` is rebound into the flat layout only when it is ``params[i].grad`` itself
    (not a clipped or negated copy).
    """
    state_dtype = group.get("state_dtype")
    flats = _one_flat_run(params, grads)
    if flats is not None and len(set(steps)) == 1:  # the steady state: one run, one count
        _update_run(state, group, params, grads, names, steps[0],
                    compute_dtype_for(flats[0].dtype, state_dtype), *flats)
        return []
    buckets: dict[tuple, list[int]] = defaultdict(list)
    rest: list[int] = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if _fusable(p, g):
            buckets[(p.device, p.dtype, steps[i])].append(i)
        else:
            rest.append(i)
    for (_, dtype, step), idx in buckets.items():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        compute = compute_dtype_for(dtype, state_dtype)
        flat_p = flat_view(ps)
        if flat_p is None and all(_owns_storage(p) for p in ps):
            flat_p = _gather(ps, lambda j, v: setattr(ps[j], "data", v))
        if flat_p is not None:
            _update_run(state, group, ps, gs, names, step, compute, flat_p)
            continue
        for run in _runs(ps):
            _update_run(state, group, [ps[j] for j in run], [gs[j] for j in run], names, step,
                        compute, flat_view([ps[j] for j in run]))
    return rest


def _update_run(state, group, ps, gs, names, step, compute_dtype, flat_p,
                flat_g=None) -> None:
    if flat_p is None:  # adjacent by chance but separate allocations: one tensor at a time
        for p, g in zip(ps, gs):
            _update_run(state, group, [p], [g], names, step, compute_dtype, flat_view([p]))
        return
    if flat_g is None:
        own_grads = all(g is p.grad for p, g in zip(ps, gs))
        flat_g = _flat(gs, (lambda j, v: setattr(ps[j], "grad", v)) if own_grads else None)
    flat_bufs = []
    for name in names:
        def rebind(j, v, name=name):
            state[ps[j]][name] = v
        flat_bufs.append(_flat([state[p][name] for p in ps], rebind))
    group_rule_(group, flat_p, flat_g, flat_bufs, step, compute_dtype)


def group_rule_(group: dict[str, Any], param: Tensor, grad: Tensor, buffers: Sequence[Tensor],
                step: int, compute_dtype: torch.dtype | None) -> None:
    """``fused_rule_`` with the rule and hyperparameters of the param group ``group``."""
    fused_rule_(group["update"], param, grad, buffers, step, lr=group["lr"],
                betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                no_prox=group["no_prox"], compute_dtype=compute_dtype)
