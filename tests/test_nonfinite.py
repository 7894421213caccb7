"""Non-finite gradients: the step is skipped for every parameter and counted; SAM's first pass
with a non-finite gradient does not perturb, so no NaN reaches the weights."""

from __future__ import annotations

import math

import pytest
import torch

from neurooptima import NeuroOptima

RULES = ["adan", "lion", "lion_adan"]


def make(update: str, device="cpu", **kwargs):
    """Two groups with SAM and Lookahead on (both are off by default), unless ``kwargs`` say
    otherwise."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(),
              torch.randn(5, generator=gen, dtype=torch.float64).to(device).requires_grad_()]
    groups = [dict(params=params[:1]), dict(params=params[1:], lr=3e-3)]
    options = dict(lr=1e-2, weight_decay=0.1, sam_rho=0.05, lookahead_k=5, update=update)
    return params, NeuroOptima(groups, **{**options, **kwargs})


def set_grads(params, step: int, bad: float | None = None):
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
        if bad is not None and i == 1:
            p.grad[2] = bad


def snapshot(params, optimizer):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params])


def same(a, b) -> bool:
    (pa, sa), (pb, sb) = a, b
    return (all(torch.equal(x, y) for x, y in zip(pa, pb))
            and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                    for x, y in zip(sa, sb)))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("update", RULES)
def test_nonfinite_gradient_skips_the_whole_step(update, bad, device):
    params, optimizer = make(update, device, sam_rho=0.0, lookahead_k=2, max_grad_norm=1.0)
    set_grads(params, 0)
    optimizer.step()
    before = snapshot(params, optimizer)
    # Only one element of one parameter is bad; the other parameter must not move either.
    set_grads(params, 1, bad=bad)
    optimizer.step()
    assert same(snapshot(params, optimizer), before)
    assert [g["skipped_steps"] for g in optimizer.param_groups] == [1, 1]
    assert "skipped_steps" in optimizer.state_dict()["param_groups"][0]

    # The skipped step is a no-op: continuing equals a run that never saw it.
    ref_params, reference = make(update, device, sam_rho=0.0, lookahead_k=2,
                                 max_grad_norm=1.0)
    for step in (0, 2, 3):
        set_grads(ref_params, step)
        reference.step()
    for step in (2, 3):
        set_grads(params, step)
        optimizer.step()
    assert same(snapshot(params, optimizer), snapshot(ref_params, reference))


@pytest.mark.parametrize("update", RULES)
def test_nonfinite_second_pass_skips_and_restores_weights(update, device):
    params, optimizer = make(update, device)
    calls = []

    def closure():
        optimizer.zero_grad()
        loss = sum((p**2).sum() for p in params)
        if calls:  # second pass: a NaN loss gives NaN gradients everywhere
            loss = loss * math.nan
        calls.append(1)
        loss.backward()
        return loss

    before = snapshot(params, optimizer)
    optimizer.step(closure)
    assert len(calls) == 2
    assert same(snapshot(params, optimizer), before)  # perturbation removed, nothing updated
    assert [g["skipped_steps"] for g in optimizer.param_groups] == [1, 1]
    assert not optimizer.in_second_pass


@pytest.mark.parametrize("update", RULES)
def test_nonfinite_first_pass_does_not_perturb(update, device):
    params, optimizer = make(update, device)
    seen = []

    def closure():
        optimizer.zero_grad()
        loss = sum((p**2).sum() for p in params)
        if not seen:
            loss = loss * math.inf
        seen.append([p.detach().clone() for p in params])
        loss.backward()
        return loss

    start = [p.detach().clone() for p in params]
    optimizer.step(closure)
    # The second pass ran at w itself (no perturbation from the non-finite first gradient).
    assert all(torch.equal(a, b) for a, b in zip(seen[1], start))
    assert all(torch.isfinite(p).all() for p in params)
    # Its finite gradient was applied like a step without SAM.
    ref_params, reference = make(update, device, sam_rho=0.0)
    for p in ref_params:
        p.grad = 2 * p.detach().clone()
    reference.step()
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    assert [g["skipped_steps"] for g in optimizer.param_groups] == [0, 0]


def test_two_phase_first_step_with_nonfinite_gradients_keeps_weights(device):
    params, optimizer = make("adan", device)
    set_grads(params, 0, bad=math.nan)
    start = [p.detach().clone() for p in params]
    optimizer.first_step()
    assert optimizer.in_second_pass
    assert all(torch.equal(a, b) for a, b in zip(params, start))
    assert all("sam.origin" not in optimizer.state[p] for p in params)
    set_grads(params, 1, bad=math.inf)
    optimizer.second_step()
    assert all(torch.equal(a, b) for a, b in zip(params, start))
    assert not optimizer.in_second_pass
    assert [g["skipped_steps"] for g in optimizer.param_groups] == [1, 1]
