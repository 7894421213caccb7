"""Loss scaling of ShardedNeuroOptima in the two-phase SAM loop (the README's AMP recipe).

torch's own scalers reach only each rank's unreduced ``p.grad``: their ``unscale_`` is refused
on every rank with the error ``scaler.step`` gives. ``ShardedGradScaler`` in the same loop
follows DDP + NeuroOptima with torch's GradScaler to 1e-6, overflow steps included.

Run: torchrun --standalone --nproc_per_node=2 (and 3) -m pytest -q tests/distributed/test_sharded_amp.py
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as FSDPGradScaler
from test_sharded_support import agree_max, local_batch, loss_fn, make_model, relative_error

from neurooptima import NeuroOptima
from neurooptima.distributed import ShardedGradScaler, ShardedNeuroOptima
from neurooptima.distributed.amp import TORCH_SCALER_ERROR

STEPS = 6
HYPER = dict(lr=3e-3, weight_decay=0.01, sam_rho=0.05, lookahead_k=3, eps=1e-2)
INF_AT = {2: "second", 4: "first"}  # steps whose loss on the last rank is multiplied by inf


def _two_phase(model, optimizer, scaler, step, rank, n):
    """The README's loop: unscale only the second pass, then second_step()."""
    x, y = local_batch(step, rank, n)

    def loss(phase):
        value = loss_fn(model, x, y)
        return value * math.inf if INF_AT.get(step) == phase and rank == n - 1 else value

    optimizer.zero_grad()
    scaler.scale(loss("first")).backward()
    optimizer.first_step(zero_grad=True)
    scaler.scale(loss("second")).backward()
    scaler.unscale_(optimizer)
    optimizer.second_step()
    scaler.update()


@pytest.mark.filterwarnings("ignore:NeuroOptima skipped a step")
def test_sharded_grad_scaler_two_phase_sam_follows_ddp(world):
    rank, n = world
    model = make_model(5)
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=0.001, **HYPER)
    scaler = ShardedGradScaler("cpu", init_scale=1024.0, growth_interval=2)
    reference = make_model(5)
    ddp = nn.parallel.DistributedDataParallel(reference)
    ref_opt = NeuroOptima(ddp.parameters(), **HYPER)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    scales = []
    for step in range(STEPS):
        _two_phase(model, optimizer, scaler, step, rank, n)
        _two_phase(ddp, ref_opt, ref_scaler, step, rank, n)
        scales.append((scaler.get_scale(), ref_scaler.get_scale()))
    assert all(a == b for a, b in scales)
    assert scales[2][0] == scales[1][0] / 2  # the overflow in the second pass backed off
    assert (optimizer.param_groups[0]["skipped_steps"]
            == ref_opt.param_groups[0]["skipped_steps"] >= 1)
    assert agree_max(relative_error(model, reference)) <= 1e-6


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, FSDPGradScaler],
                         ids=["torch", "fsdp"])
def test_torch_scalers_unscale_is_refused_like_their_step(world, scaler_cls):
    rank, n = world
    model = make_model(5)
    optimizer = ShardedNeuroOptima(model.parameters(), **HYPER)
    x, y = local_batch(0, rank, n)
    messages = []
    for call in ("unscale_", "step"):
        scaler = scaler_cls("cpu", init_scale=1024.0)
        optimizer.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        optimizer.first_step(zero_grad=True)
        scaler.scale(loss_fn(model, x, y)).backward()
        before = [p.detach().clone() for p in model.parameters()]
        try:
            getattr(scaler, call)(optimizer)
            messages.append("")
        except RuntimeError as error:
            messages.append(str(error))
        if call == "unscale_":  # refused before anything moved; the step can still run
            optimizer.second_step()
            assert not all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert agree_max(0.0 if messages == [TORCH_SCALER_ERROR] * 2 else 1.0) == 0.0, messages


@pytest.mark.four_ranks
@pytest.mark.filterwarnings("ignore:NeuroOptima skipped a step")
def test_sharded_grad_scaler_two_phase_sam_on_a_mesh_follows_ddp(world):
    from torch.distributed.device_mesh import init_device_mesh

    rank, n = world
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = make_model(5)
    optimizer = ShardedNeuroOptima(model.parameters(), device_mesh=mesh, **HYPER)
    scaler = ShardedGradScaler("cpu", init_scale=1024.0, growth_interval=2)
    reference = make_model(5)
    ddp = nn.parallel.DistributedDataParallel(reference)
    ref_opt = NeuroOptima(ddp.parameters(), **HYPER)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    for step in range(STEPS):
        _two_phase(model, optimizer, scaler, step, rank, n)
        _two_phase(ddp, ref_opt, ref_scaler, step, rank, n)
        assert scaler.get_scale() == ref_scaler.get_scale()
    assert agree_max(relative_error(model, reference)) <= 1e-6
