"""Hyperparameter checks: every bad value gets a ValueError naming the argument and its range."""

from __future__ import annotations

import math
from typing import Any

import torch

from .functional import DEFAULT_BETAS, UPDATE_RULES
from .momentum_ascent import EVALUATING, SCALE

# Each rule's learning rate when ``lr=None``: the suite's (benchmarks/results/REPORT.md) rate
# never far from any workload's best, found by the same robust choice for each rule (Adan 3e-2,
# that of the defaults' configuration, momentum ascent; Lion 1e-3, from the Lion baseline, also
# taken by Lion-Adan, whose sign step has the same size per element).
DEFAULT_LR: dict[str, float] = {"adan": 3e-2, "lion": 1e-3, "lion_adan": 1e-3}
# sam_rho=None: the form's own radius. Momentum ascent's is the suite's recommendation (its
# radius is a distance in weight space, larger than SAM's); exact SAM's is the published 0.05.
DEFAULT_SAM_RHO: dict[str, float] = {"momentum": 0.5, "gradient": 0.05}


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: Any) -> float:
    value = _number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def check_lr(value: Any) -> float | torch.Tensor:
    """A learning rate: a number >= 0, or a 1-element tensor (kept as given, on any device);
    ``check_group`` replaces None with the group's rule's ``DEFAULT_LR`` first.

    A tensor's value is read once here (its range is checked); the step reads it as data, so
    changing it in place (``group["lr"].fill_(x)``) needs no new check and, on the fused path,
    no host read and no recompilation.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if value.is_complex() or not value.is_floating_point():
            raise ValueError(f"lr must be a real floating tensor, got dtype {value.dtype}")
        check_non_negative("lr", float(value.detach().reshape(())))
        return value
    return check_non_negative("lr", value)


def check_beta(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):  # torch accepts 1-element tensor betas; stored as floats
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        value = float(value.detach().reshape(()))
    value = _number(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def resolve_betas(update: str, betas: Any, beta_diff: float) -> tuple[float, ...]:
    """The rule's betas in code order; ``None`` means the official defaults.

    For ``adan`` a 2-tuple is the Adam-style pair (first moment, second moment) and the
    gradient-difference decay comes from ``beta_diff``; a 3-tuple is sail-sg code order.
    """
    if betas is None:
        return DEFAULT_BETAS[update]
    if not isinstance(betas, (tuple, list)):
        raise ValueError(f"betas must be a tuple of floats or None, got {betas!r}")
    allowed = (2, 3) if update == "adan" else (2,)
    if len(betas) not in allowed:
        lengths = " or ".join(map(str, allowed))
        raise ValueError(f"betas for update={update!r} must have length {lengths}, "
                         f"got {len(betas)}: {tuple(betas)!r}")
    betas = tuple(check_beta(f"betas[{i}]", b) for i, b in enumerate(betas))
    if update == "adan" and len(betas) == 2:
        betas = (betas[0], check_beta("beta_diff", beta_diff), betas[1])
    return betas


SAM_ASCENTS = ("gradient", "momentum")
# The sharpness-aware schedule with its defaults (param groups saved before it existed lack it;
# a missing sam_ascent is resolve_sam_form's).
SAM_SCHEDULE_DEFAULTS = {"sam_warmup": 0, "sam_interval": 1, "sam_start": 1}


def _integer(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def resolve_sam_form(group: dict) -> None:
    """Check ``sam_ascent`` and fill in it and ``sam_rho`` where None (or, in a group saved
    before ``sam_ascent`` existed, missing). Neither given: momentum ascent at its radius (the
    defaults). A radius given without a form is SAM's, as published (exact, two gradients a
    step), so code written for SAM keeps meaning SAM; 0 disables either."""
    ascent, rho = group.get("sam_ascent"), group["sam_rho"]
    if ascent not in (None, *SAM_ASCENTS):
        raise ValueError(f"sam_ascent must be 'gradient' (two gradients a step), 'momentum' "
                         f"(one gradient a step) or None (momentum, unless sam_rho is given "
                         f"alone: then gradient), got {ascent!r}")
    if ascent is None:
        ascent = "momentum" if rho is None else "gradient"
    if rho is None:
        rho = DEFAULT_SAM_RHO[ascent]
    group["sam_ascent"], group["sam_rho"] = ascent, rho


def check_sam_schedule(group: dict) -> None:
    """``sam_warmup``, ``sam_interval`` and ``sam_start``, defaults filled in."""
    for name, default in SAM_SCHEDULE_DEFAULTS.items():
        group.setdefault(name, default)
    group.setdefault("sam_clock", 0)  # step() calls of the group: the schedule's clock
    # Momentum ascent's state (see momentum_ascent): the scale the weights hold, eval mode.
    group.setdefault(SCALE, 0.0)
    group.setdefault(EVALUATING, False)
    _integer("sam_warmup", group["sam_warmup"], 0)
    _integer("sam_interval", group["sam_interval"], 1)
    _integer("sam_start", group["sam_start"], 1)


def check_group(group: dict) -> None:
    """Validate one param group in place, normalising ``betas`` to the rule's code order."""
    update = group["update"]
    if update not in UPDATE_RULES:
        raise ValueError(f"update must be one of {', '.join(map(repr, UPDATE_RULES))}, "
                         f"got {update!r}")
    if group["lr"] is None:
        group["lr"] = DEFAULT_LR[update]
    group["lr"] = check_lr(group["lr"])
    resolve_sam_form(group)
    for name in ("eps", "weight_decay", "sam_rho", "sam_eta"):
        group[name] = check_non_negative(name, group[name])
    check_beta("beta_diff", group["beta_diff"])
    group["betas"] = resolve_betas(update, group["betas"], group["beta_diff"])
    k = group["lookahead_k"]
    if k is None:
        k = 0
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"lookahead_k must be an integer >= 0 or None (0/None disables "
                         f"Lookahead), got {k!r}")
    group["lookahead_k"] = k
    alpha = _number("lookahead_alpha", group["lookahead_alpha"])
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"lookahead_alpha must be in (0, 1], got {alpha!r}")
    max_norm = group["max_grad_norm"]
    if max_norm is not None:
        max_norm = _number("max_grad_norm", max_norm)
        if max_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_norm!r}")
        group["max_grad_norm"] = max_norm
    check_sam_schedule(group)
    for name in ("no_prox", "sam_adaptive", "maximize"):
        if not isinstance(group[name], bool):
            raise ValueError(f"{name} must be True or False, got {group[name]!r}")
    if group["foreach"] not in (None, True, False):
        raise ValueError(f"foreach must be True, False or None, got {group['foreach']!r}")
    # .get: param groups saved before these options existed lack them.
    fused = group.get("fused")
    if fused not in (None, True, False):
        raise ValueError(f"fused must be True, False or None, got {fused!r}")
    if fused and group["foreach"]:
        raise ValueError("fused=True and foreach=True cannot be combined; pick one")
    state_dtype = group.get("state_dtype")
    if state_dtype is not None and not (isinstance(state_dtype, torch.dtype)
                                        and state_dtype.is_floating_point
                                        and not state_dtype.is_complex):
        raise ValueError(f"state_dtype must be None or a real floating torch.dtype (e.g. "
                         f"torch.bfloat16), got {state_dtype!r}")


def prepare_group(group: dict, owner: str) -> None:
    """Check a newly added param group for ``owner`` (the optimizer's class name) in place."""
    check_group(group)
    group.setdefault("skipped_steps", 0)
    for p in group["params"]:
        if p.is_complex():
            raise ValueError(f"{owner} does not support complex parameters; optimize "
                             "torch.view_as_real(p) instead")
