"""Momentum ascent (MSAM; Becker, Altrock, Risse, arXiv 2401.12033): SAM at one gradient a step.

Between steps the model holds the ascent point ``w~ = w - e`` instead of ``w``, with

    SAM form:   e = s m,          s = rho / (||m|| + 1e-12)
    |w|-scaled: e = s T_w^2 m,    s = rho / (||T_w m|| + 1e-12),   T_w = |w| + eta

where ``m`` is the rule's raw first moment (``exp_avg``: not bias-corrected, not
preconditioned) and the norm is global over every parameter the optimizer updates (every
group; every rank, through the optimizer's ``_norm_stats``). The loop's one forward/backward
gives the gradient at ``w~``; the step goes back to ``w = w~ + e``, applies the rule there
(decay, clipping, the non-finite skip as always) and ascends again from the new ``w`` and
``m`` (``s = 0`` while the group's step count is at most ``sam_warmup``).

What is kept between steps: per group, the scale ``s`` the weights hold (``ascent_scale``: a
0-d float64 tensor, saved as a number); per parameter, nothing in the SAM form (``e`` is
``s m``, recomputed from the unchanged ``m``), and ``e`` itself in the |w|-scaled form, since
``T_w`` depends on the ``w`` that ``w~`` no longer shows (``ascent.offset``). While the
optimizer is in eval mode the model holds ``w`` and each displaced parameter keeps its ``w~``
(``ascent.point``), so ``train()`` returns to it bit for bit.

A ``finite`` predicate (a 0-d bool tensor: the sync-free step's skip decision) makes both
moves 0 where it is false, so a skipped step leaves ``w~`` and ``s`` exactly as they were.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .dtensor import local, local_list
from .sam import NORM_EPS, norm_terms, perturbation

__all__ = ["SCALE", "OFFSET", "POINT", "EVALUATING", "ascends", "leave_", "take_",
           "to_eval_", "to_train_"]

SCALE = "ascent_scale"       # param group: the s the group's weights hold (0.0: none)
EVALUATING = "ascent_eval"   # param group: the optimizer is in eval mode (weights at w)
OFFSET = "ascent.offset"     # parameter state, |w|-scaled form: e
POINT = "ascent.point"       # parameter state, eval mode only: a copy of w~


def ascends(group: dict[str, Any]) -> bool:
    """Whether ``group`` uses momentum ascent."""
    return group.get("sam_ascent") == "momentum" and group["sam_rho"] > 0


def _moment_key(group: dict[str, Any]) -> str:
    return f"{group['update']}.exp_avg"  # every rule's first buffer is its first moment


def _with_moment(state: dict[Tensor, dict[str, Any]], group: dict[str, Any]
                 ) -> tuple[list[Tensor], list[Tensor]]:
    """The group's parameters that have a first moment, and those moments."""
    key = _moment_key(group)
    params = [p for p in group["params"] if p in state and key in state[p]]
    return params, [state[p][key] for p in params]


def _held(group: dict[str, Any]) -> bool:
    """Whether the group's weights may sit away from ``w`` (a scale was ever stored)."""
    scale = group.get(SCALE, 0.0)
    return isinstance(scale, Tensor) or scale != 0.0


def _scale_tensor(group: dict[str, Any], device: torch.device) -> Tensor:
    """The group's stored scale as a 0-d float64 tensor (a loaded number becomes one)."""
    scale = group.get(SCALE, 0.0)
    if not isinstance(scale, Tensor) or scale.device != device:
        scale = group[SCALE] = torch.as_tensor(scale, dtype=torch.float64).to(device)
    return scale


def _offsets(state: dict[Tensor, dict[str, Any]], group: dict[str, Any],
             params: list[Tensor], moments: list[Tensor]) -> list[Tensor | None]:
    """``e`` of each parameter: kept (|w|-scaled form) or ``s m`` (computed now)."""
    if group["sam_adaptive"]:
        return [state[p].get(OFFSET) for p in params]
    weights = local_list(params)
    scale = _scale_tensor(group, weights[0].device) if weights else None
    return [_upcast(local(m), w) * scale for w, m in zip(weights, moments)]


def _upcast(m: Tensor, w: Tensor) -> Tensor:
    # A state_dtype narrower than the weights: e is computed in the weights' precision.
    return m if m.dtype == w.dtype else m.to(w.dtype)


def leave_(state: dict[Tensor, dict[str, Any]], groups: list[dict[str, Any]],
           finite: Tensor | None = None) -> None:
    """Move every displaced group's weights from ``w~`` back to ``w = w~ + e``."""
    for group in groups:
        if not _held(group):
            continue
        params, moments = _with_moment(state, group)
        for p, e in zip(params, _offsets(state, group, params, moments)):
            if e is not None:
                local(p).add_(e if finite is None else torch.where(finite, e, 0.0))


def _next_scale(group: dict[str, Any], new_norm: Tensor, finite: Tensor | None) -> Tensor:
    """``s' = rho / (||m'|| + 1e-12)`` of an ascending group (0 while its step count is at
    most ``sam_warmup``), stored as its scale; returns the ``s'`` to move by. On a skipped
    step (``finite`` false) the stored scale stays and the move is 0."""
    old = _scale_tensor(group, new_norm.device)
    if group["sam_clock"] <= group["sam_warmup"]:
        scale = torch.zeros_like(old)
    else:
        scale = group["sam_rho"] / (new_norm.to(torch.float64) + NORM_EPS)
    if finite is None:
        group[SCALE] = scale
        return scale
    group[SCALE] = torch.where(finite, scale, old)
    return torch.where(finite, scale, 0.0)


def take_(state: dict[Tensor, dict[str, Any]], groups: list[dict[str, Any]], norm_stats,
          finite: Tensor | None = None) -> None:
    """After the update: ``s' = rho / ||m'||`` for every ascending group, ``w~' = w' - e'``.

    ``norm_stats(tensors, owners)`` sums the packed norm statistics over every holder (the
    optimizer's ``_norm_stats``): one reduction for the whole model.
    """
    for group in groups:  # ascent switched off (sam_rho set to 0): the weights stay at w
        if _held(group) and not ascends(group):
            group[SCALE] = 0.0 if finite is None else torch.where(
                finite, 0.0, _scale_tensor(group, finite.device))
    if not any(ascends(group) for group in groups):
        return
    terms: list[Tensor] = []
    owners: list[Tensor] = []
    per_group = [_with_moment(state, group) for group in groups]
    for group, (params, moments) in zip(groups, per_group):
        adaptive = group["sam_adaptive"] and ascends(group)
        terms += norm_terms(local_list(params), local_list(moments), adaptive=adaptive,
                            eta=group["sam_eta"])
        owners += params
    if not terms:
        return
    norm = norm_stats(terms, owners)[0].sqrt()
    for group, (params, moments) in zip(groups, per_group):
        if not ascends(group) or not params:
            continue
        weights = local_list(params)
        scale = _next_scale(group, norm.to(weights[0].device), finite)
        for p, w, m in zip(params, weights, moments):
            e = perturbation(w, _upcast(local(m), w), scale=scale,
                             adaptive=group["sam_adaptive"], eta=group["sam_eta"])
            if group["sam_adaptive"]:
                kept = state[p].get(OFFSET)
                state[p][OFFSET] = (e if finite is None or kept is None
                                    else torch.where(finite, e, kept))
            w.sub_(e)


def to_eval_(state: dict[Tensor, dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    """Eval mode: keep a copy of each displaced weight's ``w~`` and move it to ``w``."""
    # Groups without momentum ascent hold w already: eval() leaves them (and their steps) be.
    switching = [group for group in groups if not group.get(EVALUATING, False)
                 and (ascends(group) or _held(group))]
    for group in switching:
        group[EVALUATING] = True
        if _held(group):
            for p in _with_moment(state, group)[0]:
                state[p][POINT] = p.detach().clone()
    leave_(state, switching)


def to_train_(state: dict[Tensor, dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    """Train mode: every weight back at its ``w~``, bit for bit."""
    for group in groups:
        if not group.get(EVALUATING, False):
            continue
        group[EVALUATING] = False
        for p in group["params"]:
            point = state[p].pop(POINT, None) if p in state else None
            if point is not None:
                local(p).copy_(local(point))


# The first moment's decay in each rule's update: m' = b m + (1 - b) g.
_MOMENT_BETA = {"adan": 0, "lion": 1, "lion_adan": 0}


def _kernel_can_ascend(state: dict[Tensor, dict[str, Any]], groups: list[dict[str, Any]],
                       per_group: list[tuple[list[Tensor], list[Tensor]]]) -> bool:
    """Whether the fused kernel can move to ``w`` and back itself this step: the SAM form,
    buffers in the weights' precision, and every parameter with a first moment has a
    gradient (and the other way round)."""
    if not any(ascends(group) for group in groups):
        return False
    for group, (params, _) in zip(groups, per_group):
        if _held(group) and not ascends(group):
            return False  # ascent switched off: the pieces above take the weights back
        if (ascends(group) and group["sam_adaptive"]) or group.get("state_dtype") is not None:
            return False
        with_m, _ = _with_moment(state, group)
        if len(with_m) != len(params) or set(with_m) != set(params):
            return False
    return True


def fused_stats(state: dict[Tensor, dict[str, Any]], groups: list[dict[str, Any]],
                per_group: list[tuple[list[Tensor], list[Tensor]]], reduce_stats
                ) -> Tensor | None:
    """The step's gradient statistics and what ``s'`` needs, from one read of ``g`` and ``m``.

    ``s'`` needs ``||m'||`` before the kernel writes ``m'``, and ``m' = b m + (1 - b) c g``
    (``c`` the clipping factor) can be summed in the read of ``g`` the step makes for its
    own statistics. Without clipping that is ``||b m + (1 - b) g||^2`` per group (the
    finiteness test reads it too); with clipping, whose ``c`` is known only after the
    gradients' norm, the expansion ``b^2 sum m^2 + 2 b (1 - b) c sum m g + (1 - b)^2 c^2
    sum g^2``. Returns the packed float64 ``[sum g^2, non-finite, three sums per group]``
    (``moment_sums``) summed over every holder (``reduce_stats``: one reduction), whose first
    two entries are ``norms.local_norm_stats``'s (without clipping the first is 0, as there);
    None where the kernel cannot ascend.

    Where host reads are free (CPU) the sums are float32 sums (``fused``), read once: a
    non-finite result (inf or nan in a gradient, or a square or sum beyond float32's range)
    goes on to the exact statistics, as the plain step's finiteness test does.
    """
    from . import host_reads
    from .fused import fused_norm_stats, moment_sums

    if not _kernel_can_ascend(state, groups, per_group):
        return None
    grads_all = [g for _, grads in per_group for g in grads]
    if not grads_all:  # a step with no gradient anywhere: nothing to read
        return None
    device = grads_all[0].device
    quick = host_reads.reads_are_free(device)
    clipping = _clipping(groups)

    def sums_of(exact: bool) -> Tensor:
        parts = []
        for group, (params, grads) in zip(groups, per_group):
            moments = [state[p][_moment_key(group)] for p in params]  # the gradients' order
            beta = None if clipping else group["betas"][_MOMENT_BETA[group["update"]]]
            parts.append(moment_sums(moments, grads, exact=exact, beta=beta).to(device)
                         if params else torch.zeros(3, dtype=torch.float64, device=device))
        return torch.cat(parts)

    sums = sums_of(exact=not quick)
    if quick and not math.isfinite(float(sums.sum())):  # a plain load on the CPU
        head = fused_norm_stats(grads_all, device, norm=clipping)  # decides exactly
        if float(head[1]) == 0:
            sums = sums_of(exact=True)  # finite, only beyond float32's squares
    else:
        # float64 sums of squares are finite iff the entries are; float32 ones were checked.
        total = sums[2::3].sum() if clipping else sums[0::3].sum()
        finite = torch.isfinite(total)
        head = torch.stack([torch.where(finite, total, 0.0) if clipping else
                            torch.zeros_like(total), (~finite).to(torch.float64)])
    return reduce_stats(torch.cat([head, sums]))


def _clipping(groups: list[dict[str, Any]]) -> bool:
    return any(group["max_grad_norm"] is not None for group in groups)


def fused_scales(groups: list[dict[str, Any]], packed: Tensor, norm: Tensor | None,
                 finite: Tensor | None) -> list[Tensor | None]:
    """Per group ``[s, s']`` for the fused kernel (None: a group that does not ascend), from
    ``fused_stats``'s sums; ``norm`` is the gradients' global norm (for the clipping factor),
    ``finite`` the sync-free skip predicate (``s'`` is then 0 in the kernel and not stored)."""
    if not _clipping(groups):  # the sums are ||m'||^2 per group already
        return _scales(groups, packed[2::3].sum().sqrt(), finite)
    total = None
    for i, group in enumerate(groups):
        a, b_sum, c_sum = packed[2 + 3 * i:5 + 3 * i]
        b = group["betas"][_MOMENT_BETA[group["update"]]]
        c = 1.0
        if group["max_grad_norm"] is not None:
            c = torch.clamp(group["max_grad_norm"] / (norm.to(torch.float64) + 1e-6), max=1.0)
        part = b * b * a + 2 * b * (1 - b) * c * b_sum + (1 - b) ** 2 * c * c * c_sum
        total = part if total is None else total + part
    return _scales(groups, total.sqrt(), finite)


def _scales(groups: list[dict[str, Any]], new_norm: Tensor, finite: Tensor | None
            ) -> list[Tensor | None]:
    out: list[Tensor | None] = []
    for group in groups:
        if not ascends(group):
            out.append(None)
            continue
        old = _scale_tensor(group, new_norm.device)
        out.append(torch.stack([old, _next_scale(group, new_norm, finite)]))
    return out
