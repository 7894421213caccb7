"""What changes when the rule's buffers are stored narrower than the parameters.

``state_dtype=torch.bfloat16`` stores every rule buffer in bfloat16 (the math runs in float32,
see ``rules.run_rule``). Three consequences live here:

* SAM keeps its perturbation ``e`` in the state dtype (``sam.perturbation``) instead of a full
  copy of the weights: the second pass runs at ``w + e_q`` with ``e_q`` = ``e`` rounded to the
  state dtype, and the restore subtracts exactly that ``e_q``. ``(w + e_q) - e_q`` is ``w`` up
  to one rounding of the sum (at most half a unit in the last place of ``w + e_q``), not
  bitwise; a bitwise restore needs the bits that rounding dropped, i.e. a full copy, which is
  what SAM keeps when the state is full precision.
* torch's ``load_state_dict`` casts floating state to the parameter's dtype; the post-hook
  ``restore_state_dtypes`` casts it back, so a resumed optimizer keeps its lean state.
* Upcast copies for the eager kernels are temporaries; ``chunks`` bounds their size.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor

from .functional import RULE_BUFFERS, state_keys
from .sam import NORM_EPS, perturbation

__all__ = ["SAM_PERTURBATION", "stores_perturbation", "perturb_stored_", "restore_state_dtypes",
           "chunks"]

SAM_PERTURBATION = "sam.perturbation"
_BUFFER_KEYS = {key for rule in RULE_BUFFERS for key in state_keys(rule)}
# Elements per eager kernel call when state is upcast (bounds the float32 temporaries).
CHUNK_ELEMENTS = 1 << 22


def stores_perturbation(param_dtype: torch.dtype, state_dtype: torch.dtype | None) -> bool:
    """SAM keeps ``e`` instead of a copy of ``w`` when the state is narrower than ``w``."""
    return (state_dtype is not None
            and torch.finfo(state_dtype).bits < torch.finfo(param_dtype).bits)


def perturb_stored_(state: dict[Tensor, dict[str, Any]], owners: list[Tensor],
                    params: list[Tensor], grads: list[Tensor], *, rho: float,
                    norm: float | Tensor, adaptive: bool, eta: float, dtype: torch.dtype,
                    finite: Tensor | None = None) -> None:
    """Move ``params`` to ``w + e_q`` (``e_q``: SAM's ``e`` rounded to ``dtype``) and keep ``e_q``.

    ``owners[i]`` keys the state of ``params[i]`` (a DTensor parameter of a local shard).
    ``norm`` and ``finite`` as in ``sam.perturb_``: where ``finite`` is false, ``e_q`` is 0.
    """
    scale = rho / (norm + NORM_EPS)
    for owner, p, g in zip(owners, params, grads):
        e = perturbation(p, g, scale=scale, adaptive=adaptive, eta=eta)
        if finite is not None:
            e = torch.where(finite, e, 0.0)
        e = e.to(dtype)
        p.add_(e)
        state[owner][SAM_PERTURBATION] = e


def restore_state_dtypes(optimizer: torch.optim.Optimizer) -> None:
    """Cast loaded rule buffers (and a pending SAM perturbation) back to ``state_dtype``."""
    for group in optimizer.param_groups:
        dtype = group.get("state_dtype")
        if dtype is None:
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if (key in _BUFFER_KEYS or key == SAM_PERTURBATION) and value.dtype != dtype:
                    state[key] = value.to(dtype)


def chunks(idx: list[int], params: list[Tensor],
           limit: int = CHUNK_ELEMENTS) -> Iterator[list[int]]:
    """Split ``idx`` into runs of at most ``limit`` elements (a larger tensor runs alone)."""
    run: list[int] = []
    size = 0
    for i in idx:
        n = params[i].numel()
        if run and size + n > limit:
            yield run
            run, size = [], 0
        run.append(i)
        size += n
    if run:
        yield run
