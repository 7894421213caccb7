"""The construction check of ``ShardedNeuroOptima``: every rank passed the same thing.

Each rank describes what it was given (settings, param groups with their hyperparameters, and
every parameter's shape, dtype and ``requires_grad``); one ``all_gather_object`` per process
group of the topology (one on a flat group, two on a mesh) hands every rank every description,
so every rank finds the same differences and raises the same error at once, naming the
parameters and the global ranks.
Without it a mismatch surfaces much later: a ``requires_grad`` that differs on one rank makes
the ranks expect different gradient buckets, and every rank would wait a whole collective
timeout for a collective its peer never starts.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

__all__ = ["describe_parameters", "check_same_on_all_ranks"]

MAX_LISTED = 8  # differences named in the error; the rest are counted


def describe_parameters(params: list[Tensor], names: dict[Tensor, str]) -> list[tuple]:
    """Per parameter: (name or None, shape, dtype, requires_grad)."""
    return [(names.get(p), tuple(p.shape), str(p.dtype), bool(p.requires_grad)) for p in params]


def _parameter_differences(i: int, mine: list[tuple], theirs: list[tuple], them: str,
                           first: str) -> list[str]:
    if len(mine) != len(theirs):
        return [f"param group {i} parameter count: {first} has {len(mine)}, {them} has "
                f"{len(theirs)}"]
    diffs = []
    for j, (a, b) in enumerate(zip(mine, theirs)):
        for k, what in ((1, "shape"), (2, "dtype"), (3, "requires_grad")):
            if a[k] != b[k]:
                name = f" ({a[0]})" if a[0] else ""
                diffs.append(f"param group {i} parameter {j}{name} {what}: {first} has "
                             f"{a[k]!r}, {them} has {b[k]!r}")
    return diffs


def _differences(everyone: list[dict[str, Any]], ranks: list[int]) -> list[str]:
    first, zero = everyone[0], f"rank {ranks[0]}"
    diffs = []
    for rank, theirs in zip(ranks[1:], everyone[1:]):
        them = f"rank {rank}"
        for key, value in first["settings"].items():
            if theirs["settings"][key] != value:
                diffs.append(f"{key}: {zero} has {value!r}, {them} has "
                             f"{theirs['settings'][key]!r}")
        if len(theirs["groups"]) != len(first["groups"]):
            diffs.append(f"number of param groups: {zero} has {len(first['groups'])}, {them} "
                         f"has {len(theirs['groups'])}")
            continue
        for i, (a, b) in enumerate(zip(first["groups"], theirs["groups"])):
            for key in a["hyper"]:
                if a["hyper"][key] != b["hyper"].get(key):
                    diffs.append(f"param group {i} {key}: {zero} has {a['hyper'][key]!r}, "
                                 f"{them} has {b['hyper'].get(key)!r}")
            diffs += _parameter_differences(i, a["params"], b["params"], them, zero)
    return diffs


def check_same_on_all_ranks(mine: dict[str, Any], groups: list) -> None:
    """``mine``: ``{"settings": {...}, "groups": [{"hyper": {...}, "params": [...]}]}`` as
    this rank sees it. Raises ``ValueError`` on every rank of the topology when any differ.

    The descriptions travel through each of ``groups`` in turn (a 2-D mesh: the shard group,
    then the replicate group), so every rank ends with every rank's, compares them all with the
    lowest rank's and finds the same differences."""
    known = {dist.get_rank(): mine}
    for group in groups:
        everyone: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, known, group=group)
        for theirs in everyone:
            known.update(theirs)
    ranks = sorted(known)
    diffs = list(dict.fromkeys(_differences([known[r] for r in ranks], ranks)))
    if diffs:
        more = len(diffs) - MAX_LISTED
        listed = "; ".join(diffs[:MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")
        raise ValueError("ShardedNeuroOptima needs the same hyperparameters and parameters on "
                         "every rank (the same model, the same requires_grad, the same param "
                         f"groups); they differ: {listed}")
