"""Errors of ShardedNeuroOptima reach every rank: bad settings, mismatches, a rank that raises."""

from __future__ import annotations

import datetime
import re
import time

import pytest
import torch
import torch.distributed as dist
from test_sharded_support import local_batch, make_model, train_sharded

from neurooptima.distributed import ShardedNeuroOptima


@pytest.mark.parametrize("kwargs, message", [
    (dict(sam_mode="sharp"), "sam_mode must be one of 'global', 'local'"),
    (dict(bucket_cap_mb=0), "bucket_cap_mb must be a number > 0"),
    (dict(timeout=-1), "timeout must be None, a positive number"),
    (dict(lr=-1.0), "lr must be >= 0"),
    (dict(master_weights="yes"), "master_weights must be True or False"),
    (dict(reduce_dtype=torch.int32), "reduce_dtype must be None or a floating-point"),
    (dict(overlap_param_gather=True), "overlap_param_gather=True needs module"),
    (dict(process_group=dist.group.WORLD, device_mesh="mesh"),
     "pass either process_group or device_mesh"),
])
def test_bad_arguments_name_the_argument(world, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShardedNeuroOptima(make_model().parameters(), **kwargs)


def test_mismatched_hyperparameters_raise_on_every_rank(world):
    rank, n = world
    if n == 1:
        pytest.skip("needs two ranks")
    with pytest.raises(ValueError, match=r"differ: param group 0 lr: rank 0 has 0\.001, "
                                         r"rank 1 has 0\.002"):
        ShardedNeuroOptima(make_model().parameters(), lr=0.001 * (1 + min(rank, 1)))
    with pytest.raises(ValueError, match="sam_mode: rank 0 has 'global', rank 1 has 'local'"):
        ShardedNeuroOptima(make_model().parameters(), sam_mode="global" if rank == 0 else "local")


def test_mismatched_models_raise_on_every_rank(world):
    rank, n = world
    if n == 1:
        pytest.skip("needs two ranks")
    model = make_model()
    params = list(model.parameters())
    if rank == 1:
        params = params[:-1]
    with pytest.raises(ValueError, match="param group 0 parameter count: rank 0 has 5, "
                                         "rank 1 has 4"):
        ShardedNeuroOptima(params)


@pytest.mark.parametrize("named", [True, False], ids=["module", "no_module"])
def test_requires_grad_differing_on_one_rank_raises_at_construction(world, named):
    """Every rank raises at once, naming the parameter and the ranks, with a 60 s timeout:
    otherwise the ranks would expect different gradient buckets and wait out the timeout."""
    rank, n = world
    if n == 1:
        pytest.skip("needs two ranks")
    model = make_model()
    model.fc2.weight.requires_grad_(rank != n - 1)
    name = "parameter 3 (fc2.weight)" if named else "parameter 3"  # gain comes first
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"param group 0 {re.escape(name)} requires_grad: "
                                         rf"rank 0 has True, rank {n - 1} has False"):
        ShardedNeuroOptima(model.parameters(), timeout=60, module=model if named else None)
    elapsed = time.monotonic() - start
    everyone = [None] * n
    dist.all_gather_object(everyone, elapsed)
    assert max(everyone) < 5, everyone


@pytest.mark.four_ranks
def test_a_mismatch_on_a_mesh_raises_on_every_rank(world):
    """2 x 2 mesh: rank 3 differs, and ranks 0 and 3 share no mesh group; all four raise."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, n = world
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = make_model()
    model.gain.requires_grad_(rank != 3)
    with pytest.raises(ValueError, match=r"parameter 0 requires_grad: rank 0 has True, "
                                         r"rank 3 has False"):
        ShardedNeuroOptima(model.parameters(), device_mesh=mesh)


def test_construction_makes_initial_weights_identical(world):
    rank, n = world
    model = make_model(seed=rank)  # every rank starts from different weights
    ShardedNeuroOptima(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(n)]
    dist.all_gather(gathered, flat)
    reference = torch.cat([p.detach().reshape(-1) for p in make_model(seed=0).parameters()])
    assert all(torch.equal(g, reference) for g in gathered)


def test_rank_raising_mid_step_fails_every_rank_in_bounded_time(world):
    """The last rank raises inside the second SAM pass; every other rank raises within 60 s.

    The raising rank stays alive (a crashed process would close its sockets, which gloo reports
    at once), so the others must rely on the optimizer's own timeout. The run uses its own
    group: gloo gives it separate connections, so its stuck collective cannot touch the
    session's group, and the group's short timeout clears that collective soon after.
    """
    rank, n = world
    if n == 1:
        pytest.skip("needs two ranks")
    group = dist.new_group(list(range(n)), timeout=datetime.timedelta(seconds=15))
    model = make_model()
    optimizer = ShardedNeuroOptima(model.parameters(), process_group=group, sam_rho=0.05,
                                   timeout=2)
    train_sharded(model, optimizer, range(2), rank, n)
    x, y = local_batch(2, rank, n)
    calls = []

    def closure():
        optimizer.zero_grad()
        calls.append(1)
        if rank == n - 1 and len(calls) == 2:
            raise ValueError("data loader failed on this rank")
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    start = time.monotonic()
    try:
        optimizer.step(closure)
        seen = {"error": None}
    except Exception as error:  # record what this rank saw; assert after all ranks report
        seen = {"error": type(error).__name__, "message": str(error),
                "elapsed": time.monotonic() - start}
    optimizer.remove_hooks()
    reports: list = [None] * n
    dist.all_gather_object(reports, seen)
    for r, report in enumerate(reports):
        if r == n - 1:
            assert report["error"] == "ValueError", report
        else:
            assert report["error"] == "CollectiveError", report
            assert "another rank probably raised" in report["message"], report
            assert "timed out after 2 s" in report["message"], report
            # The optimizer's 2 s bound fired, well before the group's own 15 s.
            assert report["elapsed"] < 10, report
