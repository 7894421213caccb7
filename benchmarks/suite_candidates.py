"""The suite's candidates: the baselines (AdamW, SGD Nesterov, Adan, Lion, SAM(AdamW),
MSAM(AdamW)) and NeuroOptima's configurations, each with how to build it, where its
learning-rate (and rho) search starts, and the steps it may take on a budget of gradient
evaluations (``run_plan``: a form that takes a second gradient on some steps gets fewer).

``CANDIDATES`` holds them by name, in the order the runner works (``PRIORITY``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from msam_adamw import MSAMAdamW
from neurooptima import NeuroOptima
from training_step import warmup_steps

WEIGHT_DECAY = 0.01            # decoupled decay of every adaptive baseline
SGD_WEIGHT_DECAY = 5e-4        # SGD's usual (coupled) decay
WARMUP_FRACTION = 0.05
LOOKAHEAD_K = 5
SAM_INTERVAL = 4               # "SAM every k-th step"
LATE_SAM_FROM = 0.5            # late-phase SAM: from this fraction of the steps on
# What every NeuroOptima configuration starts from (the Adan rule alone: no SAM, no Lookahead),
# written out rather than read off the constructor, so that a record keeps meaning what it
# measured when the constructor's defaults change.
NEURO_BASE = dict(update="adan", weight_decay=WEIGHT_DECAY, sam_rho=0.0, sam_ascent="gradient",
                  sam_warmup=0, sam_interval=1, sam_start=1, lookahead_k=0)


@dataclass(frozen=True)
class RunPlan:
    """A candidate's steps on a budget of gradient evaluations."""
    steps: int
    warmup: int
    sam_start: int | None          # first step (1-based) that may take SAM's second gradient
    grad_evals: int                # what the steps cost, <= the budget


@dataclass(frozen=True)
class Candidate:
    name: str
    build: Callable[[Iterable[torch.Tensor], float, float | None, RunPlan],
                    torch.optim.Optimizer]
    lr_start: float                # centre of the first three ladder points
    two_pass: bool = False         # driven by first_step() / second_step() (pytorch SAM)
    sam_every: int = 0             # a second gradient on every k-th step (0: never)
    sam_from: float = 0.0          # ... from this fraction of the candidate's steps on
    rho_start: float | None = None  # None: no rho; else the centre of its rho search
    moves_weights: bool = False    # holds an ascent point: evaluated between eval() and train()
    needs: tuple[str, ...] = ()    # NeuroOptima arguments it passes
    settings: dict = field(default_factory=dict)
    only_on: tuple[str, ...] = ()  # the workloads it runs on (empty: all)
    with_lookahead: bool = False   # a sharpness-aware form + Lookahead: runs where Lookahead pays

    @property
    def tune_rho(self) -> bool:
        return self.rho_start is not None

    def missing(self) -> list[str]:
        """The arguments (or methods) this candidate needs that the installed NeuroOptima
        lacks; empty when it can run."""
        params = inspect.signature(NeuroOptima.__init__).parameters
        out = [a for a in self.needs if a not in params]
        if self.needs and self.moves_weights:
            out += [f"{m}()" for m in ("eval", "train") if not callable(getattr(NeuroOptima, m,
                                                                               None))]
        return out

    def plan(self, budget: int) -> RunPlan:
        return run_plan(budget, self.sam_every, self.sam_from)


def _cost(steps: int, every: int, start: int) -> int:
    """Gradient evaluations of ``steps`` steps with a second one on every ``every``-th step
    counted from 1 that is >= ``start``."""
    if not every:
        return steps
    return steps + steps // every - (start - 1) // every


def run_plan(budget: int, sam_every: int = 0, sam_from: float = 0.0) -> RunPlan:
    """The most steps whose gradient evaluations fit ``budget``, with their schedule."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1 gradient evaluation, got {budget}")
    steps = budget
    while True:
        start = math.floor(sam_from * steps) + 1
        cost = _cost(steps, sam_every, start)
        if cost <= budget or steps == 1:
            break
        steps -= 1
    return RunPlan(steps, warmup_steps(steps, WARMUP_FRACTION),
                   start if sam_every else None, cost)


STATE_BF16 = "NeuroOptima bf16 state"
# The Adan rule alone (the baseline of every sharpness-aware question) and with Lookahead.
PLAIN, LOOKAHEAD = "NeuroOptima Adan", "NeuroOptima Lookahead"


def _pt(name: str):
    import pytorch_optimizer
    return getattr(pytorch_optimizer, name)


def _neuro(name: str, fixed: dict, rho_start: float | None = None, ascent: bool = False,
           sam_every: int = 0, sam_from: float = 0.0, **extra) -> Candidate:
    """A NeuroOptima configuration: ``fixed`` settings on top of ``NEURO_BASE``;
    with ``rho_start`` its sam_rho is tuned, with ``ascent`` it is momentum ascent (warm-up of
    the ascent = the warm-up of the learning rate), with ``sam_from`` it starts SAM late."""
    needs = tuple(k for k in fixed if k not in ("lookahead_k",))
    if ascent:
        needs += ("sam_ascent", "sam_warmup")
    if sam_from:
        needs += ("sam_start",)

    def build(params, lr, rho, plan: RunPlan):
        kw = {**NEURO_BASE, **fixed}
        if rho is not None:
            kw["sam_rho"] = rho
        if ascent:
            kw.update(sam_ascent="momentum", sam_warmup=plan.warmup)
        if sam_from:
            kw["sam_start"] = plan.sam_start
        return NeuroOptima(params, lr=lr, **kw)

    settings = dict(fixed)
    if rho_start is not None:
        settings["sam_rho"] = "tuned"
    if ascent:
        settings.update(sam_ascent="momentum", sam_warmup="the LR warm-up steps")
    if sam_from:
        settings["sam_start"] = f"step {sam_from:g} x its steps + 1"
    settings = {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
                for k, v in settings.items()}
    return Candidate(name, build, 3.16e-3, sam_every=sam_every, sam_from=sam_from,
                     rho_start=rho_start, moves_weights=ascent, needs=needs,
                     settings=settings or dict(note="the Adan rule alone, LR tuned"), **extra)


def _neuro_candidates() -> list[Candidate]:
    la = dict(lookahead_k=LOOKAHEAD_K)
    every = dict(sam_interval=SAM_INTERVAL)
    out = [_neuro(PLAIN, {}), _neuro(LOOKAHEAD, la)]
    for suffix, extra in (("", {}), (" + Lookahead", la)):
        gate = dict(with_lookahead=bool(extra))
        out += [_neuro("NeuroOptima momentum ascent" + suffix, dict(extra), 1.0, ascent=True,
                       **gate),
                _neuro(f"NeuroOptima SAM every {SAM_INTERVAL}th" + suffix, {**every, **extra},
                       0.05, sam_every=SAM_INTERVAL, **gate),
                _neuro("NeuroOptima late SAM" + suffix, dict(extra), 0.05, sam_every=1,
                       sam_from=LATE_SAM_FROM, **gate)]
    first = out[:2] + [c for c in out[2:] if "Lookahead" not in c.name]
    return first + [c for c in out[2:] if "Lookahead" in c.name]


# The NeuroOptima configurations compared and every setting each runs with ("tuned" and the
# per-run descriptions stand for values chosen per workload or per run).
def neuro_configs() -> dict[str, dict]:
    return {c.name: {**NEURO_BASE, **{k: v for k, v in c.settings.items() if k != "note"}}
            for c in _neuro_candidates()}


NEURO_CONFIGS = neuro_configs()


def constructor_defaults() -> dict[str, object]:
    """NeuroOptima's defaults for lr and the settings its configurations vary (None read as
    what it stands for: the rule's learning rate, the sharpness-aware form and its radius)."""
    params = inspect.signature(NeuroOptima.__init__).parameters
    keys = {"lr", "sam_rho", "lookahead_k", "weight_decay"}
    keys |= {k for s in NEURO_CONFIGS.values() for k in s}
    from neurooptima.validation import DEFAULT_LR, resolve_sam_form

    out = {k: params[k].default for k in sorted(keys) if k in params}
    if out.get("lr") is None:
        out["lr"] = DEFAULT_LR[params["update"].default]
    resolve_sam_form(out)  # sam_rho/sam_ascent None: the form and radius they stand for
    return out


def _candidates() -> dict[str, Candidate]:
    wd = dict(weight_decay=WEIGHT_DECAY)
    neuro = _neuro_candidates()
    cands = [
        Candidate("AdamW", lambda p, lr, rho, plan: torch.optim.AdamW(p, lr=lr, **wd),
                  1e-3, settings=dict(wd, source="torch")),
        neuro[0],
        Candidate("SGD Nesterov", lambda p, lr, rho, plan: torch.optim.SGD(
            p, lr=lr, momentum=0.9, nesterov=True, weight_decay=SGD_WEIGHT_DECAY), 0.1,
            settings=dict(momentum=0.9, nesterov=True, weight_decay=SGD_WEIGHT_DECAY,
                          source="torch")),
        Candidate("Adan", lambda p, lr, rho, plan: _pt("Adan")(p, lr=lr, **wd), 3.16e-3,
                  settings=dict(wd, source="pytorch_optimizer")),
        Candidate("Lion", lambda p, lr, rho, plan: _pt("Lion")(p, lr=lr, **wd), 3.16e-4,
                  settings=dict(wd, source="pytorch_optimizer")),
        Candidate("SAM(AdamW)", lambda p, lr, rho, plan: _pt("SAM")(
            p, torch.optim.AdamW, rho=rho, lr=lr, **wd), 1e-3, two_pass=True, sam_every=1,
            rho_start=0.05, settings=dict(wd, rho="tuned", source="pytorch_optimizer")),
        Candidate("MSAM(AdamW)", lambda p, lr, rho, plan: MSAMAdamW(p, lr=lr, rho=rho, **wd),
                  1e-3, rho_start=1.0, moves_weights=True,
                  settings=dict(wd, rho="tuned", source="benchmarks/msam_adamw.py")),
        *neuro[1:],
        # The Adan rule alone with bfloat16 state: the state-precision comparison, on the MLP and
        # the transformer (the workloads where a run is cheapest and where precision bites).
        _neuro(STATE_BF16, dict(state_dtype=torch.bfloat16),
               only_on=("digits-mlp", "shakespeare-char")),
    ]
    return {c.name: c for c in cands}


CANDIDATES = _candidates()
# Order of the work: the baselines and the Adan rule alone first.
PRIORITY = tuple(CANDIDATES)
