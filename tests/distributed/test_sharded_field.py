"""ShardedNeuroOptima in the loops users write: each gives the single-process (or DDP) result on
the same global batch within 1e-6 relative, or a clear error on every rank.

Run: torchrun --standalone --nproc_per_node=2 (and 3) -m pytest -q tests/distributed/test_sharded_field.py
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.distributed as dist
from torch import nn
from test_sharded_support import (agree_max, closure_for, global_batch, local_batch,
                                  loss_fn, make_model, relative_error)

from neurooptima import NeuroOptima
from neurooptima.distributed import ShardedGradScaler, ShardedNeuroOptima

STEPS = 6
TOL = 1e-6
SMALL_BUCKETS = 0.001  # several buckets: launch order and bucket boundaries are exercised
CLIP = 0.05  # well below the gradient norm of these batches, so clipping acts every step


def _plain(**extra):
    return dict(lr=3e-3, weight_decay=0.01, sam_rho=0.0, lookahead_k=3, eps=1e-2, **extra)


def _all_ranks_raise(fn, error, match):
    """``fn`` raises ``error`` on this rank; every rank checks that every rank did."""
    try:
        fn()
    except error as e:
        raised = 1.0 if re.search(match, str(e)) else 0.0
    else:
        raised = 0.0
    assert agree_max(1.0 - raised) == 0.0, f"some rank did not raise {error.__name__}({match})"


# ---------------------------------------------------------------- clipping


@pytest.mark.parametrize("buckets", [SMALL_BUCKETS, 25], ids=["buckets", "one_bucket"])
def test_clip_grad_norm_method_matches_torch_clipping_in_one_process(world, buckets):
    rank, n = world
    model = make_model(2)
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=buckets, **_plain())
    reference = make_model(2)
    ref_opt = NeuroOptima(reference.parameters(), **_plain())
    norms = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss_fn(model, *local_batch(step, rank, n)).backward()
        norm = optimizer.clip_grad_norm_(CLIP)
        optimizer.step()

        ref_opt.zero_grad()
        loss_fn(reference, *global_batch(step)).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        ref_opt.step()
        norms.append(abs(norm.item() - ref_norm.item()) / ref_norm.item())
        assert ref_norm.item() > CLIP  # clipping acted
    assert agree_max(max(norms)) <= TOL
    assert agree_max(relative_error(model, reference)) <= TOL


def test_max_grad_norm_matches_torch_clipping_in_one_process(world):
    rank, n = world
    model = make_model(3)
    optimizer = ShardedNeuroOptima(model.parameters(), max_grad_norm=CLIP, **_plain())
    reference = make_model(3)
    ref_opt = NeuroOptima(reference.parameters(), **_plain())
    for step in range(STEPS):
        optimizer.zero_grad()
        loss_fn(model, *local_batch(step, rank, n)).backward()
        optimizer.step()
        ref_opt.zero_grad()
        loss_fn(reference, *global_batch(step)).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        ref_opt.step()
    assert agree_max(relative_error(model, reference)) <= TOL


@pytest.mark.parametrize("edit", ["torch_clip", "manual_scale", "replace"])
def test_editing_p_grad_after_backward_raises_on_every_rank(world, edit):
    rank, n = world
    model = make_model(4)
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=SMALL_BUCKETS, **_plain())
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, *local_batch(0, rank, n)).backward()
    if edit == "torch_clip":
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    elif edit == "manual_scale":
        model.fc1.weight.grad.mul_(0.5)
    else:
        model.gain.grad = torch.zeros_like(model.gain)
    _all_ranks_raise(optimizer.step, RuntimeError, "changed after backward")
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # nothing moved
    # The next step works normally.
    optimizer.zero_grad()
    loss_fn(model, *local_batch(1, rank, n)).backward()
    optimizer.step()


# ---------------------------------------------------------------- loss scaling


def _reference_amp_run(steps, *, unscale, clip, inf_at=None, max_grad_norm=None):
    """One process, torch's GradScaler, on the global batch. ``inf_at``: step whose loss is
    multiplied by inf on one rank's share of the batch."""
    model = make_model(5)
    optimizer = NeuroOptima(model.parameters(), **_plain(max_grad_norm=max_grad_norm))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    n = dist.get_world_size()
    for step in steps:
        optimizer.zero_grad()
        losses = [loss_fn(model, *local_batch(step, r, n)) for r in range(n)]
        if step == inf_at:
            losses[n - 1] = losses[n - 1] * math.inf
        scaler.scale(sum(losses) / n).backward()
        if unscale:
            scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        scaler.step(optimizer)
        scaler.update()
    return model, optimizer, scaler


@pytest.mark.parametrize("recipe", ["unscale_then_clip", "step_only", "max_grad_norm"])
def test_sharded_grad_scaler_matches_torch_grad_scaler_in_one_process(world, recipe):
    rank, n = world
    unscale, clip = recipe == "unscale_then_clip", recipe == "unscale_then_clip"
    max_grad_norm = CLIP if recipe == "max_grad_norm" else None
    model = make_model(5)
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=SMALL_BUCKETS,
                                   **_plain(max_grad_norm=max_grad_norm))
    scaler = ShardedGradScaler("cpu", init_scale=1024.0, growth_interval=2)
    for step in range(STEPS):
        optimizer.zero_grad()
        scaler.scale(loss_fn(model, *local_batch(step, rank, n))).backward()
        if unscale:
            scaler.unscale_(optimizer)
        if clip:
            optimizer.clip_grad_norm_(CLIP)
        scaler.step(optimizer)
        scaler.update()
    reference, _, ref_scaler = _reference_amp_run(range(STEPS), unscale=unscale, clip=clip,
                                                  max_grad_norm=max_grad_norm)
    assert scaler.get_scale() == ref_scaler.get_scale() > 1024.0  # it grew, as in one process
    assert agree_max(relative_error(model, reference)) <= TOL


def test_overflow_on_one_rank_skips_the_step_and_keeps_one_scale_on_every_rank(world):
    rank, n = world
    inf_at = 2
    model = make_model(5)
    optimizer = ShardedNeuroOptima(model.parameters(), **_plain())
    scaler = ShardedGradScaler("cpu", init_scale=1024.0, growth_interval=2)
    scales, moved = [], []
    for step in range(STEPS):
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        loss = loss_fn(model, *local_batch(step, rank, n))
        if step == inf_at and rank == n - 1:
            loss = loss * math.inf
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
        moved.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
    everyone = [None] * n
    dist.all_gather_object(everyone, (scales, moved))
    assert all(e == everyone[0] for e in everyone)  # one scale and one decision on every rank
    assert scales[inf_at] == scales[inf_at - 1] / 2  # backed off once
    assert moved == [step != inf_at for step in range(STEPS)]  # only the overflow step skipped
    reference, _, ref_scaler = _reference_amp_run(range(STEPS), unscale=False, clip=False,
                                                  inf_at=inf_at)
    assert scales[-1] == ref_scaler.get_scale()
    assert agree_max(relative_error(model, reference)) <= TOL
    # As torch's GradScaler with any optimizer: an overflow skips the step without counting it
    # among the non-finite skips of the optimizer itself.
    assert optimizer.param_groups[0]["skipped_steps"] == 0


def test_torch_grad_scaler_is_refused_on_every_rank(world):
    rank, n = world
    model = make_model(5)
    optimizer = ShardedNeuroOptima(model.parameters(), **_plain())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(loss_fn(model, *local_batch(0, rank, n))).backward()
    _all_ranks_raise(lambda: scaler.step(optimizer), RuntimeError, "ShardedGradScaler")


def test_clip_before_unscale_is_refused(world):
    rank, n = world
    model = make_model(5)
    optimizer = ShardedNeuroOptima(model.parameters(), **_plain())
    scaler = ShardedGradScaler("cpu", init_scale=1024.0)
    scaler.scale(loss_fn(model, *local_batch(0, rank, n))).backward()
    optimizer.clip_grad_norm_(CLIP)
    _all_ranks_raise(lambda: scaler.step(optimizer), RuntimeError, "unscale_")


# ---------------------------------------------------------------- frozen and unused parameters


def _freeze_schedule(model, step):
    """fc1 frozen for the first two steps, then trained; gain frozen from step 4 on."""
    model.fc1.requires_grad_(step >= 2)
    model.gain.requires_grad_(step < 4)


@pytest.mark.parametrize("sam_rho", [0.0, 0.05], ids=["plain", "sam"])
def test_requires_grad_changes_after_construction_are_followed(world, sam_rho):
    rank, n = world
    hyper = _plain()
    hyper["sam_rho"] = sam_rho
    model = make_model(7)
    _freeze_schedule(model, 0)
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=SMALL_BUCKETS, **hyper)
    reference = make_model(7)
    _freeze_schedule(reference, 0)
    ref_opt = NeuroOptima(reference.parameters(), **hyper)
    start = model.fc1.weight.detach().clone()
    for step in range(STEPS):
        for m, opt, batch in ((model, optimizer, local_batch(step, rank, n)),
                              (reference, ref_opt, global_batch(step))):
            _freeze_schedule(m, step)
            opt.step(closure_for(m, opt, *batch))
    assert not torch.equal(model.fc1.weight, start)  # the unfrozen layer trained
    assert agree_max(relative_error(model, reference)) <= TOL


class BranchNet(nn.Module):
    """A head used only by some ranks' batches, and one never used at all."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.body = nn.Linear(33, 5)
        self.head = nn.Linear(5, 5)
        self.never = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor, use_head: bool) -> torch.Tensor:
        out = self.body(x)
        return self.head(torch.tanh(out)) if use_head else out


@pytest.mark.parametrize("buckets", [SMALL_BUCKETS, 25], ids=["own_buckets", "one_bucket"])
@pytest.mark.parametrize("sam_rho", [0.0, 0.05], ids=["plain", "sam"])
def test_parameters_used_on_some_ranks_get_the_mean_with_zeros(world, buckets, sam_rho):
    rank, n = world
    hyper = _plain()
    hyper["sam_rho"] = sam_rho

    def uses_head(step, r):
        return (step + r) % 2 == 0

    model = BranchNet()
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=buckets, **hyper)
    reference = BranchNet()
    ref_opt = NeuroOptima(reference.parameters(), **hyper)
    never = model.never.weight.detach().clone()
    for step in range(STEPS):
        def closure(step=step):
            optimizer.zero_grad()
            x, y = local_batch(step, rank, n)
            loss = nn.functional.mse_loss(model(x, uses_head(step, rank)), y)
            loss.backward()
            return loss

        def ref_closure(step=step):
            ref_opt.zero_grad()
            losses = []
            for r in range(n):
                x, y = local_batch(step, r, n)
                losses.append(nn.functional.mse_loss(reference(x, uses_head(step, r)), y))
            loss = sum(losses) / n
            loss.backward()
            return loss
        optimizer.step(closure)
        ref_opt.step(ref_closure)
    assert torch.equal(model.never.weight, never)  # no rank used it: not updated
    assert agree_max(relative_error(model, reference)) <= TOL


def test_a_rank_without_any_gradient_still_joins(world):
    """One rank runs no backward at all in a step: the others' gradients still arrive."""
    rank, n = world
    if n < 2:
        pytest.skip("needs a rank that runs no backward beside one that does")
    model = make_model(8)
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=SMALL_BUCKETS, **_plain())
    reference = make_model(8)
    ref_opt = NeuroOptima(reference.parameters(), **_plain())
    for step in range(3):
        optimizer.zero_grad()
        if rank != n - 1:
            loss_fn(model, *local_batch(step, rank, n)).backward()
        optimizer.step()
        ref_opt.zero_grad()
        (sum(loss_fn(reference, *local_batch(step, r, n)) for r in range(n - 1)) / n).backward()
        ref_opt.step()
    assert agree_max(relative_error(model, reference)) <= TOL


# ---------------------------------------------------------------- module buffers


class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.fc1 = nn.Linear(33, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.mark.parametrize("sam_rho", [0.0, 0.05], ids=["plain", "sam"])
def test_batchnorm_buffers_follow_ddp(world, sam_rho):
    rank, n = world
    hyper = _plain()
    hyper["sam_rho"] = sam_rho
    model = NormNet()
    optimizer = ShardedNeuroOptima(model.parameters(), module=model, **hyper)
    reference = NormNet()
    ddp = nn.parallel.DistributedDataParallel(reference)
    ref_opt = NeuroOptima(ddp.parameters(), **hyper)
    for step in range(STEPS):
        x, y = local_batch(step, rank, n)
        for m, opt in ((model, optimizer), (ddp, ref_opt)):
            opt.step(closure_for(m, opt, x, y))
    errors = [relative_error(model, reference)]
    for b, ref in zip(model.buffers(), reference.buffers()):
        if b.is_floating_point():
            errors.append(((b - ref).norm() / ref.norm()).item())
        else:
            assert torch.equal(b, ref)
    assert agree_max(max(errors)) <= TOL


def test_buffer_broadcast_can_be_switched_off(world):
    rank, n = world
    if n < 2:
        pytest.skip("needs two ranks whose statistics could differ")
    model = NormNet()
    optimizer = ShardedNeuroOptima(model.parameters(), module=model, broadcast_buffers=False,
                                   **_plain())
    for step in range(2):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(local_batch(step, rank, n)[0]),
                               local_batch(step, rank, n)[1]).backward()
        optimizer.step()
    mean = model.bn.running_mean.clone()
    everyone = [torch.zeros_like(mean) for _ in range(n)]
    dist.all_gather(everyone, mean)
    assert not torch.equal(everyone[0], everyone[-1])  # each rank kept its own statistics


# ---------------------------------------------------------------- checkpoints from elsewhere


class WideNet(nn.Module):
    """UnevenNet's parameter count and names, another hidden width."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(33, 19)
        self.fc2 = nn.Linear(19, 5)
        self.gain = nn.Parameter(torch.tensor([1.5, 0.5]))


def _trained_state(model_cls, hyper, steps=2):
    model = model_cls()
    optimizer = NeuroOptima(model.parameters(), **hyper)
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 0.1
    for _ in range(steps):
        optimizer.step()
    return optimizer.state_dict()


def test_full_state_dict_from_another_model_is_refused_whole(world):
    rank, n = world
    hyper = _plain()
    model = make_model(0)
    optimizer = ShardedNeuroOptima(model.parameters(), **hyper)
    for step in range(2):
        optimizer.zero_grad()
        loss_fn(model, *local_batch(step, rank, n)).backward()
        optimizer.step()
    before = optimizer.state_dict()
    wide = _trained_state(WideNet, hyper)
    _all_ranks_raise(lambda: optimizer.load_state_dict(wide), ValueError,
                     r"parameter 1:.*\(19, 33\).*\(17, 33\)")
    after = optimizer.state_dict()
    for index, entry in before["state"].items():  # nothing half-loaded
        for key, value in entry.items():
            assert torch.equal(value, after["state"][index][key])


def test_full_state_dict_of_another_rule_is_refused(world):
    model = make_model(0)
    optimizer = ShardedNeuroOptima(model.parameters(), **_plain())
    saved = _trained_state(lambda: make_model(0), _plain())
    saved["param_groups"][0]["update"] = "lion"  # buffers of adan, settings of lion
    _all_ranks_raise(lambda: optimizer.load_state_dict(saved), ValueError,
                     r"saved with update=.lion.*update=.adan.")


# ---------------------------------------------------------------- prefetched weight all-gather


@pytest.mark.parametrize("sam_rho", [0.0, 0.05], ids=["plain", "sam"])
def test_prefetched_weight_gather_gives_the_same_run(world, sam_rho):
    """overlap_param_gather=True: step() returns with the all-gathers in flight and each
    submodule's forward waits for its own weights; the run is bitwise the plain one."""
    rank, n = world
    hyper = _plain()
    hyper["sam_rho"] = sam_rho
    runs = []
    for overlap in (False, True):
        model = NormNet()
        optimizer = ShardedNeuroOptima(model.parameters(), module=model, bucket_cap_mb=0.001,
                                       overlap_param_gather=overlap, **hyper)
        for step in range(STEPS):
            optimizer.step(closure_for(model, optimizer, *local_batch(step, rank, n)))
            if overlap and step == 1:  # (the first step ends by laying out the buckets anew)
                assert optimizer._weights._pending  # still in flight after step()
        state = model.state_dict()  # waits for the last gathers
        runs.append(state)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_prefetched_weight_gather_needs_the_module(world):
    model = make_model(1)
    with pytest.raises(ValueError, match="overlap_param_gather=True needs module"):
        ShardedNeuroOptima(model.parameters(), overlap_param_gather=True, **_plain())


# ---------------------------------------------------------------- bucket order


class ShuffledNet(nn.Module):
    """Declared in another order than the forward uses its layers, so reverse declaration
    order is not the order backward produces the gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.last = nn.Linear(16, 5)
        self.first = nn.Linear(33, 16)
        self.middle = nn.Linear(16, 16)

    def forward(self, x):
        return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))


def test_buckets_follow_the_order_gradients_become_ready(world):
    rank, n = world
    model = ShuffledNet()
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=0.001, **_plain())
    reference = ShuffledNet()
    ref_opt = NeuroOptima(reference.parameters(), **_plain())
    before = [[s.index for s in b.slots] for b in optimizer._buckets]
    for step in range(STEPS):
        for m, opt, batch in ((model, optimizer, local_batch(step, rank, n)),
                              (reference, ref_opt, global_batch(step))):
            opt.zero_grad()
            nn.functional.mse_loss(m(batch[0]), batch[1]).backward()
            opt.step()
    after = [s.index for b in optimizer._buckets for s in b.slots]
    # Backward produces last (0, 1), then middle (4, 5), then first (2, 3); within a layer
    # the autograd engine may run weight or bias first.
    assert [set(after[i:i + 2]) for i in (0, 2, 4)] == [{0, 1}, {4, 5}, {2, 3}]
    assert [s for b in before for s in b] != after
    assert agree_max(relative_error(model, reference)) <= TOL


def test_sam_with_sharded_grad_scaler_two_phase_matches_one_process(world):
    """SAM's two passes by hand with a loss scaler (torch's scalers take no closure): the
    perturbation does not depend on the scale, and the update sees the unscaled gradient."""
    rank, n = world
    hyper = dict(_plain(), sam_rho=0.05, max_grad_norm=CLIP)

    def run(model, optimizer, scaler, batches):
        for x, y in batches:
            optimizer.zero_grad()
            scaler.scale(loss_fn(model, x, y)).backward()
            optimizer.first_step(zero_grad=True)
            scaler.scale(loss_fn(model, x, y)).backward()
            scaler.step(optimizer)
            scaler.update()

    model = make_model(10)
    run(model, ShardedNeuroOptima(model.parameters(), **hyper),
        ShardedGradScaler("cpu", init_scale=1024.0, growth_interval=2),
        [local_batch(step, rank, n) for step in range(STEPS)])
    reference = make_model(10)
    run(reference, NeuroOptima(reference.parameters(), **hyper),
        torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2),
        [global_batch(step) for step in range(STEPS)])
    assert agree_max(relative_error(model, reference)) <= TOL


def test_accumulation_in_no_sync_with_clipping_matches_one_process(world):
    """Two micro-batches per step, the first inside no_sync(), then clip_grad_norm_."""
    rank, n = world
    model = make_model(11)
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=SMALL_BUCKETS, **_plain())
    reference = make_model(11)
    ref_opt = NeuroOptima(reference.parameters(), **_plain())
    for step in range(STEPS):
        x, y = local_batch(step, rank, n)
        optimizer.zero_grad()
        half = len(x) // 2
        with optimizer.no_sync():
            (loss_fn(model, x[:half], y[:half]) / 2).backward()
        (loss_fn(model, x[half:], y[half:]) / 2).backward()
        optimizer.clip_grad_norm_(CLIP)
        optimizer.step()

        ref_opt.zero_grad()
        losses = []
        for r in range(n):
            xr, yr = local_batch(step, r, n)
            losses += [loss_fn(reference, xr[:half], yr[:half]) / 2,
                       loss_fn(reference, xr[half:], yr[half:]) / 2]
        (sum(losses) / n).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        ref_opt.step()
    assert agree_max(relative_error(model, reference)) <= TOL
