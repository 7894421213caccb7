"""Momentum ascent and scheduled SAM on the sharded backends equal one process on the global
batch: ShardedNeuroOptima (2 and 3 ranks, a 2 x 2 mesh on 4), FSDP2 through ``for_fsdp``.

Run: torchrun --standalone --nproc_per_node=2 -m pytest -q tests/distributed/test_sam_forms_multirank.py
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh
from test_sharded_support import (agree_max, closure_for, local_batch, make_model,
                                  relative_error, train_reference, train_sharded)

from neurooptima import NeuroOptima
from neurooptima.distributed import ShardedNeuroOptima

STEPS = 10
TOL = 1e-6
MSAM = dict(sam_ascent="momentum", sam_rho=1.5, sam_warmup=2, lr=3e-3, lookahead_k=3, eps=1e-2)


def _gap(model, before) -> float:
    return sum(float(((p.detach().double() - b.double()) ** 2).sum())
               for p, b in zip(model.parameters(), before)) ** 0.5


@pytest.mark.parametrize("update", ["adan", "lion", "lion_adan"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_momentum_ascent_matches_single_process(world, update, fused):
    rank, n = world
    hyper = dict(MSAM, update=update, fused=fused, max_grad_norm=0.5)
    model = make_model()
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=0.001, **hyper)
    calls = 0

    for step in range(STEPS):
        x, y = local_batch(step, rank, n)
        inner = closure_for(model, optimizer, x, y)

        def counted():
            nonlocal calls
            calls += 1
            return inner()
        optimizer.step(counted)
    assert calls == STEPS  # one gradient a step
    reference = make_model()
    ref_opt = NeuroOptima(reference.parameters(), **hyper)
    train_reference(reference, ref_opt, range(STEPS))
    assert agree_max(relative_error(model, reference)) <= TOL  # both at w~
    ascent = [p.detach().clone() for p in model.parameters()]
    optimizer.eval()
    ref_opt.eval()
    assert agree_max(relative_error(model, reference)) <= TOL  # both at w
    # ||w~ - w|| = rho over the whole model, whatever the number of ranks.
    assert agree_max(abs(_gap(model, ascent) - 1.5)) <= 1.5 * TOL
    with pytest.raises(RuntimeError, match="optimizer.train"):
        optimizer.step(closure_for(model, optimizer, *local_batch(0, rank, n)))
    optimizer.train()
    assert all(torch.equal(a, p) for a, p in zip(ascent, model.parameters()))


def test_momentum_ascent_without_closure_and_state_dict_round_trip(world):
    rank, n = world
    model = make_model()
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=0.001, **MSAM)
    for step in range(4):
        optimizer.zero_grad()
        x, y = local_batch(step, rank, n)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    optimizer.eval()
    saved = optimizer.state_dict()  # in eval mode: the model holds w, the state keeps w~
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert saved["param_groups"][0]["ascent_eval"] is True
    optimizer.train()
    train_sharded(model, optimizer, range(4, 8), rank, n)
    # A fresh model and optimizer from the eval-mode checkpoint follow the same trajectory.
    resumed = make_model(1)
    resumed.load_state_dict(weights)
    again = ShardedNeuroOptima(resumed.parameters(), bucket_cap_mb=0.001, **MSAM)
    again.load_state_dict(saved)
    again.train()
    train_sharded(resumed, again, range(4, 8), rank, n)
    assert agree_max(relative_error(resumed, model)) == 0.0
    # The full state dict loads into one process too, and continues on the global batch.
    single = make_model(1)
    single.load_state_dict(weights)
    one = NeuroOptima(single.parameters(), **MSAM)
    one.load_state_dict(saved)
    one.train()
    train_reference(single, one, range(4, 8))
    assert agree_max(relative_error(single, model)) <= TOL


@pytest.mark.parametrize("schedule", [dict(sam_interval=2), dict(sam_start=4)],
                         ids=["every-2nd", "late"])
def test_scheduled_sam_matches_single_process(world, schedule):
    rank, n = world
    hyper = dict(lr=3e-3, sam_rho=0.05, eps=1e-2, **schedule)
    model = make_model()
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=0.001, **hyper)
    train_sharded(model, optimizer, range(STEPS), rank, n)
    reference = make_model()
    train_reference(reference, NeuroOptima(reference.parameters(), **hyper), range(STEPS))
    assert agree_max(relative_error(model, reference)) <= TOL


@pytest.mark.four_ranks
def test_momentum_ascent_on_a_2x2_mesh(world):
    rank, n = world
    mesh = DeviceMesh("cpu", torch.arange(4).view(2, 2), mesh_dim_names=("replicate", "shard"))
    model = make_model()
    optimizer = ShardedNeuroOptima(model.parameters(), device_mesh=mesh, bucket_cap_mb=0.001,
                                   **MSAM)
    train_sharded(model, optimizer, range(STEPS), rank, n)
    reference = make_model()
    ref_opt = NeuroOptima(reference.parameters(), **MSAM)
    train_reference(reference, ref_opt, range(STEPS))
    assert agree_max(relative_error(model, reference)) <= TOL
    ascent = [p.detach().clone() for p in model.parameters()]
    optimizer.eval()
    # The norm sums over the shard axis only: replicas hold equal chunks.
    assert agree_max(abs(_gap(model, ascent) - 1.5)) <= 1.5 * TOL


@pytest.mark.parametrize("form", [MSAM, dict(sam_rho=0.05, sam_interval=2, sam_start=3)],
                         ids=["momentum", "scheduled"])
def test_fsdp2_matches_single_process(world, form):
    from fsdp_support import batch, local_slice, make_net
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from neurooptima.distributed.fsdp import for_fsdp

    rank, size = world
    hyper = dict(form, lookahead_k=0)
    net = make_net()
    fully_shard(net.block)
    fully_shard(net)
    opt = for_fsdp(NeuroOptima(net.parameters(), **hyper), net)
    ref = make_net()
    ref_opt = NeuroOptima(ref.parameters(), **hyper)
    for step in range(6):
        x, y = batch(step)
        opt.step(closure_for(net, opt, local_slice(x, rank, size), local_slice(y, rank, size)))
        ref_opt.step(closure_for(ref, ref_opt, x, y))
    opt.eval()
    ref_opt.eval()
    errors = [((p.full_tensor() if isinstance(p, DTensor) else p).detach() - q.detach()).norm()
              / q.detach().norm() for p, q in zip(net.parameters(), ref.parameters())]
    assert agree_max(max(float(e) for e in errors)) <= 1e-5


@pytest.mark.multi_rank
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_fsdp1_momentum_ascent_matches_single_process(world, adaptive):
    from fsdp_support import batch, local_slice, make_net
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from neurooptima.distributed.fsdp import for_fsdp

    rank, size = world
    hyper = dict(MSAM, sam_adaptive=adaptive, sam_rho=0.5 if adaptive else 1.5)
    kw = dict(use_orig_params=True, device_id=torch.device("cpu"))
    net = make_net()
    net.block = FSDP(net.block, **kw)
    model = FSDP(net, **kw)
    opt = for_fsdp(NeuroOptima(model.parameters(), **hyper), model)
    ref = make_net()
    ref_opt = NeuroOptima(ref.parameters(), **hyper)
    for step in range(6):
        x, y = batch(step)
        opt.step(closure_for(model, opt, local_slice(x, rank, size), local_slice(y, rank, size)))
        ref_opt.step(closure_for(ref, ref_opt, x, y))
    opt.eval()
    ref_opt.eval()
    with FSDP.summon_full_params(model, writeback=False):
        full = [p.detach().clone() for p in model.parameters()]
    errors = [((p - q.detach()).norm() / q.detach().norm()).item()
              for p, q in zip(full, ref.parameters())]
    assert agree_max(max(errors)) <= 1e-5
