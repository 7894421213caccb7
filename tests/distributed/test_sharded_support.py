"""Shared pieces of the ShardedNeuroOptima tests: a model of uneven shapes, data, references."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from neurooptima import NeuroOptima

GLOBAL_BATCH = 12  # divisible by 1, 2, 3, 4 and 6 ranks


class UnevenNet(nn.Module):
    """Parameters of 561, 17, 85, 5 and 2 elements: padding on every world size > 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(33, 17)
        self.fc2 = nn.Linear(17, 5)
        self.gain = nn.Parameter(torch.tensor([1.5, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.tanh(self.fc1(x)))
        return torch.cat([out[:, :2] * self.gain, out[:, 2:]], dim=1)


def make_model(seed: int = 0) -> UnevenNet:
    torch.manual_seed(seed)
    return UnevenNet()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 33, generator=gen)
    y = torch.randn(GLOBAL_BATCH, 5, generator=gen)
    return x, y


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    n = GLOBAL_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def closure_for(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor):
    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss
    return closure


def train_sharded(model: nn.Module, optimizer, steps: range, rank: int, world: int) -> None:
    for step in steps:
        x, y = local_batch(step, rank, world)
        optimizer.step(closure_for(model, optimizer, x, y))


def train_reference(model: nn.Module, optimizer: NeuroOptima, steps: range) -> None:
    for step in steps:
        x, y = global_batch(step)
        optimizer.step(closure_for(model, optimizer, x, y))


def relative_error(a: nn.Module, b: nn.Module) -> float:
    """Largest ||a - b|| / ||b|| over the parameters."""
    return max(((pa - pb).norm() / pb.norm()).item()
               for pa, pb in zip(a.parameters(), b.parameters()))


def agree_max(value: float, group=None) -> float:
    """The largest ``value`` over the ranks (all ranks then assert on the same number)."""
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()
