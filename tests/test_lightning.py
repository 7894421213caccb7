"""Under Lightning's automatic optimization NeuroOptima with SAM trains as a plain loop does:
Lightning hands ``optimizer.step`` a closure (training_step, zero_grad, backward), which is the
contract SAM's two passes need. Skipped when ``lightning`` is not installed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neurooptima import NeuroOptima

L = pytest.importorskip("lightning")

STEPS = 12


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * 8, 6, generator=gen)
    return x, (x[:, 0] > 0).long()


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _net()
        self.passes = 0

    def training_step(self, batch, batch_idx):
        self.passes += 1
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return NeuroOptima(self.parameters(), lr=1e-2, sam_rho=0.05, lookahead_k=3)


def test_automatic_optimization_equals_step_closure():
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = Module()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)
    assert module.passes == 2 * STEPS  # SAM: training_step twice per optimizer step
    assert trainer.global_step == STEPS

    net = _net()
    optimizer = NeuroOptima(net.parameters(), lr=1e-2, sam_rho=0.05, lookahead_k=3)
    for xb, yb in loader:
        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(xb), yb)
            loss.backward()
            return loss
        optimizer.step(closure)
    for p, q in zip(module.net.parameters(), net.parameters()):
        assert torch.equal(p, q)
