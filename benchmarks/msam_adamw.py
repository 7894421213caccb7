"""MSAM on AdamW (Becker et al., "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead", arXiv 2401.12033): the external baseline of NeuroOptima's momentum
ascent, written from the paper's equations.

Between steps the model holds the ascent point w~ = w - s m, m AdamW's first moment and
s = rho / ||m|| (one norm over all parameters). A step takes the gradient g at w~, returns to
w = w~ + s m, makes AdamW's step from w with g (first and second moment, bias correction,
then the decoupled decay w *= 1 - lr wd, the order the authors' code uses), and moves to the
new ascent point with the new m. One gradient per step. ``eval()`` puts the model at w (where
it is evaluated), ``train()`` back at w~.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch


class MSAMAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, rho: float = 1.0) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      rho=rho))
        self.scale = 0.0          # s of the ascent point the model holds now
        self.at_ascent = True     # False between eval() and train()

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if "exp_avg" in self.state[p]]

    @torch.no_grad()
    def _shift(self, sign: float) -> None:
        if self.scale:
            for p in self._params():
                p.add_(self.state[p]["exp_avg"], alpha=sign * self.scale)

    def eval(self) -> None:
        """Model to w (evaluation point)."""
        if self.at_ascent:
            self._shift(+1.0)
            self.at_ascent = False

    def train(self) -> None:
        """Model back to the ascent point w~."""
        if not self.at_ascent:
            self._shift(-1.0)
            self.at_ascent = True

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        if not self.at_ascent:
            raise RuntimeError("MSAMAdamW.step() after eval(): call train() first")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._shift(+1.0)                       # w = w~ + s m (m of the previous step)
        rho = None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            rho = group["rho"] if rho is None else rho
            if group["rho"] != rho:
                raise ValueError("MSAMAdamW: every param group must have the same rho "
                                 "(one ascent norm over all parameters)")
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))
                p.mul_(1 - group["lr"] * group["weight_decay"])
        params = self._params()
        norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(self.state[p]["exp_avg"]) for p in params])) \
            if params else torch.zeros(())
        self.scale = float((rho or 0.0) / (norm + 1e-12))
        self._shift(-1.0)                       # w~ = w - s m
        return loss
