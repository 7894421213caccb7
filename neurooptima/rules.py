"""Call one update rule's kernel, with its buffers optionally stored in a lower precision.

``run_rule`` is the one dispatch from a rule name to the kernels in ``functional``. When the
buffers are stored in a narrower dtype than the math needs (``state_dtype=torch.bfloat16`` with
float32 parameters), they are upcast, the very same kernel runs on the upcast copies, and the
results are rounded back into storage (round to nearest even, no stochastic rounding). Only the
storage is narrow: every equation is evaluated in ``compute_dtype``.

The eager path calls ``run_rule`` on lists of tensors; ``fused`` compiles ``run_elementwise``
(the same elementwise kernel, coefficients precomputed) for one flat tensor per buffer, so the
upcast, the math and the downcast become one pass.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import functional as F

__all__ = ["run_rule", "run_elementwise", "compute_dtype_for"]


def compute_dtype_for(param_dtype: torch.dtype,
                      state_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the math runs in when it differs from plain eager math, else None.

    ``state_dtype=None`` keeps the math in the parameter's dtype (no upcast); an explicit state
    dtype runs it in the wider of parameter and state dtype, and at least float32.
    """
    if state_dtype is None:
        return None
    wide = torch.promote_types(torch.promote_types(param_dtype, state_dtype), torch.float32)
    return None if wide == param_dtype == state_dtype else wide


def _upcast(buffers: Sequence[Tensor], compute_dtype: torch.dtype | None) -> list[Tensor]:
    return [b if compute_dtype is None or b.dtype == compute_dtype else b.to(compute_dtype)
            for b in buffers]


def run_rule(rule: str, params: list[Tensor], grads: list[Tensor],
             buffers: Sequence[list[Tensor]], steps: Sequence[float], *, lr: float,
             betas: tuple[float, ...], eps: float, weight_decay: float, no_prox: bool,
             foreach: bool, compute_dtype: torch.dtype | None = None) -> None:
    """One update of ``rule`` on ``params`` with ``buffers`` in ``functional.RULE_BUFFERS`` order.

    Buffers whose dtype differs from ``compute_dtype`` are upcast for the math and written
    back afterwards; ``None`` runs the kernel on the buffers as they are.
    """
    work = [_upcast(blist, compute_dtype) for blist in buffers]
    if rule == "adan":
        F.adan(params, grads, *work, steps, lr=lr, betas=betas, eps=eps,
               weight_decay=weight_decay, no_prox=no_prox, foreach=foreach)
    elif rule == "lion":
        F.lion(params, grads, *work, lr=lr, betas=betas, weight_decay=weight_decay,
               foreach=foreach)
    elif rule == "lion_adan":
        F.lion_adan(params, grads, *work, steps, lr=lr, betas=betas,
                    weight_decay=weight_decay, foreach=foreach)
    else:
        raise ValueError(f"update must be one of {', '.join(map(repr, F.UPDATE_RULES))}, "
                         f"got {rule!r}")
    for blist, wlist in zip(buffers, work):
        if foreach and any(w is not b for b, w in zip(blist, wlist)):
            torch._foreach_copy_(blist, wlist)
            continue
        for b, w in zip(blist, wlist):
            if w is not b:
                b.copy_(w)


def run_elementwise(rule: str, param: Tensor, grad: Tensor, buffers: Sequence[Tensor],
                    scalars: tuple, *, no_prox: bool,
                    compute_dtype: torch.dtype | None = None) -> None:
    """``rule``'s elementwise update of one tensor with precomputed ``scalars``.

    The fused path compiles this for flat buffers; ``scalars`` are then 0-d tensors.
    """
    work = _upcast(buffers, compute_dtype)
    F.ELEMENTWISE[rule](param, grad, *work, scalars, no_prox)
    for b, w in zip(buffers, work):
        if w is not b:
            b.copy_(w)
