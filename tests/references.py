"""Test-side references, written from the published equations (DESIGN.md section 2).

Nothing here imports neurooptima: each reference is plain per-tensor torch code that follows the
equations literally (new tensors instead of in-place kernels), so a mistake in the library's
kernels cannot be repeated here by sharing code.

``ReferenceOptimizer`` composes the pieces in the order the design states: SAM perturbation at
``w + e`` from the first-pass gradient, second gradient, back to ``w``, optional maximize and
clipping, the update rule, then Lookahead's sync after every k-th update of a parameter.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

ADAN_DEFAULTS = (0.98, 0.92, 0.99)
LION_DEFAULTS = (0.9, 0.99)
LION_ADAN_DEFAULTS = (0.98, 0.92)
SAM_NORM_EPS = 1e-12  # the SAM reference implementations' guard against a zero gradient
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by norm + 1e-6


# ------------------------------------------------------------------------------ update rules


def adan(w: Tensor, g: Tensor, st: dict, k: int, *, lr: float, betas: tuple, eps: float,
         wd: float, no_prox: bool) -> Tensor:
    """Adan (Xie et al.), sail-sg code order (b1, b2, b3); returns the new weight."""
    b1, b2, b3 = betas
    if k == 1:
        st.update(m=torch.zeros_like(w), v=torch.zeros_like(w), n=torch.zeros_like(w),
                  g_prev=g.clone())
    d = g - st["g_prev"]
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["v"] = b2 * st["v"] + (1 - b2) * d
    st["n"] = b3 * st["n"] + (1 - b3) * (g + b2 * d) ** 2
    denom = st["n"].sqrt() / math.sqrt(1 - b3**k) + eps
    step = (st["m"] / (1 - b1**k) + b2 * st["v"] / (1 - b2**k)) / denom
    if no_prox:
        w = w * (1 - lr * wd) - lr * step
    else:
        w = (w - lr * step) / (1 + lr * wd)
    st["g_prev"] = g.clone()
    return w


def lion(w: Tensor, g: Tensor, st: dict, k: int, *, lr: float, betas: tuple, wd: float,
         **_: object) -> Tensor:
    """Lion (Chen et al.), google/automl: decoupled decay, sign of the interpolation."""
    b1, b2 = betas
    if k == 1:
        st["m"] = torch.zeros_like(w)
    w = w * (1 - lr * wd)
    w = w - lr * torch.sign(b1 * st["m"] + (1 - b1) * g)
    st["m"] = b2 * st["m"] + (1 - b2) * g
    return w


def lion_adan(w: Tensor, g: Tensor, st: dict, k: int, *, lr: float, betas: tuple, wd: float,
              **_: object) -> Tensor:
    """Lion's sign step on Adan's bias-corrected Nesterov momentum."""
    b1, b2 = betas
    if k == 1:
        st.update(m=torch.zeros_like(w), v=torch.zeros_like(w), g_prev=g.clone())
    d = g - st["g_prev"]
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["v"] = b2 * st["v"] + (1 - b2) * d
    w = w * (1 - lr * wd)
    w = w - lr * torch.sign(st["m"] / (1 - b1**k) + b2 * st["v"] / (1 - b2**k))
    st["g_prev"] = g.clone()
    return w


RULES: dict[str, Callable[..., Tensor]] = {"adan": adan, "lion": lion, "lion_adan": lion_adan}
DEFAULT_BETAS = {"adan": ADAN_DEFAULTS, "lion": LION_DEFAULTS, "lion_adan": LION_ADAN_DEFAULTS}


def code_order_betas(update: str, betas: tuple | None, beta_diff: float = 0.92) -> tuple:
    """The README's reading of ``betas``: an Adan 2-tuple is (first, second) moment."""
    if betas is None:
        return DEFAULT_BETAS[update]
    if update == "adan" and len(betas) == 2:
        return (betas[0], beta_diff, betas[1])
    return tuple(betas)


# ------------------------------------------------------------------------------ SAM, Lookahead


def global_norm(tensors: list[Tensor]) -> float:
    """L2 norm over all tensors, accumulated in float64."""
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def sam_perturbations(weights: list[Tensor], grads: list[Tensor], rhos: list[float], *,
                      adaptive: list[bool] | bool = False, etas: list[float] | float = 0.01
                      ) -> list[Tensor] | None:
    """SAM's e = rho g / ||g||, or ASAM's e = rho T^2 g / ||T g|| with T = |w| + eta.

    The norm runs over every tensor; ``None`` when a gradient is not finite (no perturbation).
    Per-tensor ``rhos`` / ``adaptive`` / ``etas`` carry each tensor's param-group setting.
    """
    n = len(weights)
    adaptive = adaptive if isinstance(adaptive, list) else [adaptive] * n
    etas = etas if isinstance(etas, list) else [etas] * n
    scaled = [(w.abs() + eta) * g if a else g
              for w, g, a, eta in zip(weights, grads, adaptive, etas)]
    norm = global_norm(scaled)
    if not math.isfinite(norm):
        return None
    out = []
    for w, g, rho, a, eta in zip(weights, grads, rhos, adaptive, etas):
        direction = (w.abs() + eta) ** 2 * g if a else g
        out.append(direction * (rho / (norm + SAM_NORM_EPS)))
    return out


def lookahead_sync(fast: Tensor, slow: Tensor, alpha: float) -> Tensor:
    """slow += alpha (fast - slow); the fast weights become the new slow weights."""
    return slow + alpha * (fast - slow)


# ------------------------------------------------------------------------------ composition


class ReferenceOptimizer:
    """The whole NeuroOptima step, composed from the references above.

    ``groups`` are dicts with ``params`` (leaf tensors) and any of NeuroOptima's options;
    missing ones take NeuroOptima's defaults. ``closure`` zeroes the gradients of these params,
    computes the loss and calls backward.
    """

    DEFAULTS = dict(lr=None, weight_decay=0.01, sam_rho=None, lookahead_k=0,
                    lookahead_alpha=0.5, betas=None, eps=1e-8, update="adan", beta_diff=0.92,
                    no_prox=False, sam_adaptive=False, sam_eta=0.01, max_grad_norm=None,
                    maximize=False)

    def __init__(self, groups: list[dict], **defaults: object) -> None:
        self.groups = []
        for group in groups:
            full = {**self.DEFAULTS, **defaults, **group}
            full["betas"] = code_order_betas(full["update"], full["betas"], full["beta_diff"])
            if full["lr"] is None:  # each rule's own rate, as NeuroOptima documents it
                full["lr"] = {"adan": 3e-2, "lion": 1e-3, "lion_adan": 1e-3}[full["update"]]
            self._resolve_sam(full)
            full["lookahead_k"] = full["lookahead_k"] or 0
            self.groups.append(full)
        self.state: dict[int, dict] = {}
        for group in self.groups:
            for p in group["params"]:
                st = self.state[id(p)] = {"k": 0, "rule": {}}
                if group["lookahead_k"]:
                    st["slow"] = p.detach().clone()
        self.skipped = 0

    def _resolve_sam(self, group: dict) -> None:
        """As NeuroOptima documents sam_rho=None: the form's radius, 0.05 for exact SAM; with
        no form given either, momentum ascent at 0.5, which only the subclass below runs."""
        if "sam_ascent" not in self.DEFAULTS:
            if group["sam_rho"] is None:
                raise ValueError("ReferenceOptimizer runs exact SAM only: give sam_rho")
            return
        if group["sam_ascent"] is None:
            group["sam_ascent"] = "momentum" if group["sam_rho"] is None else "gradient"
        if group["sam_rho"] is None:
            group["sam_rho"] = {"momentum": 0.5, "gradient": 0.05}[group["sam_ascent"]]

    def _with_grads(self) -> list[tuple[dict, Tensor]]:
        return [(g, p) for g in self.groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> None:
        sam = any(g["sam_rho"] > 0 for g in self.groups)
        with torch.enable_grad():
            closure()
        if sam:
            pairs = self._with_grads()
            grads = [-p.grad if g["maximize"] else p.grad for g, p in pairs]
            e = sam_perturbations([p for _, p in pairs], grads,
                                  [g["sam_rho"] for g, _ in pairs],
                                  adaptive=[g["sam_adaptive"] for g, _ in pairs],
                                  etas=[g["sam_eta"] for g, _ in pairs])
            saved = [p.clone() for _, p in pairs]
            if e is not None:
                for (_, p), ei in zip(pairs, e):
                    p.copy_(p + ei)
            with torch.enable_grad():
                closure()
            for (_, p), w in zip(pairs, saved):
                p.copy_(w)
        self.apply_update()

    @torch.no_grad()
    def apply_update(self) -> None:
        """The update from the current gradients (after SAM's second pass)."""
        pairs = self._with_grads()
        grads = [-p.grad if g["maximize"] else p.grad.clone() for g, p in pairs]
        norm = global_norm(grads)
        if not math.isfinite(norm):
            self.skipped += 1
            return
        for i, (group, p) in enumerate(pairs):
            max_norm = group["max_grad_norm"]
            if max_norm is not None and max_norm / (norm + CLIP_EPS) < 1:
                grads[i] = grads[i] * (max_norm / (norm + CLIP_EPS))
        for (group, p), g in zip(pairs, grads):
            st = self.state[id(p)]
            st["k"] += 1
            w = RULES[group["update"]](p.detach(), g, st["rule"], st["k"], lr=group["lr"],
                                       betas=group["betas"], eps=group["eps"],
                                       wd=group["weight_decay"], no_prox=group["no_prox"])
            k = group["lookahead_k"]
            if k and st["k"] % k == 0:
                st["slow"] = lookahead_sync(w, st["slow"], group["lookahead_alpha"])
                w = st["slow"].clone()
            p.copy_(w)


# ------------------------------------------------------------------------------ one-gradient
# and scheduled sharpness-awareness


class ScheduledReference(ReferenceOptimizer):
    """``ReferenceOptimizer`` with the sharpness-aware schedule and momentum ascent.

    Gradient ascent (two passes) runs on step t (1-based) when ``sam_rho > 0``, t is a multiple
    of ``sam_interval`` and t >= ``sam_start``; other steps are plain. Momentum ascent (MSAM,
    Becker et al., arXiv 2401.12033), literally: the model holds w~; a step takes the gradient
    there, goes back to w = w~ + e, applies the update, then e' = s' m' (|w|-scaled form:
    s' T^2 m', T = |w'| + eta) with s' = rho / (||m'|| + 1e-12) (||T m'||), 0 while
    t <= ``sam_warmup``; w~' = w' - e'. The norm covers every parameter with a first moment.
    """

    DEFAULTS = dict(ReferenceOptimizer.DEFAULTS, sam_ascent=None, sam_warmup=0,
                    sam_interval=1, sam_start=1)

    def __init__(self, groups: list[dict], **defaults: object) -> None:
        super().__init__(groups, **defaults)
        self.t = 0
        self.offsets: dict[int, Tensor] = {}  # e of each displaced parameter
        self.closure_calls = 0

    def _due(self, group: dict) -> bool:
        return (group["sam_ascent"] == "gradient" and group["sam_rho"] > 0
                and self.t % group["sam_interval"] == 0 and self.t >= group["sam_start"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> None:
        self.t += 1

        def counted() -> Tensor:
            self.closure_calls += 1
            return closure()

        saved_rhos = [g["sam_rho"] for g in self.groups]
        for g in self.groups:  # the parent runs two passes when any group has sam_rho > 0
            g["sam_rho"] = g["sam_rho"] if self._due(g) else 0.0
        if any(g["sam_rho"] > 0 for g in self.groups):
            super().step(counted)
            for g, rho in zip(self.groups, saved_rhos):
                g["sam_rho"] = rho
            return
        for g, rho in zip(self.groups, saved_rhos):
            g["sam_rho"] = rho
        with torch.enable_grad():
            counted()
        pairs = self._with_grads()
        grads = [p.grad for _, p in pairs]
        if not math.isfinite(global_norm(grads)):
            self.skipped += 1
            return
        everyone = [p for g in self.groups for p in g["params"]]
        for p in everyone:  # back to w
            if id(p) in self.offsets:
                p.copy_(p + self.offsets[id(p)])
        self.apply_update()
        self._ascend()

    def _ascend(self) -> None:
        with_m = [(g, p) for g in self.groups for p in g["params"]
                  if "m" in self.state[id(p)]["rule"]]
        terms = []
        for g, p in with_m:
            m = self.state[id(p)]["rule"]["m"]
            momentum = g["sam_ascent"] == "momentum" and g["sam_rho"] > 0
            terms.append((p.abs() + g["sam_eta"]) * m if momentum and g["sam_adaptive"] else m)
        norm = global_norm(terms)
        self.offsets = {}
        for g, p in with_m:
            if not (g["sam_ascent"] == "momentum" and g["sam_rho"] > 0):
                continue
            s = 0.0 if self.t <= g["sam_warmup"] else g["sam_rho"] / (norm + SAM_NORM_EPS)
            m = self.state[id(p)]["rule"]["m"]
            e = s * (p.abs() + g["sam_eta"]) ** 2 * m if g["sam_adaptive"] else s * m
            self.offsets[id(p)] = e
            p.copy_(p - e)

    def weights(self) -> list[Tensor]:
        """The weights w (the model holds w~ between momentum-ascent steps)."""
        return [p + self.offsets[id(p)] if id(p) in self.offsets else p.clone()
                for g in self.groups for p in g["params"]]
