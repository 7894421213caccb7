"""Checkpoint folders of a run: what a resumed run needs to continue exactly.

A run directory holds ``metrics.jsonl`` and ``checkpoints/step-NNNNNNNN/`` folders. Each folder
has the strategy's model and optimizer state, one ``trainer-rankR.pt`` per rank (position in
the data, running loss sum, RNG states, the rank's own module buffers) and, written last by
rank 0 once every rank has finished, ``meta.json``. The file ``checkpoints/latest`` names the
newest complete folder; it is replaced atomically, so a run killed while writing a checkpoint
resumes from the previous one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["save_checkpoint", "latest_checkpoint", "read_meta", "load_trainer_state",
           "rng_state", "set_rng_state", "local_buffers", "restore_local_buffers"]

META = "meta.json"
LATEST = "latest"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Tensors and tuples of numbers only, so the file loads with weights_only=True.
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def local_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's plain-tensor buffers (e.g. BatchNorm statistics, which FSDP keeps per rank
    and a sharded checkpoint would store only once)."""
    return {name: b.detach().clone() for name, b in module.named_buffers()
            if type(b) is torch.Tensor}


@torch.no_grad()
def restore_local_buffers(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    buffers = dict(module.named_buffers())
    for name, value in saved.items():
        if name not in buffers:
            raise KeyError(f"checkpoint holds buffer {name!r}, which the model does not have")
        buffers[name].copy_(value)


def save_checkpoint(out: Path, strategy, trainer_state: dict[str, Any], meta: dict[str, Any],
                    keep: int) -> Path:
    """Collective: every rank calls it. Returns the new checkpoint folder."""
    root = out / "checkpoints"
    directory = root / f"step-{meta['global_step']:08d}"
    rank = strategy.rank
    if rank == 0:
        if directory.exists():  # left over from a run that died while writing it
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
    _barrier()
    strategy.save(directory)
    torch.save(trainer_state, directory / f"trainer-rank{rank}.pt")
    _barrier()
    if rank == 0:
        (directory / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(directory.name)
        os.replace(tmp, root / LATEST)
        _prune(root, keep, current=directory.name)
    return directory


def _prune(root: Path, keep: int, current: str) -> None:
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    complete = [p for p in folders if (p / META).is_file()]
    for old in complete[:-keep] if keep > 0 else []:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for partial in folders:
        if not (partial / META).is_file() and partial.name != current:
            shutil.rmtree(partial, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    directory = out / "checkpoints" / pointer.read_text().strip()
    return directory if (directory / META).is_file() else None


def read_meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / META).read_text())


def load_trainer_state(directory: Path, rank: int) -> dict[str, Any]:
    return torch.load(directory / f"trainer-rank{rank}.pt", weights_only=True)
