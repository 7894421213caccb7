"""ShardedNeuroOptima equals single-process NeuroOptima on the concatenated global batch.

Run: torchrun --standalone --nproc_per_node=2 -m pytest -q tests/distributed/test_sharded_equivalence.py
(and with --nproc_per_node=3: padding and uneven chunks on every parameter).
"""

from __future__ import annotations

import pytest
import torch
from test_sharded_support import (agree_max, closure_for, global_batch, local_batch, loss_fn,
                                  make_model, relative_error, train_reference, train_sharded)

from neurooptima import NeuroOptima
from neurooptima.distributed import ShardedNeuroOptima

STEPS = 20
TOL = 1e-6
BF16_TOL = 1e-4
# A small cap gives several buckets, so overlap and bucket boundaries are exercised.
SMALL_BUCKETS = 0.001


@pytest.mark.parametrize("sam_rho", [0.0, 0.05], ids=["plain", "sam_global"])
@pytest.mark.parametrize("update", ["adan", "lion", "lion_adan"])
def test_matches_single_process(world, update, sam_rho):
    rank, n = world
    # A large eps makes Adan's step depend on the gradient's scale, not only its direction.
    hyper = dict(lr=3e-3, weight_decay=0.01, sam_rho=sam_rho, lookahead_k=3,
                 lookahead_alpha=0.5, update=update, eps=1e-2)
    model = make_model()
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=SMALL_BUCKETS, **hyper)
    train_sharded(model, optimizer, range(STEPS), rank, n)
    reference = make_model()
    train_reference(reference, NeuroOptima(reference.parameters(), **hyper), range(STEPS))
    assert agree_max(relative_error(model, reference)) <= TOL


def test_reduced_gradient_chunks_are_the_global_mean(world):
    """After the reduce-scatter each rank holds its chunk of the global-batch gradient."""
    rank, n = world
    model = make_model(6)
    optimizer = ShardedNeuroOptima(model.parameters(), sam_rho=0.0, bucket_cap_mb=SMALL_BUCKETS)
    loss_fn(model, *local_batch(0, rank, n)).backward()
    optimizer._finish_reduction()
    reference = make_model(6)
    loss_fn(reference, *global_batch(0)).backward()
    errors = []
    for p, ref in zip(model.parameters(), reference.parameters()):
        chunk = optimizer.chunk_of(p)
        flat = torch.zeros(n * chunk.numel())
        flat[:ref.numel()] = ref.grad.reshape(-1)
        expected = flat[rank * chunk.numel():(rank + 1) * chunk.numel()]
        errors.append(((chunk.grad - expected).norm() / ref.grad.norm()).item())
    optimizer.zero_grad()
    assert agree_max(max(errors)) <= TOL


def test_asam_clipping_groups_maximize_two_phase(world):
    """ASAM, clipping, two param groups, maximize and no_prox, driven by the two-phase API."""
    rank, n = world
    hyper = dict(sam_rho=0.1, sam_adaptive=True, max_grad_norm=0.05, no_prox=True,
                 maximize=True, weight_decay=0.02, lookahead_k=4)

    def groups(model):
        return [{"params": model.fc1.parameters(), "lr": 2e-3},
                {"params": [*model.fc2.parameters(), model.gain], "lr": 1e-3}]

    def neg_loss(model, x, y):
        return -loss_fn(model, x, y)

    model = make_model(1)
    optimizer = ShardedNeuroOptima(groups(model), **hyper)
    for step in range(STEPS):
        x, y = local_batch(step, rank, n)
        optimizer.zero_grad()
        neg_loss(model, x, y).backward()
        optimizer.first_step()
        optimizer.zero_grad()
        neg_loss(model, x, y).backward()
        optimizer.second_step()
    reference = make_model(1)
    ref_opt = NeuroOptima(groups(reference), **hyper)
    for step in range(STEPS):
        x, y = global_batch(step)

        def closure():
            ref_opt.zero_grad()
            loss = neg_loss(reference, x, y)
            loss.backward()
            return loss
        ref_opt.step(closure)
    assert agree_max(relative_error(model, reference)) <= TOL


def test_no_sync_accumulation(world):
    """Two micro-batches per step, the first inside no_sync(): same as the whole batch."""
    rank, n = world
    hyper = dict(lr=3e-3, sam_rho=0.0, lookahead_k=2)
    model = make_model(2)
    optimizer = ShardedNeuroOptima(model.parameters(), **hyper)
    for step in range(STEPS):
        x, y = local_batch(step, rank, n)
        half = len(x) // 2
        optimizer.zero_grad()
        with optimizer.no_sync():
            (loss_fn(model, x[:half], y[:half]) / 2).backward()
        (loss_fn(model, x[half:], y[half:]) / 2).backward()
        optimizer.step()
    reference = make_model(2)
    train_reference(reference, NeuroOptima(reference.parameters(), **hyper), range(STEPS))
    assert agree_max(relative_error(model, reference)) <= TOL


def test_non_finite_gradient_skips_on_every_rank(world):
    """An inf in one rank's data skips the step everywhere, as on the global batch."""
    rank, n = world
    hyper = dict(lr=3e-3, sam_rho=0.05)
    bad_step = 3

    def batch(step, x, y):
        if step == bad_step:
            x = x.clone()
            x[-1, 0] = float("inf")  # the last rank's last sample
        return x, y

    model = make_model(3)
    optimizer = ShardedNeuroOptima(model.parameters(), **hyper)
    for step in range(6):
        x, y = batch(step, *global_batch(step))
        per = len(x) // n
        optimizer.step(closure_for(model, optimizer, x[rank * per:(rank + 1) * per],
                                   y[rank * per:(rank + 1) * per]))
    reference = make_model(3)
    ref_opt = NeuroOptima(reference.parameters(), **hyper)
    for step in range(6):
        ref_opt.step(closure_for(reference, ref_opt, *batch(step, *global_batch(step))))
    skipped = optimizer.param_groups[0]["skipped_steps"]
    assert agree_max(relative_error(model, reference)) <= TOL
    assert skipped == ref_opt.param_groups[0]["skipped_steps"] == 1


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_local_matches_per_replica_reference(world, adaptive):
    """sam_mode="local": each replica perturbs with its own gradient and norm."""
    rank, n = world
    rho, eta = 0.05, 0.01
    hyper = dict(lr=3e-3, weight_decay=0.01, lookahead_k=3, sam_adaptive=adaptive,
                 sam_eta=eta)
    model = make_model(4)
    optimizer = ShardedNeuroOptima(model.parameters(), sam_mode="local", sam_rho=rho, **hyper)
    train_sharded(model, optimizer, range(STEPS), rank, n)

    # Reference: every replica simulated here; SAM written out from the paper's equations.
    reference = make_model(4)
    params = list(reference.parameters())
    ref_opt = NeuroOptima(params, sam_rho=0.0, **hyper)
    for step in range(STEPS):
        total = [torch.zeros_like(p) for p in params]
        for replica in range(n):
            x, y = local_batch(step, replica, n)
            ref_opt.zero_grad()
            loss_fn(reference, x, y).backward()
            with torch.no_grad():
                origin = [p.clone() for p in params]
                scale = [(p.abs() + eta) if adaptive else torch.ones_like(p) for p in params]
                norm = torch.sqrt(sum(((s * p.grad) ** 2).sum()
                                      for s, p in zip(scale, params)))
                for s, p in zip(scale, params):
                    p.add_(rho * s * s * p.grad / (norm + 1e-12))
            ref_opt.zero_grad()
            loss_fn(reference, x, y).backward()
            with torch.no_grad():
                for t, p, o in zip(total, params, origin):
                    t.add_(p.grad)
                    p.copy_(o)
        for p, t in zip(params, total):
            p.grad = t / n
        ref_opt.step()
    assert agree_max(relative_error(model, reference)) <= TOL


def test_sam_local_differs_from_global(world):
    """The two modes are different algorithms (guards against a mode switch doing nothing)."""
    rank, n = world
    if n == 1:
        pytest.skip("one rank: local and global SAM coincide")
    weights = []
    for mode in ("global", "local"):
        model = make_model(5)
        optimizer = ShardedNeuroOptima(model.parameters(), sam_mode=mode, sam_rho=0.2, lr=1e-2)
        train_sharded(model, optimizer, range(3), rank, n)
        weights.append(model)
    assert agree_max(-relative_error(*weights)) < -1e-4


def test_lr_scheduler_drives_the_sharded_update(world):
    rank, n = world
    hyper = dict(lr=1e-2, sam_rho=0.05, update="lion")

    def schedule(step):
        return 0.5 ** step

    model = make_model(7)
    optimizer = ShardedNeuroOptima(model.parameters(), **hyper)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    reference = make_model(7)
    ref_opt = NeuroOptima(reference.parameters(), **hyper)
    ref_scheduler = torch.optim.lr_scheduler.LambdaLR(ref_opt, schedule)
    for step in range(6):
        train_sharded(model, optimizer, range(step, step + 1), rank, n)
        scheduler.step()
        train_reference(reference, ref_opt, range(step, step + 1))
        ref_scheduler.step()
    assert optimizer.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 1e-2 * 0.5 ** 6
    assert agree_max(relative_error(model, reference)) <= TOL


@pytest.mark.parametrize("update", ["adan", "lion"])
def test_fused_chunks_match_single_process(world, update):
    """fused=True runs the compiled kernel on each bucket's chunks, in place (never moved)."""
    rank, n = world
    hyper = dict(lr=3e-3, weight_decay=0.01, sam_rho=0.05, lookahead_k=3, update=update,
                 eps=1e-2)
    model = make_model()
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=SMALL_BUCKETS, fused=True,
                                   **hyper)
    train_sharded(model, optimizer, range(STEPS), rank, n)
    # The chunks the optimizer updates are still views of the buffers the all-gather sends
    # (the buckets' own, as rebuilt after the first step in the gradients' order).
    owned_ptrs = {b.owned.untyped_storage().data_ptr() for b in optimizer._buckets}
    in_place = all(optimizer.chunk_of(p).untyped_storage().data_ptr() in owned_ptrs
                   for p in model.parameters())
    reference = make_model()
    train_reference(reference, NeuroOptima(reference.parameters(), foreach=True, **hyper),
                    range(STEPS))
    error = agree_max(relative_error(model, reference))
    assert agree_max(0.0 if in_place else 1.0) == 0.0, "a chunk was moved out of its bucket"
    assert error <= TOL


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_bf16_state_matches_single_process(world, fused):
    """state_dtype=bfloat16: each rank keeps its chunks of the buffers in bfloat16, and the run
    follows single-process NeuroOptima with the same state dtype."""
    rank, n = world
    hyper = dict(lr=3e-3, weight_decay=0.01, sam_rho=0.05, lookahead_k=3, update="adan",
                 eps=1e-2, state_dtype=torch.bfloat16)
    model = make_model()
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=SMALL_BUCKETS,
                                   fused=fused, **hyper)
    train_sharded(model, optimizer, range(STEPS), rank, n)
    dtypes = {value.dtype for entry in optimizer.local_optimizer.state.values()
              for key, value in entry.items() if key.startswith("adan.")}
    reference = make_model()
    train_reference(reference, NeuroOptima(reference.parameters(), foreach=True, **hyper),
                    range(STEPS))
    assert dtypes <= {torch.bfloat16}
    # Both round the same float32 math to bfloat16; the reduced gradients differ from the
    # single-process ones in the last bits, which can move a rounding by one bfloat16 step.
    assert agree_max(relative_error(model, reference)) <= BF16_TOL
