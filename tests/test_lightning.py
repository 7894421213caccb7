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


def test_fp16_precision_plugin_with_sam_names_the_plugin_and_the_fix():
    """Lightning's fp16 plugin runs the closure itself and steps without it: the error says so
    (not the generic "pass step(closure)", a call the user never wrote) and gives the fix."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = Module()
    before = [p.detach().clone() for p in module.parameters()]
    # What precision="16-mixed" builds on a GPU (on the CPU Lightning would pick bf16).
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, plugins=[plugin],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(RuntimeError, match="Lightning's MixedPrecision plugin") as info:
        trainer.fit(module, loader)
    message = str(info.value)
    assert "automatic_optimization = False" in message and "sam_ascent='momentum'" in message
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))


def test_gradient_accumulation_with_sam_is_refused():
    """accumulate_grad_batches=2 would give SAM's second pass one micro-batch of two."""
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = Module()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, accumulate_grad_batches=2,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(RuntimeError, match="accumulate_grad_batches=2.*manual optimization"):
        trainer.fit(module, loader)
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))
