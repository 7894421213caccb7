"""The multi-tensor (foreach) path equals the for-loop path, bitwise, in float64.

Zero-size parameters and parameters without gradients are present; every rule runs with SAM
and Lookahead on, over several param groups and enough steps to pass Lookahead syncs.
"""

from __future__ import annotations

import pytest
import torch

from neurooptima import NeuroOptima

STEPS = 7


def make_params(dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (0,), (5,), (2, 0, 3), (3, 2), (6,)]
    return [torch.randn(s, generator=gen, dtype=dtype).to(device).requires_grad_(True)
            for s in shapes]


def run(update: str, foreach: bool, adaptive: bool, device="cpu"):
    params = make_params(device=device)
    frozen = torch.ones(3, dtype=torch.float64, device=device, requires_grad=True)  # no grad
    groups = [dict(params=params[:3] + [frozen]),
              dict(params=params[3:], lr=3e-3, weight_decay=0.2, lookahead_k=2,
                   lookahead_alpha=0.7, sam_rho=0.1)]
    optimizer = NeuroOptima(groups, lr=1e-2, weight_decay=0.05, sam_rho=0.05, lookahead_k=3,
                            update=update, sam_adaptive=adaptive, foreach=foreach,
                            max_grad_norm=2.0)
    target = [torch.linspace(-1, 1, p.numel(), dtype=torch.float64, device=device)
              .reshape(p.shape)
              for p in params]

    def closure():
        optimizer.zero_grad()
        loss = sum(((p - t) ** 4).sum() + (p * p.sum()).sum() for p, t in zip(params, target))
        loss.backward()
        return loss

    for _ in range(STEPS):
        optimizer.step(closure)
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params + [frozen]]
    return [p.detach().clone() for p in params + [frozen]], state


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("update", ["adan", "lion", "lion_adan"])
def test_foreach_equals_for_loop(update, adaptive, device):
    loop_params, loop_state = run(update, foreach=False, adaptive=adaptive, device=device)
    fe_params, fe_state = run(update, foreach=True, adaptive=adaptive, device=device)
    for a, b in zip(loop_params, fe_params):
        assert torch.equal(a, b)
    for a, b in zip(loop_state, fe_state):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # The gradient-less parameter kept its value and has only its slow weights in state.
    assert torch.equal(loop_params[-1], torch.ones(3, dtype=torch.float64, device=device))
    assert set(loop_state[-1]) == {"lookahead.slow"}
    # Zero-size parameters got state like any other parameter.
    assert loop_state[1]["step"].item() == STEPS and loop_state[1]["lookahead.slow"].numel() == 0
    # Guard: the weights moved.
    assert not torch.equal(loop_params[0], make_params(device=device)[0])
