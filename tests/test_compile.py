"""A training step with NeuroOptima under torch.compile matches eager.

Inductor's C++ code generation takes minutes on a 2-core machine even for a tiny model, so the
model is compiled with the ``aot_eager`` backend (Dynamo capture plus AOTAutograd, no code
generation) and the optimizer step with ``eager`` (Dynamo capture of the step's Python,
including its graph breaks). What is tested is that capture keeps the step's semantics; kernel
code generation is torch's own concern.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neurooptima import NeuroOptima, host_reads

pytestmark = pytest.mark.slow
STEPS = 3


def run(compiled: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    optimizer = NeuroOptima(model.parameters(), lr=1e-2, sam_rho=0.05, lookahead_k=2)
    forward = torch.compile(model, backend="aot_eager") if compiled else model

    def second_step():
        optimizer.second_step()

    if compiled:
        second_step = torch.compile(second_step, backend="eager")
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(forward(x), y)
        loss.backward()
        optimizer.first_step()
        optimizer.zero_grad()
        nn.functional.mse_loss(forward(x), y).backward()
        second_step()
        losses.append(loss.item())
        assert not optimizer.in_second_pass  # the phase bookkeeping survived capture
    return model, optimizer, losses


def test_compiled_training_step_matches_eager():
    eager_model, eager_opt, eager_losses = run(compiled=False)
    model, optimizer, losses = run(compiled=True)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert optimizer.state[p]["step"].item() == STEPS
        torch.testing.assert_close(optimizer.state[p]["lookahead.slow"],
                                   eager_opt.state[q]["lookahead.slow"], rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]
    # The weights moved, so agreement is not two frozen models agreeing.
    torch.manual_seed(0)
    start = copy.deepcopy(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    assert not torch.equal(start[0].weight, model[0].weight)


@pytest.mark.parametrize("sam_rho", [0.0, 0.05], ids=["plain", "sam"])
@pytest.mark.parametrize("on_device", [True, False], ids=["device_predicate", "host_decision"])
def test_compiled_fused_step_matches_eager(sam_rho, on_device, monkeypatch):
    """``torch.compile(optimizer.step)`` on the fused path, with the skip decided on the device
    (an accelerator's sync-free step: the skip counter's host-side monitor survives capture)
    and on the host (the CPU's), matches eager."""
    if on_device:
        monkeypatch.setattr(host_reads, "reads_are_free", lambda device: False)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        x, y = torch.randn(8, 4), torch.randn(8, 2)
        optimizer = NeuroOptima(model.parameters(), lr=1e-2, lookahead_k=2, sam_rho=sam_rho,
                                fused=True)
        step = torch.compile(optimizer.step, backend="eager") if compiled else optimizer.step

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        for _ in range(STEPS):
            step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
