"""Pure update kernels: the one place where NeuroOptima's update equations live.

Every kernel takes lists of tensors (parameters, the gradients used for the update and the
rule's buffers) plus plain hyperparameters, and updates parameters and buffers in place. The
single-process optimizer, the sharded optimizer and the DeepSpeed adapter all call these same
functions; a backend never re-derives an equation.

Each rule has a for-loop kernel and a multi-tensor (``torch._foreach_*``) kernel that performs
the same operations in the same order, so both give bitwise-equal results.

``steps`` holds each parameter's 1-based update count ``k``; bias corrections are per tensor,
as in ``torch.optim.adamw``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["adan", "lion", "lion_adan", "UPDATE_RULES", "RULE_BUFFERS", "DEFAULT_BETAS"]

# Buffers each rule keeps per parameter, in the order the kernels take them.
RULE_BUFFERS: dict[str, tuple[str, ...]] = {
    "adan": ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad"),
    "lion": ("exp_avg",),
    "lion_adan": ("exp_avg", "exp_avg_diff", "prev_grad"),
}
UPDATE_RULES = tuple(RULE_BUFFERS)

# Official defaults: sail-sg/Adan (b1, b2, b3); google/automl Lion (b1, b2); the hybrid takes
# Adan's first two.
DEFAULT_BETAS: dict[str, tuple[float, ...]] = {
    "adan": (0.98, 0.92, 0.99),
    "lion": (0.9, 0.99),
    "lion_adan": (0.98, 0.92),
}


def _bias_corrections(beta: float, steps: Sequence[int]) -> list[float]:
    return [1.0 - beta**k for k in steps]


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


def _adan_for_loop(params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, steps, *,
                   lr, betas, eps, weight_decay, no_prox):
    beta1, beta2, beta3 = betas
    for p, g, m, v, n, g_prev, k in zip(params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs,
                                          prev_grads, steps):
        d = g - g_prev
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).add_(d, alpha=1 - beta2)
        u = g + beta2 * d
        n.mul_(beta3).addcmul_(u, u, value=1 - beta3)
        # ** 0.5 (not math.sqrt) also accepts the 0-d tensors the fused path passes.
        denom = n.sqrt().div_((1 - beta3**k) ** 0.5).add_(eps)
        update = (m / (1 - beta1**k)).add_((beta2 * v).div_(1 - beta2**k)).div_(denom)
        if no_prox:
            p.mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
        else:
            p.add_(update, alpha=-lr).div_(1 + lr * weight_decay)
        g_prev.copy_(g)


def _adan_foreach(params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, steps, *,
                  lr, betas, eps, weight_decay, no_prox):
    beta1, beta2, beta3 = betas
    d = torch._foreach_sub(grads, prev_grads)
    _mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    _mul_(exp_avg_diffs, beta2)
    torch._foreach_add_(exp_avg_diffs, d, alpha=1 - beta2)
    u = _mul(d, beta2)
    torch._foreach_add_(u, grads, alpha=1)  # g + b2 d, same rounding as the loop's g + b2*d
    _mul_(exp_avg_sqs, beta3)
    torch._foreach_addcmul_(exp_avg_sqs, u, u, value=1 - beta3)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [bc**0.5 for bc in _bias_corrections(beta3, steps)])
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, _bias_corrections(beta1, steps))
    diff_term = _mul(exp_avg_diffs, beta2)
    torch._foreach_div_(diff_term, _bias_corrections(beta2, steps))
    torch._foreach_add_(update, diff_term)
    torch._foreach_div_(update, denom)
    if no_prox:
        _mul_(params, 1 - lr * weight_decay)
        torch._foreach_add_(params, update, alpha=-lr)
    else:
        torch._foreach_add_(params, update, alpha=-lr)
        torch._foreach_div_(params, 1 + lr * weight_decay)
    torch._foreach_copy_(prev_grads, grads)


def adan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
         exp_avg_diffs: list[Tensor], exp_avg_sqs: list[Tensor], prev_grads: list[Tensor],
         steps: Sequence[int], *, lr: float, betas: tuple[float, float, float], eps: float,
         weight_decay: float, no_prox: bool = False, foreach: bool = False) -> None:
    """One Adan update. ``prev_grads`` must hold the first gradient at ``k = 1``."""
    fn = _adan_foreach if foreach else _adan_for_loop
    fn(params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, steps, lr=lr,
       betas=betas, eps=eps, weight_decay=weight_decay, no_prox=no_prox)


# --------------------------------------------------------------------------------------------
# Lion (Chen et al., arXiv 2302.06675; official google/automl implementation)
# --------------------------------------------------------------------------------------------


def _lion_for_loop(params, grads, exp_avgs, *, lr, betas, weight_decay):
    beta1, beta2 = betas
    for p, g, m in zip(params, grads, exp_avgs):
        p.mul_(1 - lr * weight_decay)
        c = (m * beta1).add_(g, alpha=1 - beta1)
        p.add_(c.sign_(), alpha=-lr)
        m.mul_(beta2).add_(g, alpha=1 - beta2)


def _lion_foreach(params, grads, exp_avgs, *, lr, betas, weight_decay):
    beta1, beta2 = betas
    _mul_(params, 1 - lr * weight_decay)
    c = _mul(exp_avgs, beta1)
    torch._foreach_add_(c, grads, alpha=1 - beta1)
    torch._foreach_sign_(c)
    torch._foreach_add_(params, c, alpha=-lr)
    _mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)


def lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float,
         betas: tuple[float, float], weight_decay: float, foreach: bool = False) -> None:
    """One Lion update (decoupled weight decay, sign of the interpolated momentum)."""
    fn = _lion_foreach if foreach else _lion_for_loop
    fn(params, grads, exp_avgs, lr=lr, betas=betas, weight_decay=weight_decay)


# --------------------------------------------------------------------------------------------
# Lion-Adan hybrid: Lion's sign step on Adan's bias-corrected Nesterov momentum
# --------------------------------------------------------------------------------------------


def _lion_adan_for_loop(params, grads, exp_avgs, exp_avg_diffs, prev_grads, steps, *, lr, betas,
                        weight_decay):
    beta1, beta2 = betas
    for p, g, m, v, g_prev, k in zip(params, grads, exp_avgs, exp_avg_diffs, prev_grads, steps):
        d = g - g_prev
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).add_(d, alpha=1 - beta2)
        p.mul_(1 - lr * weight_decay)
        direction = (m / (1 - beta1**k)).add_((beta2 * v).div_(1 - beta2**k))
        p.add_(direction.sign_(), alpha=-lr)
        g_prev.copy_(g)


def _lion_adan_foreach(params, grads, exp_avgs, exp_avg_diffs, prev_grads, steps, *, lr, betas,
                       weight_decay):
    beta1, beta2 = betas
    d = torch._foreach_sub(grads, prev_grads)
    _mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    _mul_(exp_avg_diffs, beta2)
    torch._foreach_add_(exp_avg_diffs, d, alpha=1 - beta2)
    _mul_(params, 1 - lr * weight_decay)
    direction = torch._foreach_div(exp_avgs, _bias_corrections(beta1, steps))
    diff_term = _mul(exp_avg_diffs, beta2)
    torch._foreach_div_(diff_term, _bias_corrections(beta2, steps))
    torch._foreach_add_(direction, diff_term)
    torch._foreach_sign_(direction)
    torch._foreach_add_(params, direction, alpha=-lr)
    torch._foreach_copy_(prev_grads, grads)


def lion_adan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
              exp_avg_diffs: list[Tensor], prev_grads: list[Tensor], steps: Sequence[int], *,
              lr: float, betas: tuple[float, float], weight_decay: float,
              foreach: bool = False) -> None:
    """One Lion-Adan update. ``prev_grads`` must hold the first gradient at ``k = 1``."""
    fn = _lion_adan_foreach if foreach else _lion_adan_for_loop
    fn(params, grads, exp_avgs, exp_avg_diffs, prev_grads, steps, lr=lr, betas=betas,
       weight_decay=weight_decay)
