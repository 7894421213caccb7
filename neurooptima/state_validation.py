"""Checks a state dict against the optimizer it is loaded into, before anything is loaded.

torch's ``Optimizer.load_state_dict`` checks the number of groups and of parameters per group,
then maps saved entries to parameters by position. A checkpoint of another model with the same
parameter count (another hidden width) or of another update rule would load, and the next step
would fail with a bare size mismatch or, worse, run. ``check_state_dict`` names the parameter,
the key and both shapes instead, so a wrong checkpoint is refused whole.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch
from torch import Tensor

from .functional import UPDATE_RULES, state_keys

__all__ = ["check_state_dict", "rule_mismatch"]

_SHAPED_LIKE_PARAM = ("lookahead.slow",)  # besides the rule's buffers


def rule_mismatch(index: int, saved: str, current: str) -> str:
    return (f"param group {index}: the checkpoint was saved with update={saved!r}, this "
            f"optimizer has update={current!r}; its buffers are another rule's, so build the "
            f"optimizer with update={saved!r} to resume it")


def check_state_dict(groups: Sequence[Sequence[Tensor]], state_dict: dict[str, Any],
                     rules: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` unless ``state_dict`` (the full, unsharded format) fits ``groups``,
    this optimizer's parameters by group, and ``rules``, its groups' update rules (if given)."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups', as "
                         "optimizer.state_dict() returns")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(f"the state dict has {len(saved_groups)} param groups, the optimizer "
                         f"{len(groups)}")
    params: dict[Any, tuple[Tensor, str]] = {}
    for i, (saved, params_) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(params_):
            raise ValueError(f"param group {i} of the state dict has {len(saved['params'])} "
                             f"parameters, the optimizer's {len(params_)}")
        rule = saved.get("update", "adan")
        if rules is not None and rule != rules[i]:
            raise ValueError(rule_mismatch(i, rule, rules[i]))
        if rule not in UPDATE_RULES:
            raise ValueError(f"param group {i} of the state dict has update={rule!r}, not one "
                             f"of {UPDATE_RULES}")
        for index, p in zip(saved["params"], params_):
            params[index] = (p, rule)
    for index, entry in state_dict["state"].items():
        if index not in params:
            raise ValueError(f"the state dict holds state for parameter {index!r}, which no "
                             f"param group lists")
        p, rule = params[index]
        shaped = set(state_keys(rule)) | set(_SHAPED_LIKE_PARAM)
        for key, value in entry.items():
            if key == "step":
                if not (isinstance(value, numbers.Real)
                        or (torch.is_tensor(value) and value.numel() == 1)):
                    raise ValueError(f"parameter {index}: 'step' must be a number or a "
                                     f"one-element tensor, got {value!r}")
                continue
            if key.split(".", 1)[0] in UPDATE_RULES and key not in shaped:
                raise ValueError(f"parameter {index}: the state dict has {key!r}, a buffer of "
                                 f"another update rule than its group's update={rule!r}")
            if key in shaped and (not torch.is_tensor(value) or value.shape != p.shape):
                got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"parameter {index}: the state dict's {key!r} has shape {got}, "
                                 f"the parameter has shape {tuple(p.shape)}: it was saved from "
                                 f"another model")
