"""Command-line options of NeuroOptima and the baseline optimizers, and building them.

Every NeuroOptima flag defaults to None, meaning "the optimizer's own default", so a flag the
user does not give never overrides a value (for example one from a DeepSpeed config).
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any, Iterable

import torch
from torch import Tensor

from neurooptima import NeuroOptima, UPDATE_RULES
from neurooptima.validation import DEFAULT_LR as RULE_LR, SAM_ASCENTS

__all__ = ["OPTIMIZERS", "DEFAULT_LR", "add_optimizer_args", "neurooptima_kwargs",
           "baseline_class", "baseline_kwargs", "build_optimizer"]

OPTIMIZERS = ("neurooptima", "sgd", "adam", "adamw", "lion", "adan")

# The sharpness-aware form and its schedule (attributes of the parsed arguments).
SAM_FORM_FLAGS = ("sam_ascent", "sam_warmup", "sam_interval", "sam_start")

# NeuroOptima's own defaults, named in the help texts.
_DEFAULTS = {name: p.default for name, p in inspect.signature(NeuroOptima).parameters.items()}

# Learning rates used when --lr is not given: NeuroOptima's own (None: its update rule's
# default), and each baseline's usual scale (Lion wants a smaller step than Adam).
DEFAULT_LR = {"neurooptima": _DEFAULTS["lr"], "sgd": 5e-2, "adam": 1e-3, "adamw": 1e-3,
              "lion": 1e-4, "adan": 1e-2}


def _on_off(value: str) -> bool | None:
    choices = {"auto": None, "on": True, "off": False}
    if value not in choices:
        raise argparse.ArgumentTypeError(f"expected one of {sorted(choices)}, got {value!r}")
    return choices[value]


def _count(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return number
    return parse


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer (NeuroOptima options; unset = its default)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="neurooptima",
                   help="NeuroOptima or a baseline for comparison (default neurooptima)")
    g.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default per optimizer: {DEFAULT_LR}; None: "
                        f"NeuroOptima's rule's own, {RULE_LR})")
    g.add_argument("--weight-decay", type=float, default=None,
                   help=f"weight decay (>= 0; NeuroOptima default {_DEFAULTS['weight_decay']})")
    g.add_argument("--sam-rho", type=float, default=None,
                   help="radius of the sharpness-aware form; 0 disables it (default: the "
                        "form's own, 0.5 for momentum ascent, 0.05 for exact SAM)")
    g.add_argument("--sam-ascent", choices=SAM_ASCENTS, default=None,
                   help="momentum: momentum ascent (MSAM), one gradient a step; gradient: "
                        "exact SAM, two gradients on the steps it runs (default momentum, but "
                        "gradient when --sam-rho is given alone)")
    g.add_argument("--sam-warmup", type=_count(0), default=None, metavar="N",
                   help="momentum ascent: no ascent during the first N steps (default 0)")
    g.add_argument("--sam-interval", type=_count(1), default=None, metavar="K",
                   help="gradient ascent: SAM on every K-th step only, plain steps between "
                        "(default 1)")
    g.add_argument("--sam-start", type=_count(1), default=None, metavar="T",
                   help="gradient ascent: SAM from step T on (default 1)")
    g.add_argument("--sam-adaptive", action="store_true",
                   help="ASAM instead of SAM (|w|-scaled ascent, either form)")
    g.add_argument("--sam-eta", type=float, default=None, help="ASAM's eta (default 0.01)")
    g.add_argument("--lookahead-k", type=int, default=None,
                   help=f"Lookahead sync period, e.g. 5; 0 disables it (default "
                        f"{_DEFAULTS['lookahead_k']})")
    g.add_argument("--lookahead-alpha", type=float, default=None,
                   help="Lookahead slow-weight step in (0, 1] (default 0.5)")
    g.add_argument("--betas", type=float, nargs="+", default=None,
                   help="betas: 2 values, or 3 for adan in code order (default: the rule's)")
    g.add_argument("--eps", type=float, default=None, help="Adan/Adam denominator term")
    g.add_argument("--update", choices=UPDATE_RULES, default=None,
                   help="NeuroOptima update rule (default adan)")
    g.add_argument("--beta-diff", type=float, default=None,
                   help="Adan gradient-difference decay used with 2 betas (default 0.92)")
    g.add_argument("--no-prox", action="store_true",
                   help="Adan weight decay as multiplication instead of proximal")
    g.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the update gradient to this global L2 norm")
    g.add_argument("--foreach", type=_on_off, default=None, metavar="{auto,on,off}",
                   help="multi-tensor kernels (default auto)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")


def learning_rate(args: argparse.Namespace) -> float | None:
    return args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]


def neurooptima_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The NeuroOptima keyword arguments the flags set (unset flags are left out)."""
    kwargs: dict[str, Any] = {}
    if learning_rate(args) is not None:
        kwargs["lr"] = learning_rate(args)
    for flag in ("weight_decay", "sam_rho", "sam_eta", "lookahead_k", "lookahead_alpha", "eps",
                 "update", "beta_diff", "max_grad_norm", "foreach") + SAM_FORM_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            kwargs[flag] = value
    if args.betas is not None:
        kwargs["betas"] = tuple(args.betas)
    if args.no_prox:
        kwargs["no_prox"] = True
    if args.sam_adaptive:
        kwargs["sam_adaptive"] = True
    return kwargs


_NEUROOPTIMA_ONLY = ("sam_rho", "sam_eta", "lookahead_k", "lookahead_alpha", "update",
                     "beta_diff", "max_grad_norm") + SAM_FORM_FLAGS


def baseline_class(name: str) -> type[torch.optim.Optimizer]:
    if name in ("sgd", "adam", "adamw"):
        return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    try:
        import pytorch_optimizer
    except ImportError as exc:
        raise RuntimeError(f"the {name} baseline comes from pytorch-optimizer: "
                           f"pip install 'pytorch-optimizer>=3.0'") from exc
    return {"lion": pytorch_optimizer.Lion, "adan": pytorch_optimizer.Adan}[name]


def baseline_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of the baseline ``args.optimizer``; NeuroOptima-only flags are an
    error rather than silently ignored."""
    given = [f"--{f.replace('_', '-')}" for f in _NEUROOPTIMA_ONLY if getattr(args, f) is not None]
    given += [flag for flag, on in (("--no-prox", args.no_prox),
                                    ("--sam-adaptive", args.sam_adaptive)) if on]
    if given:
        raise ValueError(f"{', '.join(given)} only apply to --optimizer neurooptima, "
                         f"not {args.optimizer}")
    kwargs: dict[str, Any] = {"lr": learning_rate(args)}
    if args.weight_decay is not None:
        kwargs["weight_decay"] = args.weight_decay
    if args.optimizer == "sgd":
        kwargs["momentum"] = args.momentum
        return kwargs
    if args.betas is not None:
        expected = 3 if args.optimizer == "adan" else 2
        if len(args.betas) != expected:
            raise ValueError(f"--betas for {args.optimizer} takes {expected} values, got "
                             f"{len(args.betas)}")
        kwargs["betas"] = tuple(args.betas)
    if args.eps is not None and args.optimizer != "lion":
        kwargs["eps"] = args.eps
    if args.foreach is not None and args.optimizer in ("adam", "adamw"):
        kwargs["foreach"] = args.foreach
    return kwargs


def build_optimizer(args: argparse.Namespace, params: Iterable[Tensor]
                    ) -> torch.optim.Optimizer:
    """A single-process optimizer over ``params`` (NeuroOptima or the chosen baseline)."""
    if args.optimizer == "neurooptima":
        return NeuroOptima(params, **neurooptima_kwargs(args))
    return baseline_class(args.optimizer)(params, **baseline_kwargs(args))
