"""Pure update kernels: the one place where NeuroOptima's update equations live.

Every kernel takes lists of tensors (parameters, the gradients used for the update and the
rule's buffers) plus plain hyperparameters, and updates parameters and buffers in place. The
single-process optimizer, the sharded optimizer and the DeepSpeed adapter all call these same
functions; a backend never re-derives an equation.

Each rule is split in two: ``*_scalars`` turns the hyperparameters and the step count ``k``
into the scalar coefficients of the step (bias corrections, ``1 - beta``, the decay factor),
and ``*_elementwise`` applies them to one tensor. The for-loop kernel calls the elementwise
function per tensor; the multi-tensor (``torch._foreach_*``) kernel performs the same
operations in the same order on lists, so both give bitwise-equal results; the fused path
(``fused``) compiles the elementwise function over flat buffers, with the coefficients
computed once per step outside the compiled graph.

``steps`` holds each parameter's 1-based update count ``k``; bias corrections are per tensor,
as in ``torch.optim.adamw``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["adan", "lion", "lion_adan", "UPDATE_RULES", "RULE_BUFFERS", "DEFAULT_BETAS",
           "AdanScalars", "LionScalars", "LionAdanScalars", "rule_scalars", "ELEMENTWISE",
           "state_keys"]

# Buffers each rule keeps per parameter, in the order the kernels take them.
RULE_BUFFERS: dict[str, tuple[str, ...]] = {
    "adan": ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad"),
    "lion": ("exp_avg",),
    "lion_adan": ("exp_avg", "exp_avg_diff", "prev_grad"),
}
UPDATE_RULES = tuple(RULE_BUFFERS)


def state_keys(rule: str) -> tuple[str, ...]:
    """The optimizer-state keys of ``rule``'s buffers, in kernel order ("adan.exp_avg", ...)."""
    return tuple(f"{rule}.{name}" for name in RULE_BUFFERS[rule])


# Official defaults: sail-sg/Adan (b1, b2, b3); google/automl Lion (b1, b2); the hybrid takes
# Adan's first two.
DEFAULT_BETAS: dict[str, tuple[float, ...]] = {
    "adan": (0.98, 0.92, 0.99),
    "lion": (0.9, 0.99),
    "lion_adan": (0.98, 0.92),
}


# On CPU, torch._foreach_mul(_) rounds a Python scalar to a bfloat16/float16 list's own dtype
# (0.999 -> 1.0), while Tensor.mul keeps it in float32. A 0-dim float32 factor, applied in place
# (out of place it would promote 0-dim inputs), rounds exactly as the for-loop kernels do.
def _exact_factor(tensors: list[Tensor], factor: float) -> float | Tensor:
    if tensors and tensors[0].device.type == "cpu" and tensors[0].dtype in (torch.bfloat16,
                                                                            torch.float16):
        return torch.tensor(factor, dtype=torch.float32)
    return factor


def _mul_(tensors: list[Tensor], factor: float) -> None:
    torch._foreach_mul_(tensors, _exact_factor(tensors, factor))


def _mul(tensors: list[Tensor], factor: float) -> list[Tensor]:
    exact = _exact_factor(tensors, factor)
    if isinstance(exact, Tensor):
        out = [t.clone() for t in tensors]
        torch._foreach_mul_(out, exact)
        return out
    return list(torch._foreach_mul(tensors, factor))


# --------------------------------------------------------------------------------------------
# Adan (Xie et al., arXiv 2208.06677; official sail-sg implementation)
# --------------------------------------------------------------------------------------------


class AdanScalars(NamedTuple):
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    beta3: float
    one_minus_beta3: float
    bias_correction1: float        # 1 - beta1^k
    bias_correction2: float        # 1 - beta2^k
    bias_correction3_sqrt: float   # sqrt(1 - beta3^k)
    eps: float
    neg_lr: float
    decay: float                   # no_prox: 1 - lr wd, multiplied before the step;
                                   # else 1 + lr wd, divided after it


def adan_scalars(k: int, *, lr: float, betas: Sequence[float], eps: float,
                 weight_decay: float, no_prox: bool) -> AdanScalars:
    beta1, beta2, beta3 = betas
    return AdanScalars(beta1, 1 - beta1, beta2, 1 - beta2, beta3, 1 - beta3, 1 - beta1**k,
                       1 - beta2**k, (1 - beta3**k) ** 0.5, eps, -lr,
                       1 - lr * weight_decay if no_prox else 1 + lr * weight_decay)


def adan_elementwise(p: Tensor, g: Tensor, m: Tensor, v: Tensor, n: Tensor, g_prev: Tensor,
                     s: AdanScalars, no_prox: bool) -> None:
    """One Adan update of one tensor; ``s`` may hold floats or 0-d tensors."""
    d = g - g_prev
    m.mul_(s.beta1).add_(g, alpha=s.one_minus_beta1)
    v.mul_(s.beta2).add_(d, alpha=s.one_minus_beta2)
    u = g + s.beta2 * d
    n.mul_(s.beta3).addcmul_(u, u, value=s.one_minus_beta3)
    denom = n.sqrt().div_(s.bias_correction3_sqrt).add_(s.eps)
    update = (m / s.bias_correction1).add_((s.beta2 * v).div_(s.bias_correction2)).div_(denom)
    if no_prox:
        p.mul_(s.decay).add_(update, alpha=s.neg_lr)
    else:
        p.add_(update, alpha=s.neg_lr).div_(s.decay)
    g_prev.copy_(g)


def _adan_foreach(params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, scalars,
                  no_prox):
    s = scalars[0]  # everything but the bias corrections is shared by the list
    d = torch._foreach_sub(grads, prev_grads)
    _mul_(exp_avgs, s.beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=s.one_minus_beta1)
    _mul_(exp_avg_diffs, s.beta2)
    torch._foreach_add_(exp_avg_diffs, d, alpha=s.one_minus_beta2)
    u = _mul(d, s.beta2)
    torch._foreach_add_(u, grads, alpha=1)  # g + b2 d, same rounding as the loop's g + b2*d
    _mul_(exp_avg_sqs, s.beta3)
    torch._foreach_addcmul_(exp_avg_sqs, u, u, value=s.one_minus_beta3)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [c.bias_correction3_sqrt for c in scalars])
    torch._foreach_add_(denom, s.eps)
    update = torch._foreach_div(exp_avgs, [c.bias_correction1 for c in scalars])
    diff_term = _mul(exp_avg_diffs, s.beta2)
    torch._foreach_div_(diff_term, [c.bias_correction2 for c in scalars])
    torch._foreach_add_(update, diff_term)
    torch._foreach_div_(update, denom)
    if no_prox:
        _mul_(params, s.decay)
        torch._foreach_add_(params, update, alpha=s.neg_lr)
    else:
        torch._foreach_add_(params, update, alpha=s.neg_lr)
        torch._foreach_div_(params, s.decay)
    torch._foreach_copy_(prev_grads, grads)


def adan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
         exp_avg_diffs: list[Tensor], exp_avg_sqs: list[Tensor], prev_grads: list[Tensor],
         steps: Sequence[int], *, lr: float, betas: tuple[float, float, float], eps: float,
         weight_decay: float, no_prox: bool = False, foreach: bool = False) -> None:
    """One Adan update. ``prev_grads`` must hold the first gradient at ``k = 1``."""
    scalars = [adan_scalars(k, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            no_prox=no_prox) for k in steps]
    if foreach:
        _adan_foreach(params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads,
                      scalars, no_prox)
        return
    for p, g, m, v, n, g_prev, s in zip(params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs,
                                         prev_grads, scalars):
        adan_elementwise(p, g, m, v, n, g_prev, s, no_prox)


# --------------------------------------------------------------------------------------------
# Lion (Chen et al., arXiv 2302.06675; official google/automl implementation)
# --------------------------------------------------------------------------------------------


class LionScalars(NamedTuple):
    decay: float  # 1 - lr wd
    beta1: float
    one_minus_beta1: float
    neg_lr: float
    beta2: float
    one_minus_beta2: float


def lion_scalars(k: int, *, lr: float, betas: Sequence[float], eps: float,
                 weight_decay: float, no_prox: bool) -> LionScalars:
    del k, eps, no_prox  # Lion has no bias correction, no eps and only decoupled decay
    beta1, beta2 = betas
    return LionScalars(1 - lr * weight_decay, beta1, 1 - beta1, -lr, beta2, 1 - beta2)


def lion_elementwise(p: Tensor, g: Tensor, m: Tensor, s: LionScalars,
                     no_prox: bool = False) -> None:
    """One Lion update of one tensor (decoupled weight decay, sign of the interpolation)."""
    p.mul_(s.decay)
    c = (m * s.beta1).add_(g, alpha=s.one_minus_beta1)
    p.add_(c.sign_(), alpha=s.neg_lr)
    m.mul_(s.beta2).add_(g, alpha=s.one_minus_beta2)


def _lion_foreach(params, grads, exp_avgs, s):
    _mul_(params, s.decay)
    c = _mul(exp_avgs, s.beta1)
    torch._foreach_add_(c, grads, alpha=s.one_minus_beta1)
    torch._foreach_sign_(c)
    torch._foreach_add_(params, c, alpha=s.neg_lr)
    _mul_(exp_avgs, s.beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=s.one_minus_beta2)


def lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float,
         betas: tuple[float, float], weight_decay: float, foreach: bool = False) -> None:
    """One Lion update (decoupled weight decay, sign of the interpolated momentum)."""
    s = lion_scalars(0, lr=lr, betas=betas, eps=0.0, weight_decay=weight_decay, no_prox=True)
    if foreach:
        _lion_foreach(params, grads, exp_avgs, s)
        return
    for p, g, m in zip(params, grads, exp_avgs):
        lion_elementwise(p, g, m, s)


# --------------------------------------------------------------------------------------------
# Lion-Adan hybrid: Lion's sign step on Adan's bias-corrected Nesterov momentum
# --------------------------------------------------------------------------------------------


class LionAdanScalars(NamedTuple):
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    decay: float  # 1 - lr wd
    bias_correction1: float
    bias_correction2: float
    neg_lr: float


def lion_adan_scalars(k: int, *, lr: float, betas: Sequence[float], eps: float,
                      weight_decay: float, no_prox: bool) -> LionAdanScalars:
    del eps, no_prox  # a sign step has no denominator; decay is decoupled
    beta1, beta2 = betas
    return LionAdanScalars(beta1, 1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay,
                           1 - beta1**k, 1 - beta2**k, -lr)


def lion_adan_elementwise(p: Tensor, g: Tensor, m: Tensor, v: Tensor, g_prev: Tensor,
                          s: LionAdanScalars, no_prox: bool = False) -> None:
    """One Lion-Adan update of one tensor."""
    d = g - g_prev
    m.mul_(s.beta1).add_(g, alpha=s.one_minus_beta1)
    v.mul_(s.beta2).add_(d, alpha=s.one_minus_beta2)
    p.mul_(s.decay)
    direction = (m / s.bias_correction1).add_((s.beta2 * v).div_(s.bias_correction2))
    p.add_(direction.sign_(), alpha=s.neg_lr)
    g_prev.copy_(g)


def _lion_adan_foreach(params, grads, exp_avgs, exp_avg_diffs, prev_grads, scalars):
    s = scalars[0]
    d = torch._foreach_sub(grads, prev_grads)
    _mul_(exp_avgs, s.beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=s.one_minus_beta1)
    _mul_(exp_avg_diffs, s.beta2)
    torch._foreach_add_(exp_avg_diffs, d, alpha=s.one_minus_beta2)
    _mul_(params, s.decay)
    direction = torch._foreach_div(exp_avgs, [c.bias_correction1 for c in scalars])
    diff_term = _mul(exp_avg_diffs, s.beta2)
    torch._foreach_div_(diff_term, [c.bias_correction2 for c in scalars])
    torch._foreach_add_(direction, diff_term)
    torch._foreach_sign_(direction)
    torch._foreach_add_(params, direction, alpha=s.neg_lr)
    torch._foreach_copy_(prev_grads, grads)


def lion_adan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
              exp_avg_diffs: list[Tensor], prev_grads: list[Tensor], steps: Sequence[int], *,
              lr: float, betas: tuple[float, float], weight_decay: float,
              foreach: bool = False) -> None:
    """One Lion-Adan update. ``prev_grads`` must hold the first gradient at ``k = 1``."""
    scalars = [lion_adan_scalars(k, lr=lr, betas=betas, eps=0.0, weight_decay=weight_decay,
                                 no_prox=True) for k in steps]
    if foreach:
        _lion_adan_foreach(params, grads, exp_avgs, exp_avg_diffs, prev_grads, scalars)
        return
    for p, g, m, v, g_prev, s in zip(params, grads, exp_avgs, exp_avg_diffs, prev_grads,
                                      scalars):
        lion_adan_elementwise(p, g, m, v, g_prev, s)


# --------------------------------------------------------------------------------------------
# Per-rule tables for the fused path: scalars outside the compiled graph, elementwise inside
# --------------------------------------------------------------------------------------------

SCALARS: dict[str, Callable[..., Any]] = {
    "adan": adan_scalars, "lion": lion_scalars, "lion_adan": lion_adan_scalars}
SCALAR_TYPES: dict[str, type] = {
    "adan": AdanScalars, "lion": LionScalars, "lion_adan": LionAdanScalars}
ELEMENTWISE: dict[str, Callable[..., None]] = {
    "adan": adan_elementwise, "lion": lion_elementwise, "lion_adan": lion_adan_elementwise}


def rule_scalars(rule: str, k: int, *, lr: float, betas: Sequence[float], eps: float,
                 weight_decay: float, no_prox: bool) -> tuple[float, ...]:
    """The coefficients of one step of ``rule`` at update count ``k``, as Python floats."""
    return SCALARS[rule](k, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         no_prox=no_prox)
