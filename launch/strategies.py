"""How a model and its optimizer are spread over ranks: one class per ``--strategy``.

Each strategy wraps the model, builds the optimizer, runs one training step (both SAM passes
for NeuroOptima), runs an evaluation forward and saves / loads its model and optimizer state:

| strategy  | model                        | optimizer state                  | checkpoint         |
|-----------|------------------------------|----------------------------------|--------------------|
| single    | plain                        | full                             | one torch file     |
| ddp       | DistributedDataParallel      | full, replicated                 | one torch file     |
| zero      | plain, replicated            | sharded (ShardedNeuroOptima)     | torch.distributed.checkpoint |
| fsdp2     | fully_shard (DTensor params) | sharded DTensors                 | torch.distributed.checkpoint |
| fsdp1     | FullyShardedDataParallel     | sharded flat views               | torch.distributed.checkpoint |
| deepspeed | DeepSpeed engine (ZeRO 0-3)  | the engine's partitions          | engine checkpoint  |

A strategy whose backend is not part of this installation raises ``BackendUnavailable``.
"""

from __future__ import annotations

import argparse
import functools
import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoint_state import (DCP_FOLDER, load_dcp, load_torch_file, save_dcp,
                               save_torch_file)
from .optimizers import build_optimizer
from .strategy_base import BackendUnavailable, LossFn, Strategy, _require_module

__all__ = ["STRATEGIES", "BackendUnavailable", "LossFn", "Strategy", "make_strategy"]

STRATEGIES = ("single", "ddp", "zero", "fsdp2", "fsdp1", "deepspeed")

ZERO_MODEL_FILE = "model.pt"


def device_mesh(strategy: Strategy):
    """``--mesh R,S``: a (replicate, shard) mesh for hybrid sharding; else a 1-D mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = getattr(strategy.args, "mesh", None) or (1, strategy.world_size)
    if shape[0] == 1:
        return init_device_mesh(strategy.device.type, (shape[1],))
    return init_device_mesh(strategy.device.type, shape, mesh_dim_names=("replicate", "shard"))


class DDPStrategy(Strategy):
    """DistributedDataParallel: gradients are averaged over ranks in each backward, so SAM's
    norm and perturbation are those of the global batch."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.args, self.module.parameters())


class ZeroStrategy(Strategy):
    """Replicated model, ZeRO-sharded optimizer state (ShardedNeuroOptima); baselines use
    torch's ZeroRedundancyOptimizer over DDP."""

    name = "zero"
    sharded_checkpoint = True

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.args.optimizer != "neurooptima":
            return DDPStrategy.wrap(self, model)
        _require_module(self.name, "neurooptima.distributed.sharded", "ShardedNeuroOptima")
        return model

    def make_optimizer(self) -> torch.optim.Optimizer:
        from .optimizers import baseline_class, baseline_kwargs, neurooptima_kwargs

        if self.args.optimizer != "neurooptima":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.sharded_checkpoint = False
            return ZeroRedundancyOptimizer(self.module.parameters(),
                                           baseline_class(self.args.optimizer),
                                           **baseline_kwargs(self.args))
        from neurooptima.distributed.sharded import ShardedNeuroOptima

        # The module too: its buffers (BatchNorm statistics) are broadcast as DDP does.
        return ShardedNeuroOptima(self.module.parameters(), module=self.module,
                                  device_mesh=device_mesh(self),
                                  sam_mode=self.args.sam_mode or "global",
                                  bucket_cap_mb=self.args.bucket_cap_mb,
                                  timeout=getattr(self.args, "collective_timeout", None),
                                  **neurooptima_kwargs(self.args))

    def save(self, directory: Path) -> None:
        if not self.sharded_checkpoint:  # a baseline under ZeroRedundancyOptimizer
            self.optimizer.consolidate_state_dict(to=0)
            save_torch_file(directory, self.module, self.optimizer, self.rank)
            return
        from neurooptima.distributed.checkpoint import save_checkpoint

        # The weights are replicated: rank 0 writes them; each rank writes its state chunks.
        if self.rank == 0:
            torch.save(self.module.state_dict(), directory / ZERO_MODEL_FILE)
        save_checkpoint(self.optimizer, directory / DCP_FOLDER)

    def load(self, directory: Path) -> None:
        if not self.sharded_checkpoint:
            load_torch_file(directory, self.module, self.optimizer, self.device)
            return
        from neurooptima.distributed.checkpoint import load_checkpoint

        self.module.load_state_dict(torch.load(directory / ZERO_MODEL_FILE,
                                               map_location=self.device, weights_only=True))
        load_checkpoint(self.optimizer, directory / DCP_FOLDER)


class FSDP2Strategy(Strategy):
    """``fully_shard`` on every top-level child with parameters, then the root; NeuroOptima
    works on the DTensor shards directly."""

    name = "fsdp2"
    sharded_checkpoint = True

    def wrap(self, model: nn.Module) -> nn.Module:
        _require_module(self.name, "neurooptima.dtensor", "NeuroOptima's DTensor support")
        from torch.distributed.fsdp import fully_shard

        mesh = device_mesh(self)  # 2-D: HSDP, replicated across R, sharded within S
        for child in model.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def make_optimizer(self) -> torch.optim.Optimizer:
        optimizer = build_optimizer(self.args, self.model.parameters())
        if self.args.optimizer == "neurooptima":
            _require_module(self.name, "neurooptima.distributed.fsdp",
                            "NeuroOptima's FSDP support")
            from neurooptima.distributed.fsdp import for_fsdp

            for_fsdp(optimizer, self.model, sam_mode=self.args.sam_mode or "global")
        return optimizer

    def save(self, directory: Path) -> None:
        save_dcp(directory, self.model, self.optimizer)

    def load(self, directory: Path) -> None:
        load_dcp(directory, self.model, self.optimizer)


class FSDP1Strategy(FSDP2Strategy):
    """FullyShardedDataParallel with ``use_orig_params=True`` (flat shard views), one FSDP
    unit per top-level child with parameters; NeuroOptima's norms are summed over FSDP's
    process group (``neurooptima.distributed.fsdp.for_fsdp``)."""

    name = "fsdp1"

    def wrap(self, model: nn.Module) -> nn.Module:
        # FSDP1's sharded state-dict code asks gloo for a default device through an API torch
        # has deprecated; the warning says nothing about this run.
        warnings.filterwarnings("ignore", module="torch.distributed.fsdp._shard_utils")
        _require_module(self.name, "neurooptima.distributed.fsdp", "NeuroOptima's FSDP support")
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        units = {id(c) for c in model.children() if any(p.requires_grad for p in c.parameters())}
        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in units)
        device_id = self.device if self.device.type == "cuda" else torch.device("cpu")
        return FSDP(model, use_orig_params=True, device_id=device_id, auto_wrap_policy=policy)


def make_strategy(args: argparse.Namespace, device: torch.device) -> Strategy:
    if args.strategy == "deepspeed":
        from .deepspeed_strategy import DeepSpeedStrategy

        return DeepSpeedStrategy(args, device)
    classes = {"single": Strategy, "ddp": DDPStrategy, "zero": ZeroStrategy,
               "fsdp2": FSDP2Strategy, "fsdp1": FSDP1Strategy}
    return classes[args.strategy](args, device)
