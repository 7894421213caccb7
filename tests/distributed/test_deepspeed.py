"""DeepSpeed: NeuroOptima from a ds_config under ZeRO stages 0-3, SAM at engine level.

Every engine trains the same small uneven-shaped MLP on a fixed global batch split across the
ranks, with ``sam_step``, and is compared with the single-process ``NeuroOptima`` taking
``step(closure)`` on the whole batch: fp32 weights within 1e-6 relative (per tensor,
``||w - w_ref|| / ||w_ref||``), bf16 within ``BF16_RTOL``. The loss is scaled so that gradient
norms exceed 1: DeepSpeed's default clipping at 1.0 would break every comparison if it applied.

DeepSpeed's JIT ops are disabled (``disable_jit_ops`` and ``DS_ACCELERATOR=cpu``), so no run
compiles anything. Engines are slow to build, so each test builds few.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("deepspeed")

from neurooptima import NeuroOptima  # noqa: E402
from neurooptima.distributed import deepspeed as nds  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
DS_CONFIG = REPO / "launch" / "ds_config.json"
STEPS = 10
FP32_RTOL = 1e-6
# bf16 keeps 8 significant bits: weights and activations carry ~0.4% rounding per step.
BF16_RTOL = 3e-2
PER_RANK = 4
LOSS_SCALE = 20.0  # gradient norms well above 1, so silent clipping at 1.0 would show

HYPER = dict(lr=2e-2, weight_decay=0.05, sam_rho=0.05, lookahead_k=3, lookahead_alpha=0.5)


@pytest.fixture(scope="module", autouse=True)
def _no_jit_ops():
    nds.disable_jit_ops()


def make_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3)).to(dtype)


def global_batch(world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(world * PER_RANK, 7, generator=g),
            torch.randn(world * PER_RANK, 3, generator=g))


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return LOSS_SCALE * (out.float() - y).pow(2).mean()


def ds_config(stage: int, params: dict, bf16: bool = False, **extra) -> dict:
    world = dist.get_world_size()
    config = {"train_batch_size": world * PER_RANK, "train_micro_batch_size_per_gpu": PER_RANK,
              "optimizer": {"type": "NeuroOptima", "params": params},
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
              "steps_per_print": 10**9, "wall_clock_breakdown": False}
    config.update(extra)
    return config


def reference(params: dict, steps: int = STEPS) -> list[torch.Tensor]:
    """Single-process NeuroOptima on the global batch."""
    model = make_model()
    opt = NeuroOptima(model.parameters(), **params)
    world = dist.get_world_size()
    for step in range(steps):
        x, y = global_batch(world, step)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def train(engine, first: int, last: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = next(p for p in engine.module.parameters()).dtype
    for step in range(first, last):
        x, y = global_batch(world, step)
        x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        nds.sam_step(engine, lambda: loss_fn(engine(x.to(dtype)), y))


def full_weights(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def build(stage: int, params: dict, bf16: bool = False, **extra):
    model = make_model(torch.bfloat16 if bf16 else torch.float32)
    engine, *_ = nds.initialize(model=model, config=ds_config(stage, params, bf16, **extra))
    return engine


def rel_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    return [((g - w).norm() / w.norm()).item() for g, w in zip(got, want)]


def agree(ok: bool) -> bool:
    """True when every rank passed, so no rank leaves a peer waiting in a collective."""
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return flag.item() == 0


# ------------------------------------------------------------------------ exactness, fp32


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_rule_matches_single_process(stage):
    """Every update rule, SAM and Lookahead on: 10 steps equal single-process NeuroOptima."""
    errors = {}
    for rule in ("adan", "lion", "lion_adan"):
        params = dict(HYPER, update=rule)
        engine = build(stage, params)
        assert engine.gradient_clipping() == 0.0  # not DeepSpeed's default 1.0
        train(engine, 0, STEPS)
        errors[rule] = rel_errors(full_weights(engine), reference(params))
    worst = max(max(e) for e in errors.values())
    assert agree(worst <= FP32_RTOL), errors
    assert worst <= FP32_RTOL, errors
