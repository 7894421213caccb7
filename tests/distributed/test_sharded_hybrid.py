"""Hybrid sharding: a 2 x 2 mesh (replicate x shard) on 4 ranks equals one process on the global
batch; its bytes per rank follow the formula; its sharded checkpoints reshard to 1 x 3 and back.

Run: torchrun --standalone --nproc_per_node=4 -m pytest -q tests/distributed -m four_ranks
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from test_sharded_support import (agree_max, closure_for, local_batch, make_model,
                                  relative_error, train_reference)

from neurooptima import NeuroOptima
from neurooptima.distributed import (ShardedNeuroOptima, count_communication, load_checkpoint,
                                     save_checkpoint)
from neurooptima.distributed.comm_accounting import ring_bytes

pytestmark = pytest.mark.four_ranks

TOL = 1e-6
STEPS = 12
HYPER = dict(lr=3e-3, weight_decay=0.01, lookahead_k=3, eps=1e-2)


def mesh_2x2() -> DeviceMesh:
    return DeviceMesh("cpu", torch.arange(4).view(2, 2), mesh_dim_names=("replicate", "shard"))


def train_on(model, optimizer, steps, data_rank, data_world):
    for step in steps:
        x, y = local_batch(step, data_rank, data_world)
        optimizer.step(closure_for(model, optimizer, x, y))


@pytest.mark.parametrize("sam_rho", [0.0, 0.05], ids=["plain", "sam_global"])
@pytest.mark.parametrize("update", ["adan", "lion"])
def test_2x2_mesh_matches_single_process(world, update, sam_rho):
    rank, n = world
    hyper = dict(HYPER, update=update, sam_rho=sam_rho, max_grad_norm=0.5)
    model = make_model()
    optimizer = ShardedNeuroOptima(model.parameters(), device_mesh=mesh_2x2(),
                                   bucket_cap_mb=0.001, **hyper)
    assert optimizer.world_size == 2 and optimizer.topology.replicas == 2
    train_on(model, optimizer, range(STEPS), rank, n)
    reference = make_model()
    train_reference(reference, NeuroOptima(reference.parameters(), **hyper), range(STEPS))
    assert agree_max(relative_error(model, reference)) <= TOL
    # Replicas hold equal chunks: state per rank is 1/2 of the model's, not 1/4.
    chunks = sum(c.numel() for c in optimizer._chunks.values())
    assert chunks == sum((p.numel() + 1) // 2 for p in model.parameters())


def test_2x2_bytes_per_rank_follow_the_formula(world):
    rank, n = world
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64))
    optimizer = ShardedNeuroOptima(model.parameters(), device_mesh=mesh_2x2(), sam_rho=0.0,
                                   bucket_cap_mb=0.05, **HYPER)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(rank))

    def step():
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    step()
    with count_communication() as counter:
        step()
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    shard, replicas = 2, 2
    formula = {
        "reduce_scatter": ring_bytes("reduce_scatter", model_bytes, shard),
        "all_gather": ring_bytes("all_gather", model_bytes, shard),
        # each rank's reduced chunk (model / shard bytes), summed across the replicas
        "all_reduce": ring_bytes("all_reduce", model_bytes // shard, replicas),
    }
    for kind, expected in formula.items():
        assert counter.bytes[kind] == pytest.approx(expected, rel=0.01), kind
    # The norm's 16-byte all-reduce runs in the shard group only (replicas hold equal chunks).
    assert counter.calls["all_reduce"] == len(optimizer._buckets) + 1


def _sub_mesh(size: int) -> DeviceMesh:
    return DeviceMesh("cpu", list(range(size)))


@pytest.mark.parametrize("direction", ["2x2_to_1x3", "1x3_to_2x2"])
def test_sharded_checkpoint_reshards_between_2x2_and_1x3(world, shared_dir, direction):
    """Save after BEFORE steps on one layout, load on the other, continue: equal to one process
    on the same global batches (each layout splits them over its own ranks)."""
    rank, n = world
    before, after = 5, 5
    hyper = dict(HYPER, sam_rho=0.05)
    ckpt = os.path.join(shared_dir, "opt")
    weights = os.path.join(shared_dir, "model.pt")
    first_2x2 = direction == "2x2_to_1x3"
    sub = _sub_mesh(3)  # every rank takes part in creating it
    if first_2x2:
        model = make_model()
        optimizer = ShardedNeuroOptima(model.parameters(), device_mesh=mesh_2x2(), **hyper)
        train_on(model, optimizer, range(before), rank, 4)
        save_checkpoint(optimizer, ckpt)
    elif rank < 3:
        model = make_model()
        optimizer = ShardedNeuroOptima(model.parameters(), device_mesh=sub, **hyper)
        train_on(model, optimizer, range(before), rank, 3)
        save_checkpoint(optimizer, ckpt)
    if rank == 0:
        torch.save(model.state_dict(), weights)
    dist.barrier()

    error = 0.0
    resumed = make_model(seed=42)
    if first_2x2 and rank < 3:
        resumed.load_state_dict(torch.load(weights, weights_only=True))
        fresh = ShardedNeuroOptima(resumed.parameters(), device_mesh=sub, **hyper)
        load_checkpoint(fresh, ckpt)
        train_on(resumed, fresh, range(before, before + after), rank, 3)
    elif not first_2x2:
        resumed.load_state_dict(torch.load(weights, weights_only=True))
        fresh = ShardedNeuroOptima(resumed.parameters(), device_mesh=mesh_2x2(), **hyper)
        load_checkpoint(fresh, ckpt)
        train_on(resumed, fresh, range(before, before + after), rank, 4)
    if first_2x2 and rank == 3:
        error = 0.0  # not part of the 1 x 3 layout
    else:
        reference = make_model()
        train_reference(reference, NeuroOptima(reference.parameters(), **hyper),
                        range(before + after))
        error = relative_error(resumed, reference)
    assert agree_max(error) <= TOL
