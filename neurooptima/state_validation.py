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

__all__ = ["check_state_dict", "check_not_foreign", "rule_mismatch", "record_state_count",
           "check_state_count", "check_load", "STATE_COUNT"]

_SHAPED_LIKE_PARAM = ("lookahead.slow", "ascent.offset", "ascent.point")  # besides the buffers


def rule_mismatch(index: int, saved: str, current: str) -> str:
    return (f"param group {index}: the checkpoint was saved with update={saved!r}, this "
            f"optimizer has update={current!r}; its buffers are another rule's, so build the "
            f"optimizer with update={saved!r} to resume it")


# ------------------------------------------------------------ another optimizer's state dict

# Settings every NeuroOptima param group saves; a saved group with none of them is another
# optimizer's.
_OWN_GROUP_KEYS = ("update", "sam_rho", "lookahead_k")

# (what it looks like, test on (per-parameter keys, the first saved group)), most specific
# first. Only used to name the source in the error; any key NeuroOptima never saves is refused.
_KNOWN_FOREIGN: tuple[tuple[str, Any], ...] = (
    ("an Adan state dict (pytorch-optimizer's Adan, or the official Adan's)",
     lambda keys, group: {"exp_avg", "exp_avg_diff"} <= keys),
    ("torch.optim.AdamW's",
     lambda keys, group: "amsgrad" in group and group.get("decoupled_weight_decay", True)
     and keys <= {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    ("torch.optim.Adam's",
     lambda keys, group: "amsgrad" in group and keys <= {"exp_avg", "exp_avg_sq",
                                                        "max_exp_avg_sq"}),
    ("a Lion state dict (pytorch-optimizer's Lion, or another library's)",
     lambda keys, group: keys == {"exp_avg"}),
    ("torch.optim.SGD's", lambda keys, group: "nesterov" in group),
)


def _foreign_keys(state_dict: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(per-parameter keys, per-group keys) that NeuroOptima never saves: its parameter state
    is ``step`` and namespaced buffers (``adan.exp_avg``, ``lookahead.slow``, ...)."""
    state_keys_: set[str] = set()
    for entry in state_dict["state"].values():
        if isinstance(entry, dict):
            state_keys_.update(str(k) for k in entry if k != "step" and "." not in str(k))
    group_keys: set[str] = set()
    for group in state_dict["param_groups"]:
        if isinstance(group, dict) and not any(k in group for k in _OWN_GROUP_KEYS):
            group_keys.update(str(k) for k in group if k != "params")
    return sorted(state_keys_), sorted(group_keys)


def check_not_foreign(state_dict: dict[str, Any]) -> None:
    """Refuse another optimizer's state dict (torch's AdamW, an Adan or Lion of another library)
    with what it looks like and what to do: its buffers are another algorithm's, which
    NeuroOptima's update cannot continue, and loading its param groups would replace this
    optimizer's settings with ones it does not have."""
    state_keys_, group_keys = _foreign_keys(state_dict)
    if not state_keys_ and not group_keys:
        return
    groups = [g for g in state_dict["param_groups"] if isinstance(g, dict)]
    first = groups[0] if groups else {}
    looks = next((name for name, test in _KNOWN_FOREIGN if test(set(state_keys_), first)),
                 "another optimizer's")
    found = []
    if state_keys_:
        found.append(f"per-parameter keys {'/'.join(state_keys_)}")
    if group_keys:
        shown = "/".join(group_keys[:5]) + ("/..." if len(group_keys) > 5 else "")
        found.append(f"param groups without NeuroOptima's settings ({', '.join(_OWN_GROUP_KEYS)}) "
                     f"but with {shown}")
    raise ValueError(
        f"this state dict looks like {looks}: it has {' and '.join(found)}, where NeuroOptima "
        f"saves 'step' and namespaced buffers ('adan.exp_avg', 'lookahead.slow', ...). Another "
        f"algorithm's optimizer state cannot be continued by NeuroOptima, so nothing was "
        f"loaded. The model weights of that run are fine: load them (model.load_state_dict) "
        f"and start this optimizer fresh, as for a new run.")


def check_state_dict(groups: Sequence[Sequence[Tensor]], state_dict: dict[str, Any],
                     rules: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` unless ``state_dict`` (the full, unsharded format) fits ``groups``,
    this optimizer's parameters by group, and ``rules``, its groups' update rules (if given)."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups', as "
                         "optimizer.state_dict() returns")
    check_not_foreign(state_dict)
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


# ------------------------------------------------------------------ state saved vs state loaded

STATE_COUNT = "params_with_state"  # per saved param group: parameters that had rule buffers

_MATERIALIZE = ("with torch.distributed.checkpoint, the state dict to load into describes only "
                "the state the fresh optimizer already has, so the rest of the checkpoint is "
                "never read: call neurooptima.distributed.materialize_state(optimizer) before "
                "get_optimizer_state_dict()")


def _with_state(group: dict[str, Any], state: dict[Any, Any]) -> int:
    first = state_keys(group.get("update", "adan"))[0]
    return sum(1 for index in group["params"] if first in state.get(index, {}))


def record_state_count(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` post-hook: each group records how many of its parameters had buffers."""
    for group in state_dict["param_groups"]:
        group[STATE_COUNT] = _with_state(group, state_dict["state"])
    return state_dict


def check_state_count(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """``load_state_dict`` pre-hook: a group whose checkpoint had update buffers gets some (a
    load that read none of them, as through DCP into a fresh optimizer, is refused). Only none
    at all is an error: a sharded framework may hold no piece, and so no state, of some
    parameters on some ranks."""
    for i, group in enumerate(state_dict.get("param_groups", [])):
        saved = group.get(STATE_COUNT)
        present = _with_state(group, state_dict.get("state", {}))
        if saved and not present:
            raise ValueError(f"param group {i}: the checkpoint was saved with update buffers "
                             f"for {saved} parameters, but the state dict being loaded has "
                             f"them for {present}; " + _MATERIALIZE)


# ShardedNeuroOptima's full state dict keeps each parameter's float32 master weights here; one
# process trains its parameters themselves, so it loads the rest and leaves these.
SHARDED_MASTER = "master"


def _without_masters(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {**state_dict, "state": {
        i: ({k: v for k, v in entry.items() if k != SHARDED_MASTER}
            if isinstance(entry, dict) else entry)
        for i, entry in state_dict["state"].items()}}


def drop_sharded_masters(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``load_state_dict`` pre-hook: a sharded run's full state dict without its masters."""
    return _without_masters(state_dict)


def check_load(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """``load_state_dict`` pre-hook of ``NeuroOptima``: shapes, rules and completeness."""
    state_dict = _without_masters(state_dict)
    check_state_dict([group["params"] for group in optimizer.param_groups], state_dict,
                     [group["update"] for group in optimizer.param_groups])
    check_state_count(optimizer, state_dict)
