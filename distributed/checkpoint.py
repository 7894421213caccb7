"""Sharded checkpoints of ``ShardedNeuroOptima`` through ``torch.distributed.checkpoint``.

Each rank writes only its chunks. Every chunk-sized buffer is saved as a DTensor sharded on
dim 0 of the flat, unpadded parameter (``torch.chunk``'s split is the optimizer's split, so the
local piece is the chunk without its padding); step counters are saved once, and the param
groups (hyperparameters and ``skipped_steps``) as JSON. Loading on M ranks asks for the pieces
of the M-rank split and DCP reads them from whatever N-rank files hold them: N -> M resharding.

For the unsharded format of single-process ``NeuroOptima``, use
``ShardedNeuroOptima.state_dict()`` and ``load_state_dict()``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from neurooptima.functional import state_keys
from neurooptima.state_validation import rule_mismatch
from neurooptima.validation import check_group

from neurooptima.momentum_ascent import OFFSET, POINT

from .sharded import HYPER_KEYS, MASTER, ShardedNeuroOptima

__all__ = ["sharded_state_dict", "save_checkpoint", "load_checkpoint"]

_GROUPS = "param_groups_json"


def _dcp_group(optimizer: ShardedNeuroOptima) -> Any:
    """The ranks that write and read the checkpoint: the shard group, or with hybrid sharding
    the whole mesh (replicas write their equal chunks once; DCP deduplicates)."""
    mesh = optimizer.topology.mesh
    if mesh is None or mesh.ndim == 1:
        return optimizer.process_group
    if mesh.size() != dist.get_world_size():
        raise ValueError("sharded checkpoints of a hybrid (2-D) mesh need the mesh to span "
                         "every rank of the default process group")
    return None


def _mesh(optimizer: ShardedNeuroOptima) -> DeviceMesh:
    if optimizer.topology.mesh is not None:
        return optimizer.topology.mesh
    group = optimizer.process_group or dist.group.WORLD
    device = next(iter(optimizer._chunks.values())).device.type if optimizer._chunks else "cpu"
    return DeviceMesh.from_group(group, device)


def _sharded(chunk_buffer: Tensor, slot, mesh: DeviceMesh) -> DTensor:
    # A view of the unpadded part: DCP writes loaded values straight into the buffer.
    # Replicated across the replicate dimension of a hybrid mesh, sharded within the shard one.
    placements = [Replicate()] * (mesh.ndim - 1) + [Shard(0)]
    return DTensor.from_local(chunk_buffer[:slot.valid], mesh, placements, run_check=False,
                              shape=torch.Size([slot.numel]), stride=(1,))


def _groups_json(optimizer: ShardedNeuroOptima) -> str:
    optimizer._sync_groups_from_inner()
    groups = []
    for group in optimizer.param_groups:
        packed = {k: group.get(k) for k in HYPER_KEYS}
        packed["betas"] = list(packed["betas"])
        if packed["state_dtype"] is not None:  # JSON has no dtype: "bfloat16" and back
            packed["state_dtype"] = str(packed["state_dtype"]).removeprefix("torch.")
        packed["skipped_steps"] = int(group["skipped_steps"])  # a device tensor after a fused step
        packed["sam_clock"] = int(group["sam_clock"])
        packed["ascent_scale"] = float(group["ascent_scale"])  # float64 0-d tensor: exact
        packed["ascent_eval"] = bool(group["ascent_eval"])
        packed["num_params"] = len(group["params"])
        groups.append(packed)
    return json.dumps({"param_groups": groups, "saved_world_size": optimizer.world_size,
                       "sam_mode": optimizer.sam_mode})


def sharded_state_dict(optimizer: ShardedNeuroOptima) -> dict[str, Any]:
    """The optimizer's state as DCP wants it: DTensor chunks, replicated counters, JSON groups."""
    if optimizer.in_second_pass:
        raise RuntimeError("a checkpoint between first_step() and second_step() would hold "
                           "perturbed weights; save between steps")
    mesh = _mesh(optimizer)
    state: dict[str, dict[str, Any]] = {}
    for slot in optimizer._slot_list():
        entry = optimizer.local_optimizer.state.get(optimizer._chunks[slot.param])
        if not entry:
            continue
        state[str(slot.index)] = {
            key: (_sharded(value, slot, mesh) if value.dim() == 1 and key != "step" else value)
            for key, value in entry.items()}
        if optimizer._bucket_of(slot).has_master:  # the float32 master weights' chunk
            state[str(slot.index)][MASTER] = _sharded(optimizer._chunks[slot.param].detach(),
                                                      slot, mesh)
    return {"state": state, _GROUPS: _groups_json(optimizer)}


def save_checkpoint(optimizer: ShardedNeuroOptima, checkpoint_id: str | os.PathLike) -> None:
    """Write this optimizer's sharded state to a DCP checkpoint (every rank of its group)."""
    dcp.save(sharded_state_dict(optimizer), checkpoint_id=checkpoint_id,
             process_group=_dcp_group(optimizer))


def _saved_entries(metadata: Metadata) -> dict[int, dict[str, TensorStorageMetadata]]:
    entries: dict[int, dict[str, TensorStorageMetadata]] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if fqn.startswith("state."):
            index, key = fqn[len("state."):].split(".", 1)
            entries.setdefault(int(index), {})[key] = meta
    return entries


def _saved_groups(optimizer: ShardedNeuroOptima, checkpoint_id) -> list[dict[str, Any]]:
    """The checkpoint's param groups, checked against the optimizer (nothing is loaded yet)."""
    loaded = {_GROUPS: ""}
    dcp.load(loaded, checkpoint_id=checkpoint_id, process_group=_dcp_group(optimizer))
    groups = json.loads(loaded[_GROUPS])["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint has {len(groups)} param groups, the optimizer "
                         f"{len(optimizer.param_groups)}")
    checked = []
    for i, (group, saved_group) in enumerate(zip(optimizer.param_groups, groups)):
        if saved_group["num_params"] != len(group["params"]):
            raise ValueError(f"param group {i} has {len(group['params'])} parameters, the "
                             f"checkpoint's has {saved_group['num_params']}")
        if saved_group.get("update", "adan") != group["update"]:
            raise ValueError(rule_mismatch(i, saved_group.get("update", "adan"),
                                           group["update"]))
        new = {k: group[k] for k in HYPER_KEYS}
        new.update({k: saved_group[k] for k in HYPER_KEYS if k in saved_group})  # older
        new["betas"] = tuple(new["betas"])  # checkpoints lack the newer options
        if isinstance(new.get("state_dtype"), str):
            dtype = getattr(torch, new["state_dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"param group {i} of the checkpoint has state_dtype "
                                 f"{new['state_dtype']!r}, which is not a torch dtype")
            new["state_dtype"] = dtype
        check_group(new)
        new["skipped_steps"] = saved_group["skipped_steps"]
        for key, default in (("sam_clock", 0), ("ascent_scale", 0.0), ("ascent_eval", False)):
            new[key] = saved_group.get(key, default)  # older checkpoints lack them
        checked.append(new)
    return checked


def _check_entries(optimizer: ShardedNeuroOptima, groups: list[dict[str, Any]],
                   saved: dict[int, dict[str, TensorStorageMetadata]]) -> None:
    """Every saved buffer belongs to its group's rule and has its parameter's size."""
    slots = {slot.index: slot for slot in optimizer._slot_list()}
    unknown = sorted(set(saved) - set(slots))
    if unknown:
        raise ValueError(f"the checkpoint holds state for parameter indices {unknown}, but the "
                         f"optimizer has {len(slots)} parameters")
    rule_of, index = {}, 0
    for group, new in zip(optimizer.param_groups, groups):
        for _ in group["params"]:
            rule_of[index] = new["update"]
            index += 1
    for index, keys in saved.items():
        slot, rule = slots[index], rule_of[index]
        allowed = set(state_keys(rule)) | {"lookahead.slow", MASTER, OFFSET, POINT}
        for key, meta in keys.items():
            if key == "step":
                continue
            if key not in allowed:
                raise ValueError(f"parameter {index}: the checkpoint has {key!r}, which is not "
                                 f"a buffer of its group's update={rule!r}")
            if tuple(meta.size) != (slot.numel,):
                raise ValueError(f"parameter {index}: the checkpoint's {key!r} has "
                                 f"{math.prod(meta.size)} elements, the parameter (shape "
                                 f"{tuple(slot.param.shape)}) {slot.numel}: it was saved from "
                                 f"another model")


@torch.no_grad()
def load_checkpoint(optimizer: ShardedNeuroOptima, checkpoint_id: str | os.PathLike) -> None:
    """Load a DCP checkpoint saved by ``save_checkpoint`` on any number of ranks.

    Replaces every buffer, counter and param-group setting; the model's weights are not part
    of it (load them into the model as usual, the same on every rank). The checkpoint is checked
    against the optimizer first (groups, parameter counts and sizes, update rules, settings):
    a mismatch raises ``ValueError`` naming the parameter, and nothing is loaded.
    """
    if optimizer.in_second_pass:
        raise RuntimeError("load_checkpoint() between first_step() and second_step()")
    groups = _saved_groups(optimizer, checkpoint_id)
    saved = _saved_entries(dcp.FileSystemReader(checkpoint_id).read_metadata())
    _check_entries(optimizer, groups, saved)
    optimizer._discard_pending()
    slots = {slot.index: slot for slot in optimizer._slot_list()}
    mesh = _mesh(optimizer)
    new_state: dict[Tensor, dict[str, Any]] = {}
    request: dict[str, dict[str, Any]] = {}
    for index, keys in saved.items():
        slot = slots[index]
        chunk = optimizer._chunks[slot.param]
        entry, wanted = {}, {}
        for key, meta in keys.items():
            if key != "step":
                buffer = torch.zeros_like(chunk, dtype=meta.properties.dtype)
                entry[key], wanted[key] = buffer, _sharded(buffer, slot, mesh)
            else:
                entry[key] = wanted[key] = torch.zeros(meta.size, dtype=meta.properties.dtype)
        new_state[chunk] = entry
        request[str(index)] = wanted
    dcp.load({"state": request}, checkpoint_id=checkpoint_id,
             process_group=_dcp_group(optimizer))
    # Only now, with everything read, replace the optimizer's settings and state.
    for group, new in zip(optimizer.param_groups, groups):
        group.update(new)
    param_of = {chunk: p for p, chunk in optimizer._chunks.items()}
    for chunk, entry in new_state.items():
        master = entry.pop(MASTER, None)
        if master is not None:
            optimizer._load_master(param_of[chunk], master)
    optimizer.local_optimizer.state.clear()
    optimizer.local_optimizer.state.update(new_state)
    optimizer._sync_groups_to_inner()
