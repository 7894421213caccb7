"""SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021) as pure functions.

SAM moves the weights to ``w + e`` before the second gradient evaluation:

    SAM:   e = rho * g / ||g||
    ASAM:  e = rho * T_w^2 g / ||T_w g||,   T_w = |w| + eta   (elementwise)

where the norm is global over every parameter that has a gradient. ``NORM_EPS`` keeps a zero
gradient from dividing by zero (the reference implementations add the same 1e-12).

These functions take the already-reduced global norm, so a distributed backend computes local
statistics, all-reduces them once and then calls ``perturb_`` on the tensors it holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-12


def norm_terms(params: list[Tensor], grads: list[Tensor], *, adaptive: bool,
               eta: float) -> list[Tensor]:
    """The tensors whose global L2 norm SAM divides by: ``g`` (SAM) or ``T_w g`` (ASAM)."""
    if not adaptive:
        return grads
    return [(p.abs() + eta) * g for p, g in zip(params, grads)]


def perturbation(p: Tensor, g: Tensor, *, scale: float | Tensor, adaptive: bool, eta: float) -> Tensor:
    """SAM's ``e`` for one tensor, with ``scale = rho / (norm + NORM_EPS)``."""
    if adaptive:
        t = p.abs() + eta
        return t * t * g * scale
    return g * scale


def sam_scale(rho: float, norm: float | Tensor) -> float | Tensor:
    """``rho / (norm + NORM_EPS)``; a tensor norm gives a tensor scale (nothing read)."""
    return rho / (norm + NORM_EPS)


def perturb_(params: list[Tensor], grads: list[Tensor], *, rho: float, norm: float | Tensor,
             adaptive: bool, eta: float, finite: Tensor | None = None) -> None:
    """Move ``params`` to ``w + e`` in place, given the global norm of ``norm_terms``.

    ``norm`` may be a 0-d tensor on the device. ``finite`` (a 0-d bool tensor) decides on the
    device whether to perturb at all: where it is false ``e`` is 0, so non-finite gradients
    leave the weights exactly as they were, with nothing read on the host.
    """
    scale = sam_scale(rho, norm)
    for p, g in zip(params, grads):
        e = perturbation(p, g, scale=scale, adaptive=adaptive, eta=eta)
        p.add_(e if finite is None else torch.where(finite, e, 0.0))


def gradient_due(group: dict) -> bool:
    """Whether the coming step of ``group`` (number ``sam_clock + 1``, 1-based) runs
    gradient-ascent SAM: ``sam_rho`` > 0 and the number a multiple of ``sam_interval`` and at
    least ``sam_start``. The decision comes from the count alone, so every rank takes it
    alike."""
    step = group.get("sam_clock", 0) + 1
    return (group.get("sam_ascent", "gradient") == "gradient" and group["sam_rho"] > 0
            and step % group.get("sam_interval", 1) == 0 and step >= group.get("sam_start", 1))
