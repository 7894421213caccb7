"""Native torch.optim behaviour: groups, add_param_group, schedulers, hooks, maximize, empty
and gradient-less parameters, the two-phase API, BatchNorm statistics and GradScaler."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from neurooptima import NeuroOptima, frozen_batchnorm_stats
from problems import all_equal, assert_rel_close, leaf_copies, make_closure, mlp_problem

RULES = ["adan", "lion", "lion_adan"]


def train(params, optimizer, loss_fn, steps, sign=1.0):
    for _ in range(steps):
        optimizer.step(make_closure(params, loss_fn, sign))


# ------------------------------------------------------------------------- param groups


def test_param_groups_use_their_own_hyperparameters():
    init, loss_fn = mlp_problem()
    params = leaf_copies(init)
    # sam_rho=0: under momentum ascent even an lr-0 group is held at its ascent point.
    optimizer = NeuroOptima([dict(params=params[:2], lr=0.0), dict(params=params[2:])],
                            lr=1e-2, weight_decay=0.1, sam_rho=0)
    train(params, optimizer, loss_fn, 3)
    assert all(torch.equal(p, q) for p, q in zip(params[:2], init[:2]))  # lr 0 group stays put
    assert all(not torch.equal(p, q) for p, q in zip(params[2:], init[2:]))
    assert optimizer.param_groups[0]["betas"] == (0.98, 0.92, 0.99)  # defaults resolved


def test_add_param_group_creates_slow_weights_at_add_time():
    init, loss_fn = mlp_problem()
    params = leaf_copies(init)
    optimizer = NeuroOptima(params[:2], lr=1e-2, sam_rho=0.05, lookahead_k=2)
    with torch.no_grad():
        params[2].add_(0.5)  # the new tensors' values differ from their initial ones
    at_add = [p.detach().clone() for p in params[2:]]
    optimizer.add_param_group(dict(params=params[2:], lr=3e-3, update="lion", betas=[0.9, 0.99]))
    group = optimizer.param_groups[1]
    assert group["skipped_steps"] == 0 and group["betas"] == (0.9, 0.99)
    assert group["lr"] == 3e-3 and group["sam_rho"] == 0.05  # own value, then the optimizer's
    for p, value in zip(params[2:], at_add):
        slow = optimizer.state[p]["lookahead.slow"]
        assert torch.equal(slow, value) and slow.data_ptr() != p.data_ptr()
    train(params, optimizer, loss_fn, 1)
    assert all(torch.equal(optimizer.state[p]["lookahead.slow"], v)
               for p, v in zip(params[2:], at_add))
    assert "lion.exp_avg" in optimizer.state[params[2]]  # the group's own rule


def test_step_lr_changes_the_step_size():
    # Lion without decay moves every element by exactly lr: the scheduled lr is the one used.
    p = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    optimizer = NeuroOptima([p], lr=0.5, update="lion", weight_decay=0.0, sam_rho=0.0,
                            lookahead_k=0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.25)
    target = torch.arange(1.0, 6.0, dtype=torch.float64) * 10
    for expected_lr in (0.5, 0.5, 0.125, 0.125, 0.03125):
        before = p.detach().clone()
        optimizer.zero_grad()
        ((p - target) ** 2).sum().backward()
        optimizer.step()
        scheduler.step()
        assert torch.equal((p - before).abs(), torch.full_like(p, expected_lr))


def test_one_cycle_lr_and_betas_are_used_each_step():
    # OneCycleLR moves lr and betas[0]; a run that sets the same values by hand must agree.
    init, loss_fn = mlp_problem()
    a, b = leaf_copies(init), leaf_copies(init)
    opt_a = NeuroOptima(a, lr=1e-2)
    opt_b = NeuroOptima(b, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt_a, max_lr=0.05, total_steps=8)
    lrs = set()
    for _ in range(6):
        group_a, group_b = opt_a.param_groups[0], opt_b.param_groups[0]
        group_b["lr"], group_b["betas"] = group_a["lr"], group_a["betas"]
        lrs.add(group_a["lr"])
        opt_a.step(make_closure(a, loss_fn))
        opt_b.step(make_closure(b, loss_fn))
        scheduler.step()
    assert len(lrs) == 6
    assert all_equal(a, b)


# ------------------------------------------------------------------------- hooks


def test_step_hooks_fire_once_per_step_in_both_apis():
    init, loss_fn = mlp_problem()
    params = leaf_copies(init)
    optimizer = NeuroOptima(params, lr=1e-2, sam_rho=0.05)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    closure = make_closure(params, loss_fn)
    optimizer.step(closure)
    assert calls == ["pre", "post"]
    closure()
    optimizer.first_step()
    closure()
    optimizer.second_step()
    assert calls == ["pre", "post"] * 2


def test_state_dict_hooks_fire():
    init, loss_fn = mlp_problem()
    params = leaf_copies(init)
    optimizer = NeuroOptima(params, lr=1e-2)
    train(params, optimizer, loss_fn, 1)
    calls = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("sd_pre"))
    optimizer.register_state_dict_post_hook(
        lambda opt, sd: (calls.append("sd_post"), sd.setdefault("extra", 1))[1] and sd)
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load_pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load_post"))
    state_dict = optimizer.state_dict()
    assert state_dict["extra"] == 1
    state_dict.pop("extra")
    optimizer.load_state_dict(state_dict)
    assert calls == ["sd_pre", "sd_post", "load_pre", "load_post"]


# ------------------------------------------------------------------------- maximize, edge params


@pytest.mark.parametrize("update", RULES)
def test_maximize_equals_minimizing_the_negated_loss(update):
    init, loss_fn = mlp_problem()
    a, b = leaf_copies(init), leaf_copies(init)
    common = dict(lr=1e-2, update=update, weight_decay=0.05, sam_rho=0.05, lookahead_k=2,
                  max_grad_norm=1.0)
    train(a, NeuroOptima(a, maximize=True, **common), loss_fn, 5, sign=-1.0)
    train(b, NeuroOptima(b, **common), loss_fn, 5)
    assert all_equal(a, b)
    assert not all_equal(a, init)


def test_zero_size_and_gradientless_parameters():
    empty = torch.zeros(0, 4, requires_grad=True)
    unused = torch.ones(3, requires_grad=True)
    used = torch.ones(2, requires_grad=True)
    optimizer = NeuroOptima([empty, unused, used], lr=0.1, sam_rho=0.05, lookahead_k=1)

    def closure():
        optimizer.zero_grad()
        loss = (used**2).sum() + empty.sum()
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    assert torch.equal(unused, torch.ones(3)) and unused.grad is None
    assert set(optimizer.state[unused]) == {"lookahead.slow"}
    assert optimizer.state[empty]["step"].item() == 3 and empty.shape == (0, 4)
    assert not torch.equal(used, torch.ones(2))


def test_step_without_any_gradient_is_a_no_op():
    p = torch.ones(3, requires_grad=True)
    optimizer = NeuroOptima([p], sam_rho=0.0)
    optimizer.step()
    assert torch.equal(p, torch.ones(3)) and optimizer.param_groups[0]["skipped_steps"] == 0


# ------------------------------------------------------------------------- two-phase API


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("update", RULES)
def test_two_phase_api_equals_step_with_closure(update, adaptive):
    init, loss_fn = mlp_problem()
    a, b = leaf_copies(init), leaf_copies(init)
    common = dict(lr=1e-2, update=update, sam_rho=0.05, sam_adaptive=adaptive, lookahead_k=3)
    opt_a, opt_b = NeuroOptima(a, **common), NeuroOptima(b, **common)
    closure_b = make_closure(b, loss_fn)
    for _ in range(5):
        opt_a.step(make_closure(a, loss_fn))
        opt_b.zero_grad()
        loss = loss_fn(b)
        loss.backward()
        opt_b.first_step()
        assert opt_b.in_second_pass
        opt_b.zero_grad()
        closure_b()
        opt_b.second_step()
        assert not opt_b.in_second_pass
    assert all_equal(a, b)


def test_step_without_closure_with_sam_on_says_what_to_pass():
    p = torch.ones(3, requires_grad=True)
    optimizer = NeuroOptima([p], sam_rho=0.05)
    (p**2).sum().backward()
    with pytest.raises(ValueError) as info:
        optimizer.step()
    message = str(info.value)
    for words in ("closure", "first_step()", "second_step()", "sam_rho=0"):
        assert words in message


def test_phase_misuse_is_reported():
    p = torch.ones(3, requires_grad=True)
    optimizer = NeuroOptima([p], sam_rho=0.05)
    with pytest.raises(RuntimeError, match="first_step"):
        optimizer.second_step()
    (p**2).sum().backward()
    optimizer.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        optimizer.first_step()
    with pytest.raises(ValueError, match="second_step"):
        optimizer.step(lambda: None)


# ------------------------------------------------------------------------- BatchNorm guard


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def bn_buffers(model):
    return [b.clone() for b in model[1].buffers()]


def test_frozen_batchnorm_stats_in_the_second_pass():
    model = bn_model()
    optimizer = NeuroOptima(model.parameters(), lr=1e-2, sam_rho=0.05)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.first_step()
    after_first = bn_buffers(model)
    twin = copy.deepcopy(model)  # same perturbed weights, stats updated as usual
    optimizer.zero_grad()
    with frozen_batchnorm_stats(model):
        nn.functional.mse_loss(model(x), y).backward()
    assert all(torch.equal(a, b) for a, b in zip(bn_buffers(model), after_first))
    assert model[1].track_running_stats and model[1].num_batches_tracked.item() == 1
    nn.functional.mse_loss(twin(x), y).backward()
    assert twin[1].num_batches_tracked.item() == 2  # the guard was what kept them still
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)  # the gradient is the train-mode gradient


def test_in_second_pass_with_closure_counts_each_batch_once():
    model = bn_model()
    optimizer = NeuroOptima(model.parameters(), lr=1e-2, sam_rho=0.05)
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def closure():
        optimizer.zero_grad()
        guard = (frozen_batchnorm_stats(model) if optimizer.in_second_pass
                 else contextlib.nullcontext())
        with guard:
            loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    assert model[1].num_batches_tracked.item() == 3


# ------------------------------------------------------------------------- GradScaler


def scaled_step(model, optimizer, scaler, x, y):
    """The documented recipe: SAM's direction does not depend on the loss scale."""
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    optimizer.first_step()
    optimizer.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    scaler.unscale_(optimizer)
    optimizer.second_step()
    scaler.update()
    optimizer.zero_grad()


def test_grad_scaler_recipe_equals_the_unscaled_run():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    plain, scaled = copy.deepcopy(base), copy.deepcopy(base)
    opt_plain = NeuroOptima(plain.parameters(), lr=1e-2, sam_rho=0.05, lookahead_k=2)
    opt_scaled = NeuroOptima(scaled.parameters(), lr=1e-2, sam_rho=0.05, lookahead_k=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(4):
        scaled_step(scaled, opt_scaled, scaler, x, y)

        def closure():
            opt_plain.zero_grad()
            loss = nn.functional.mse_loss(plain(x), y)
            loss.backward()
            return loss

        opt_plain.step(closure)
    assert_rel_close(list(scaled.parameters()), list(plain.parameters()), 1e-12)
    assert scaler.get_scale() == 2.0**10
    assert opt_scaled.param_groups[0]["skipped_steps"] == 0


def test_grad_scaler_overflow_skips_the_step_and_lowers_the_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = NeuroOptima(model.parameters(), lr=1e-2, sam_rho=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # any gradient > 2 overflows
    x, y = 100 * torch.randn(16, 4), 100 * torch.randn(16, 2)
    before = [p.detach().clone() for p in model.parameters()]
    scaled_step(model, optimizer, scaler, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert optimizer.param_groups[0]["skipped_steps"] == 1
    assert scaler.get_scale() == 2.0**126
    assert all("adan.exp_avg" not in optimizer.state[p] for p in model.parameters())
