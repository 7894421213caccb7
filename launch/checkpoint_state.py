"""Writing and reading model + optimizer state: one torch file, or a sharded checkpoint.

Replicated state (single process, DDP) goes to one ``state.pt`` written by rank 0. Sharded
state (FSDP, ZeRO) goes through ``torch.distributed.checkpoint`` (every rank writes its shards;
loading reshards).

Loading a sharded checkpoint needs a target that already holds every optimizer state tensor.
torch fills an empty optimizer by calling ``step()`` with zero gradients, which a SAM optimizer
cannot do without a closure, and which it skips when state exists already (NeuroOptima creates
its Lookahead slow weights up front). So the missing entries are created here, from the
checkpoint's own metadata: zeros shaped like the parameter (or 0-d for counters), which the load
then overwrites.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["save_torch_file", "load_torch_file", "save_dcp", "load_dcp"]

STATE_FILE = "state.pt"
DCP_FOLDER = "dcp"
# Wrapper prefixes that torch's state-dict helpers remove from parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def save_torch_file(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int) -> None:
    if rank == 0:
        torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict()},
                   directory / STATE_FILE)


def load_torch_file(directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> None:
    state = torch.load(directory / STATE_FILE, map_location=device, weights_only=True)
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


def save_dcp(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state},
             checkpoint_id=str(directory / DCP_FOLDER))


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@torch.no_grad()
def _create_missing_optimizer_state(checkpoint: str, model: nn.Module,
                                    optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(checkpoint).read_metadata()
    paths = metadata.planner_data or {}
    params = {_clean_name(name): p for name, p in model.named_parameters()}
    for flat_key, storage in metadata.state_dict_metadata.items():
        path = paths.get(flat_key)
        if not isinstance(storage, TensorStorageMetadata) or path is None:
            continue
        if len(path) != 4 or path[0] != "optim" or path[1] != "state":
            continue
        fqn, key = path[2], path[3]
        if fqn not in params:
            raise KeyError(f"checkpoint {checkpoint} holds optimizer state for {fqn!r}, which "
                           f"the model does not have; was it saved from another model?")
        param = params[fqn]
        state = optimizer.state[param]
        if key in state:
            continue
        if len(storage.size) == 0:
            state[key] = torch.zeros((), dtype=storage.properties.dtype)
        else:
            state[key] = torch.zeros_like(param, dtype=storage.properties.dtype)


def load_dcp(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoint = str(directory / DCP_FOLDER)
    _create_missing_optimizer_state(checkpoint, model, optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
