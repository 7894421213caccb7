"""The optimizers the convergence benchmark compares, each built the same way: ``build(params, lr)``.

Every entry names its learning-rate grid (three half-decade points around the value its authors
recommend), how many gradient evaluations one step costs (SAM: two) and whether the step is a
plain ``step()`` or SAM's two passes (``first_step`` after the first backward, ``second_step``
after the second).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from pytorch_optimizer import SAM, Adan, Lion, Lookahead

from neurooptima import NeuroOptima

# Shared settings: decoupled weight decay for every method that has one, SAM radius and
# Lookahead (k, alpha) as their papers' defaults, each rule with its official betas.
WEIGHT_DECAY = 0.01
SAM_RHO = 0.05
LOOKAHEAD_K = 5
LOOKAHEAD_ALPHA = 0.5
SGD_MOMENTUM = 0.9

# Three points half a decade apart, centred on each family's usual learning rate.
GRID_SGD = (0.03, 0.1, 0.3)
GRID_ADAM = (3e-4, 1e-3, 3e-3)
GRID_ADAN = (1e-3, 3e-3, 1e-2)
GRID_LION = (1e-4, 3e-4, 1e-3)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    family: str                      # "baseline" or "neurooptima"
    build: Callable[[Iterable[torch.Tensor], float], torch.optim.Optimizer]
    lr_grid: tuple[float, ...]
    sam: bool = False                # two gradient evaluations per step
    settings: dict = field(default_factory=dict)

    @property
    def grad_evals_per_step(self) -> int:
        return 2 if self.sam else 1


# Reduced-precision state: the rule's buffers stored in bfloat16 (math in float32). Measured on
# every rule's full configuration, and on the default rule without SAM too (with SAM, the
# perturbation is also kept in bfloat16, so the pair separates the two effects).
STATE_DTYPES = {"bfloat16": torch.bfloat16}
STATE_SUFFIX = {"bfloat16": "bf16 state"}
BF16_STATE_CONFIGS = (("adan", True, True), ("adan", False, True), ("lion", True, True),
                      ("lion_adan", True, True))


def _neuro(update: str, sam: bool, lookahead: bool, state_dtype: str | None = None):
    def build(params, lr):
        return NeuroOptima(params, lr=lr, weight_decay=WEIGHT_DECAY,
                           sam_rho=SAM_RHO if sam else 0.0,
                           lookahead_k=LOOKAHEAD_K if lookahead else 0,
                           lookahead_alpha=LOOKAHEAD_ALPHA, update=update,
                           state_dtype=STATE_DTYPES[state_dtype] if state_dtype else None)
    return build


def _neuro_spec(update: str, sam: bool, lookahead: bool,
                state_dtype: str | None = None) -> OptimizerSpec:
    settings = dict(update=update, weight_decay=WEIGHT_DECAY, sam_rho=SAM_RHO if sam else 0.0,
                    lookahead_k=LOOKAHEAD_K if lookahead else 0,
                    lookahead_alpha=LOOKAHEAD_ALPHA, betas="official")
    if state_dtype:
        settings["state_dtype"] = state_dtype
    grids = {"adan": GRID_ADAN, "lion": GRID_LION, "lion_adan": GRID_LION}
    return OptimizerSpec(neuro_name(update, sam, lookahead, state_dtype), "neurooptima",
                         _neuro(update, sam, lookahead, state_dtype), grids[update], sam=sam,
                         settings=settings)


def _specs() -> dict[str, OptimizerSpec]:
    specs = [
        OptimizerSpec("SGD+momentum", "baseline",
                      lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=SGD_MOMENTUM), GRID_SGD,
                      settings=dict(momentum=SGD_MOMENTUM)),
        OptimizerSpec("Adam", "baseline", lambda p, lr: torch.optim.Adam(p, lr=lr), GRID_ADAM),
        OptimizerSpec("AdamW", "baseline",
                      lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=WEIGHT_DECAY),
                      GRID_ADAM, settings=dict(weight_decay=WEIGHT_DECAY)),
        OptimizerSpec("Lion", "baseline",
                      lambda p, lr: Lion(p, lr=lr, weight_decay=WEIGHT_DECAY), GRID_LION,
                      settings=dict(weight_decay=WEIGHT_DECAY, source="pytorch_optimizer")),
        OptimizerSpec("Adan", "baseline",
                      lambda p, lr: Adan(p, lr=lr, weight_decay=WEIGHT_DECAY), GRID_ADAN,
                      settings=dict(weight_decay=WEIGHT_DECAY, source="pytorch_optimizer")),
        OptimizerSpec("SAM(SGD)", "baseline",
                      lambda p, lr: SAM(p, torch.optim.SGD, rho=SAM_RHO, lr=lr,
                                        momentum=SGD_MOMENTUM),
                      GRID_SGD, sam=True,
                      settings=dict(rho=SAM_RHO, momentum=SGD_MOMENTUM,
                                    source="pytorch_optimizer")),
        OptimizerSpec("SAM(AdamW)", "baseline",
                      lambda p, lr: SAM(p, torch.optim.AdamW, rho=SAM_RHO, lr=lr,
                                        weight_decay=WEIGHT_DECAY),
                      GRID_ADAM, sam=True,
                      settings=dict(rho=SAM_RHO, weight_decay=WEIGHT_DECAY,
                                    source="pytorch_optimizer")),
        OptimizerSpec("Lookahead(AdamW)", "baseline",
                      lambda p, lr: Lookahead(torch.optim.AdamW(p, lr=lr,
                                                                weight_decay=WEIGHT_DECAY),
                                              k=LOOKAHEAD_K, alpha=LOOKAHEAD_ALPHA),
                      GRID_ADAM,
                      settings=dict(k=LOOKAHEAD_K, alpha=LOOKAHEAD_ALPHA,
                                    weight_decay=WEIGHT_DECAY, source="pytorch_optimizer")),
    ]
    for update in ("adan", "lion", "lion_adan"):
        for sam, lookahead in ((True, True), (False, True), (True, False)):
            specs.append(_neuro_spec(update, sam, lookahead))
    for update, sam, lookahead in BF16_STATE_CONFIGS:
        specs.append(_neuro_spec(update, sam, lookahead, "bfloat16"))
    return {s.name: s for s in specs}


def neuro_name(update: str, sam: bool = True, lookahead: bool = True,
               state_dtype: str | None = None) -> str:
    """The zoo name of a NeuroOptima configuration (``state_dtype``: e.g. ``"bfloat16"``)."""
    if sam and lookahead:
        name = f"NeuroOptima[{update}]"
    elif not sam and lookahead:
        name = f"NeuroOptima[{update}] -SAM"
    elif sam and not lookahead:
        name = f"NeuroOptima[{update}] -Lookahead"
    else:
        raise ValueError("neuro_name: at least one of sam, lookahead must be True")
    if state_dtype is None:
        return name
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"neuro_name: state_dtype must be None or one of {sorted(STATE_DTYPES)}, "
                         f"got {state_dtype!r}")
    return f"{name} {STATE_SUFFIX[state_dtype]}"


OPTIMIZERS: dict[str, OptimizerSpec] = _specs()
