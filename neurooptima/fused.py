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
the decay factor) are computed in the same compiled graph (``_coefficients``, which inductor
makes a scalar prologue of the one kernel) from the step counter and the learning rate as
device tensors, and read from its output by the elementwise loop: schedules, a tensor ``lr``
and the step count are data, not a reason to recompile, nothing is read on the host, and a
step costs one compiled call per flat run.

The step is sync-free: the non-finite skip enters the kernel as a device-side predicate (as
torch's fused optimizers take ``found_inf``): the kernel computes the update and stores
``where(finite, new, old)`` for the weights and every buffer, and the counters advance by
``finite``; so a skipped step moves nothing, decided without the host. A clipping coefficient
scales the gradient inside the kernel, and Lookahead's sync is fused in as well, applied where
``finite and step % k == 0`` on the device. Where host reads are free (CPU tensors, see
``host_reads``) the optimizer decides the skip in Python instead and passes ``finite=None``:
the graph then has no predicate, so a finite step pays nothing per element for it.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from . import functional as F
from . import host_reads
from .dtensor import is_dtensor
from .norms import local_norm_stats
from .rules import compute_dtype_for, run_elementwise

__all__ = ["fused_rule_", "fused_step_", "group_rule_", "fused_update_", "fused_norm_stats",
           "adopt_grads_", "flat_view", "fusable", "moment_sums"]

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); so does the in-kernel clipping.
CLIP_EPS = 1e-6

# Each distinct dtype combination adds a graph per rule; the default limit of 8 would
# silently fall back to eager for models with many dtype combinations.
_RECOMPILE_LIMIT = 64


def _flat_body(rule, param, grad, buffers, counter, lr, finite, norm, hyper, structure,
               compute_dtype, slow, ascent):
    # One compiled graph per step and run: the coefficients (a scalar prologue) and the
    # elementwise pass over the flat buffers. ``finite`` None: the step is known to be finite
    # (decided on the host, see ``host_reads``), so the graph has no predicate; the graph is
    # specialised on it, and on clipping, so neither costs an operation per element unless used.
    scalars = _coefficients(rule, counter, lr, finite, norm, hyper, structure)
    _, no_prox, clipping, _, seeds_prev = structure
    fields = F.SCALAR_TYPES[rule]._fields
    n = len(fields)
    s = F.SCALAR_TYPES[rule](*[scalars[i] for i in range(n)])
    written = (param, *buffers)
    if finite is not None:
        old = [t.clone() for t in written]  # loads of the inputs: the graph keeps no copy
    if ascent is not None:  # momentum ascent: from w~ back to w = w~ + s m (momentum_ascent)
        param.add_(buffers[0].to(param.dtype) * ascent[0])
    g = grad * scalars[n + 1] if clipping else grad
    if seeds_prev and F.RULE_BUFFERS[rule][-1] == "prev_grad":
        # Adan's difference is 0 at k = 1: the previous gradient starts as the first one. In
        # the buffer's dtype: the upcast that follows sees the stored (rounded) value, as the
        # eager path's initial copy gives it. Not needed where that copy was made (a step
        # decided on the host, without clipping): it would cost a select per element.
        prev = buffers[-1]
        prev.copy_(torch.where(scalars[n + 4] != 0, g.to(prev.dtype), prev))
    run_elementwise(rule, param, g, buffers, s, no_prox=no_prox, compute_dtype=compute_dtype)
    if finite is not None:
        for t, before in zip(written, old):
            t.copy_(torch.where(finite, t, before))  # a skipped step stores what it loaded
    if slow is not None:  # Lookahead: slow += alpha (fast - slow); fast = slow, where due
        due = scalars[n + 2] != 0
        pulled = slow + (param - slow) * scalars[n + 3]
        slow.copy_(torch.where(due, pulled, slow))
        param.copy_(torch.where(due, pulled, param))
    if ascent is not None:  # and on to the new w~ = w - s' m' (s' is 0 on a skipped step)
        param.sub_(buffers[0].to(param.dtype) * ascent[1])


def _coefficients(rule, counter, lr, finite, norm, hyper, structure):
    """Advance ``counter`` by ``finite`` (by 1 when None) and return the step's coefficients,
    packed in one float64 tensor that the elementwise pass reads as 0-d values: a new learning
    rate or step count is data, not a reason to recompile (Python floats are specialised into
    the graph), and no power or other scalar expression is left to evaluate per element. After
    the rule's own coefficients come the predicate ``finite``, the gradient scale (clipping),
    Lookahead's ``due`` and ``alpha``, and ``k == 1`` (Adan's previous gradient starts as the
    first one, clipped like it). ``hyper`` holds the betas, eps, weight decay, clipping norm
    and Lookahead alpha as data (new values do not recompile); ``structure`` what shapes the
    graph: the number of betas, ``no_prox``, whether it clips, Lookahead's k, and whether the
    kernel sets Adan's previous gradient at k = 1."""
    n_betas, no_prox, clipping, lookahead_k, _ = structure
    betas = tuple(hyper[i] for i in range(n_betas))
    eps, weight_decay, max_norm, alpha = (hyper[n_betas + i] for i in range(4))
    counter.add_(1 if finite is None else finite.to(counter.dtype))
    k = counter[0].to(torch.float64)
    s = F.SCALARS[rule](k, lr=lr[0].to(torch.float64), betas=betas, eps=eps,
                        weight_decay=weight_decay, no_prox=no_prox)
    scale = torch.ones_like(k)
    if clipping:
        scale = torch.clamp(max_norm / (norm[0].to(torch.float64) + CLIP_EPS), max=1.0)
    ok = torch.ones_like(k, dtype=torch.bool) if finite is None else finite
    due = torch.zeros_like(k)
    if lookahead_k:
        due = (ok & (torch.remainder(k, lookahead_k) == 0)).to(torch.float64)
    values = [*s, ok.to(torch.float64), scale, due, alpha, (k == 1).to(torch.float64)]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=k.device)
                        for v in values])


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
        # emulate_precision_casts: a value stored in a narrow buffer and read back in the same
        # kernel is the rounded one, as in eager (else inductor forwards the unrounded value).
        compiled = _COMPILED[fn] = torch.compile(
            fn, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})
    return compiled


def _compiled(rule: str) -> Callable[..., None]:
    if rule not in _FLAT_FUNCTIONS:
        raise ValueError(f"update must be one of {', '.join(map(repr, _FLAT_FUNCTIONS))}, "
                         f"got {rule!r}")
    return _compile_once(_FLAT_FUNCTIONS[rule])


def _run_kernel(rule: str, param: Tensor, grad: Tensor, buffers: Sequence[Tensor],
                counter: Tensor, lr: Tensor, finite: Tensor | None, norm: Tensor | None,
                hyper: tuple, compute_dtype: torch.dtype | None, slow: Tensor | None,
                ascent: Tensor | None = None) -> None:
    fn = _compiled(rule)
    betas, eps, weight_decay, no_prox, max_norm, lookahead_k, alpha = hyper
    device = param.device
    values = _constant((*betas, eps, weight_decay, 0.0 if max_norm is None else max_norm,
                        alpha), device, torch.float64)
    # The optimizer seeds Adan's previous gradient with the first gradient when it creates the
    # state (as the eager kernels expect) unless the skip is decided in the kernel; the kernel
    # seeds it there, and wherever clipping scales the first gradient.
    seeds_prev = finite is not None or max_norm is not None
    structure = (len(betas), no_prox, max_norm is not None, lookahead_k, seeds_prev)
    # 1-element, not 0-d: dynamo guards a 0-d float tensor input by reading it (NaN check).
    args = (param, grad, tuple(buffers), counter, lr.reshape(1), finite,
            None if norm is None else norm.reshape(1), values, structure, compute_dtype, slow,
            ascent)
    # What dynamo specialises on: dtypes, None or tensor, the structure, and size 1 (a run
    # of one tensor, one element) against larger sizes.
    signature = (rule, param.dtype, grad.dtype, *(b.dtype for b in buffers), device,
                 counter.dtype, finite is None, norm is None, structure, compute_dtype,
                 None if slow is None else slow.dtype, param.numel() == 1, counter.numel() == 1,
                 ascent is None)
    _call(fn, args, signature)


def _call(fn: Callable[..., Any], args: tuple, signature: tuple) -> Any:
    if signature in _SEEN:
        try:
            return fn(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            # A specialisation the signature does not name (a storage offset of 0 or 1, say)
            # needed another graph; raised before the graph ran, so nothing moved: compile
            # it under the higher limit.
            pass
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        out = fn(*args)
    _SEEN.add(signature)
    return out


def fused_rule_(rule: str, param: Tensor, grad: Tensor, buffers: Sequence[Tensor],
                step: int | float, *, lr: float, betas: Sequence[float], eps: float = 0.0,
                weight_decay: float = 0.0, no_prox: bool = False,
                compute_dtype: torch.dtype | None = None) -> None:
    """One update of ``rule`` on same-shaped (typically flat) tensors, in one compiled pass.

    ``buffers`` are the rule's buffers in ``functional.RULE_BUFFERS`` order; all elements share
    the 1-based update count ``step``, a host number here (``fused_step_`` takes a device
    counter). Buffers stored in another dtype than ``compute_dtype`` are upcast for the math
    (see ``rules.run_rule``). Same equations, same order of operations as the eager kernels;
    results agree with them to rounding (the compiler may contract multiply-adds). As for the
    eager kernels, Adan's previous gradient is the caller's to set to the first gradient
    before step 1.
    """
    device = param.device
    # A counter one below ``step``: the kernel advances it before computing the coefficients.
    counter = torch.full((1,), float(int(step) - 1), dtype=torch.float64, device=device)
    hyper = (tuple(map(float, betas)), float(eps), float(weight_decay), bool(no_prox), None,
             0, 0.0)
    _run_kernel(rule, param, grad, buffers, counter, _lr_tensor(float(lr), device), None,
                None, hyper, compute_dtype, None, None)


# One device tensor per (device, dtype, value) for host constants the kernels take as data (a
# float learning rate, the hyperparameters): made once, so a step neither allocates nor copies.
_CONSTANTS: OrderedDict[tuple, Tensor] = OrderedDict()


def _constant(value: float | bool | tuple[float, ...], device: torch.device,
              dtype: torch.dtype) -> Tensor:
    """``value`` as a tensor on ``device`` (0-d, or 1-D for a tuple), made once."""
    key = (value, device, dtype)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(value, dtype=dtype, device=device)
        if len(_CONSTANTS) > _KNOWN_RUNS_LIMIT:
            _CONSTANTS.popitem(last=False)
    return t


def _lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    """The learning rate as a 0-d float64 tensor on ``device``: a tensor ``lr`` is used as
    data (copied there if it lives elsewhere; nothing is read on the host); a float one is a
    cached constant (a new value makes a new one, with one fill and no read)."""
    if isinstance(lr, Tensor):
        lr = lr.detach().reshape(())
        if lr.device != device or lr.dtype != torch.float64:
            lr = lr.to(device=device, dtype=torch.float64, non_blocking=True)
        return lr
    return _constant(float(lr), device, torch.float64)


def fused_step_(rule: str, param: Tensor, grad: Tensor, buffers: Sequence[Tensor],
                counter: Tensor, *, lr: float | Tensor, betas: Sequence[float], eps: float,
                weight_decay: float, no_prox: bool, compute_dtype: torch.dtype | None = None,
                finite: Tensor | None = None, norm: Tensor | None = None,
                max_grad_norm: float | None = None, slow: Tensor | None = None,
                lookahead_k: int = 0, lookahead_alpha: float = 0.0,
                ascent: Tensor | None = None) -> None:
    """One sync-free update of ``rule`` on flat tensors sharing one step count.

    ``counter`` holds the step counters of the run (a 1-D view; all equal), advanced here by
    ``finite`` (a 0-d bool tensor: where it is false nothing moves; None: the step is known
    to be finite, and the kernel has no predicate). With ``max_grad_norm`` the gradient is
    scaled by ``min(1, max_grad_norm / (norm + 1e-6))`` in the kernel; with ``slow``
    (Lookahead's slow weights, ``lookahead_k > 0``) the sync runs in the kernel at every
    ``lookahead_k``-th update. ``ascent`` (momentum ascent: float64 ``[s, s']``) moves the
    weights from ``w~`` to ``w = w~ + s m`` before the update and to ``w' - s' m'`` after it,
    in the same pass. Nothing is read on the host.
    """
    device = param.device
    if max_grad_norm is not None and norm is None:
        raise ValueError("max_grad_norm needs the gradients' norm")
    hyper = (tuple(map(float, betas)), float(eps), float(weight_decay), bool(no_prox),
             None if max_grad_norm is None else float(max_grad_norm),
             int(lookahead_k) if slow is not None else 0, float(lookahead_alpha))
    _run_kernel(rule, param, grad, buffers, counter, _lr_tensor(lr, device), finite, norm,
                hyper, compute_dtype, slow if hyper[5] else None, ascent)


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


def _stats_of_squares(flat: Tensor) -> Tensor:
    """Packed ``[sum of squares, non-finite]`` of one flat run, in one compiled pass."""
    sums = flat.to(torch.float64).square().sum()
    finite = torch.isfinite(sums)
    return torch.stack([torch.where(finite, sums, 0.0), (~finite).to(torch.float64)])


def _stats_of_extremes(flat: Tensor) -> Tensor:
    """Packed ``[0, non-finite]`` of one flat run from its extremes: one eager read (nan and
    inf reach the minimum or maximum; no sum, so no overflow of finite values). Where host
    reads are free (CPU), a sum in the run's own dtype comes first, which reads faster: inf
    and nan propagate through it, so a finite sum settles it; only a non-finite one, which an
    overflow of finite values can also cause, goes on to the extremes."""
    if host_reads.reads_are_free(flat.device) and math.isfinite(flat.sum().item()):
        return torch.zeros(2, dtype=torch.float64, device=flat.device)
    low, high = torch.aminmax(flat)
    bad = ~(torch.isfinite(low) & torch.isfinite(high))
    return torch.stack([torch.zeros((), dtype=torch.float64, device=flat.device),
                        bad.to(torch.float64)])


def fused_norm_stats(tensors: list[Tensor], device: torch.device | None = None, *,
                     norm: bool = True) -> Tensor:
    """``norms.local_norm_stats`` with one pass per flat run of ``tensors``, on the device.

    The eager statistics convert every tensor to float64 before its norm (a full copy); here a
    compiled reduction converts element by element while it reads, so it costs one read of
    the gradients. It needs no separate finiteness test: the square of any finite float32 (or
    narrower) value is far below float64's range, so the float64 sum of squares is finite
    exactly when every entry is. float64 runs, whose squares can overflow, stay eager. With
    ``norm=False`` a run's extremes (``torch.aminmax``: one eager read, no compiled call, no
    sum that finite values could overflow) decide, after a faster sum on the CPU. The count is
    of non-finite runs and tensors; only zero matters. Nothing is read on the host, except
    that sum where host reads are free (``host_reads``).
    """
    if device is None and tensors:
        device = tensors[0].device
    flats, rest = _flat_runs([t for t in tensors if t.dtype != torch.float64])
    rest += [t for t in tensors if t.dtype == torch.float64]
    stats = local_norm_stats(rest, device, norm=norm) if rest or not flats else None
    fn = _compile_once(_stats_of_squares) if norm else None
    for flat in flats:
        # Through _call: the recompile-limit patch (costly) only for a new kind of input.
        run = (_call(fn, (flat,), (fn, flat.dtype, flat.device)) if norm
               else _stats_of_extremes(flat)).to(device)
        stats = run if stats is None else stats + run
    return stats


def _moment_sums_body(m: Tensor, g: Tensor, beta: Tensor | None) -> Tensor:
    if beta is not None:
        b = beta.to(m.dtype)
        x = m * b + g * (1 - b)
        total = (x * x).sum().to(torch.float64)
        return torch.stack([total, torch.zeros_like(total), torch.zeros_like(total)])
    return torch.stack([(m * m).sum(), (m * g).sum(), (g * g).sum()]).to(torch.float64)


def _moment_sums_exact(m: Tensor, g: Tensor, beta: Tensor | None) -> Tensor:
    # In float64: squares and products of finite float32 values cannot overflow it, so the
    # sums are finite exactly when every gradient entry is (see fused_norm_stats).
    return _moment_sums_body(m.to(torch.float64), g.to(torch.float64), beta)


def _moment_sums_quick(m: Tensor, g: Tensor, beta: Tensor | None) -> Tensor:
    # In the tensors' precision: a float64 conversion per element costs a CPU several times
    # the read itself. Inductor's reductions sum in vectorized partial sums (relative error
    # about 1e-7 here), far below what the radius needs.
    return _moment_sums_body(m, g, beta)


def moment_sums(moments: list[Tensor], grads: list[Tensor], *, exact: bool = True,
                beta: float | None = None) -> Tensor:
    """float64 ``[sum m^2, sum m g, sum g^2]`` over matching tensors, one compiled pass per
    flat run (momentum ascent's norm of the next moment, see ``momentum_ascent``); with
    ``beta``, ``[||beta m + (1 - beta) g||^2, 0, 0]`` (the next moment itself, unclipped).

    ``exact``: every product in float64 (finite whenever the gradients are); else sums in the
    tensors' precision, which a square or sum beyond float32's range turns into inf."""
    flat_m = flat_view(moments) if len(moments) > 1 else (moments[0].reshape(-1)
                                                          if moments else None)
    flat_g = flat_view(grads) if len(grads) > 1 else (grads[0].reshape(-1) if grads else None)
    fn = _compile_once(_moment_sums_exact if exact else _moment_sums_quick)
    if flat_m is not None and flat_g is not None and flat_m.numel() == flat_g.numel():
        pairs = [(flat_m, flat_g)]
    else:
        pairs = [(m.reshape(-1), g.reshape(-1)) for m, g in zip(moments, grads)]
    total = None
    for m, g in pairs:
        b = None if beta is None else _constant((float(beta),), m.device, torch.float64)
        part = _call(fn, (m, g, b), (fn, m.dtype, g.dtype, m.device, m.numel() == 1,
                                     beta is None))
        total = part if total is None else total + part
    return total


def fusable(p: Tensor, g: Tensor) -> bool:
    """Whether the compiled kernel takes parameter ``p`` with gradient ``g``."""
    return _fusable(p, g)


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
                  tokens: Sequence[Any], *, finite: Tensor | None = None,
                  norm: Tensor | None = None, slow_key: str | None = None,
                  ascent: Tensor | None = None) -> list[int]:
    """Apply ``group``'s rule to ``params`` in flat groups; returns the indices left undone.

    ``tokens[i]`` stands for the update history of ``params[i]``: equal tokens mean equal step
    counts (the optimizer keeps them on the host, so grouping by count reads nothing).
    Parameters that each own their storage (a fresh model) are moved once into one flat tensor
    per (device, dtype, token). Parameters that are views of someone else's buffer (the
    sharded optimizer's chunks, or a layout made by an earlier step) are never moved: the
    kernel runs once per run of consecutive views. ``state[p][name]`` holds each parameter's
    buffers (``names`` in kernel order), its ``step`` counter and, with ``slow_key``, its
    Lookahead slow weights; each is rebound to views of flat tensors when needed. ``grads[i]``
    is rebound into the flat layout only when it is ``params[i].grad`` itself (not a clipped
    or negated copy). ``finite``, ``norm`` and ``ascent`` as in ``fused_step_``.
    """
    state_dtype = group.get("state_dtype")
    run = _Run(state, group, names, finite, norm, slow_key, ascent)
    flats = _one_flat_run(params, grads)
    if flats is not None and len(set(tokens)) == 1:  # the steady state: one run, one count
        run(params, grads, compute_dtype_for(flats[0].dtype, state_dtype), *flats)
        return []
    buckets: dict[tuple, list[int]] = defaultdict(list)
    rest: list[int] = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if _fusable(p, g):
            buckets[(p.device, p.dtype, tokens[i])].append(i)
        else:
            rest.append(i)
    for (_, dtype, _), idx in buckets.items():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        compute = compute_dtype_for(dtype, state_dtype)
        flat_p = flat_view(ps)
        if flat_p is None and all(_owns_storage(p) for p in ps):
            flat_p = _gather(ps, lambda j, v: setattr(ps[j], "data", v))
        if flat_p is not None:
            run(ps, gs, compute, flat_p)
            continue
        for members in _runs(ps):
            run([ps[j] for j in members], [gs[j] for j in members], compute,
                flat_view([ps[j] for j in members]))
    return rest


class _Run:
    """Runs the kernel on one run of parameters, laying out its gradients, counters, buffers
    and slow weights as flat tensors where they are not already."""

    def __init__(self, state, group, names, finite, norm, slow_key, ascent) -> None:
        self.state, self.group, self.names = state, group, names
        self.finite, self.norm, self.slow_key, self.ascent = finite, norm, slow_key, ascent

    def __call__(self, ps, gs, compute_dtype, flat_p, flat_g=None) -> None:
        if flat_p is None:  # adjacent by chance but separate allocations: one at a time
            for p, g in zip(ps, gs):
                self([p], [g], compute_dtype, flat_view([p]))
            return
        if flat_g is None:
            own_grads = all(g is p.grad for p, g in zip(ps, gs))
            flat_g = _flat(gs, (lambda j, v: setattr(ps[j], "grad", v)) if own_grads else None)
        keys = ["step", *self.names] + ([self.slow_key] if self.slow_key else [])
        flats = {}
        for name in keys:
            def rebind(j, v, name=name):
                self.state[ps[j]][name] = v
            flats[name] = _flat([self.state[p][name] for p in ps], rebind)
        group_rule_(self.group, flat_p, flat_g, [flats[name] for name in self.names],
                    flats["step"], compute_dtype, finite=self.finite, norm=self.norm,
                    slow=flats.get(self.slow_key) if self.slow_key else None,
                    ascent=self.ascent)


def group_rule_(group: dict[str, Any], param: Tensor, grad: Tensor, buffers: Sequence[Tensor],
                counter: Tensor, compute_dtype: torch.dtype | None, *,
                finite: Tensor | None = None, norm: Tensor | None = None,
                slow: Tensor | None = None, ascent: Tensor | None = None) -> None:
    """``fused_step_`` with the rule and hyperparameters of the param group ``group``;
    clipping applies when ``norm`` is given (else the gradients are used as they are)."""
    fused_step_(group["update"], param, grad, buffers, counter, lr=group["lr"],
                betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                no_prox=group["no_prox"], compute_dtype=compute_dtype, finite=finite,
                norm=norm, max_grad_norm=group["max_grad_norm"] if norm is not None else None,
                slow=slow, lookahead_k=group["lookahead_k"],
                lookahead_alpha=group["lookahead_alpha"], ascent=ascent)
