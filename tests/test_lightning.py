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


# ------------------------------------------------------------------ momentum ascent

MOMENTUM = dict(lr=1e-2, sam_rho=1.0, sam_ascent="momentum")


class AscentModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _net()
        self.val_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_losses.append(float(nn.functional.cross_entropy(self.net(x), y)))

    def configure_optimizers(self):
        return NeuroOptima(self.parameters(), **MOMENTUM)


def _plain_at_w(loader, steps: int) -> list[torch.Tensor]:
    """The weights w after ``steps`` steps of the plain loop."""
    net = _net()
    optimizer = NeuroOptima(net.parameters(), **MOMENTUM)
    for _, (xb, yb) in zip(range(steps), loader):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(xb), yb).backward()
        optimizer.step()
    optimizer.eval()
    return [p.detach().clone() for p in net.parameters()]


def test_eval_at_weights_validates_checkpoints_and_leaves_the_model_at_w(tmp_path):
    """EvalAtWeights: validation scores w, checkpoints hold w and resume the exact run, and
    the fitted module is at w; without it Lightning reads the ascent point."""
    from neurooptima.integrations.lightning import EvalAtWeights

    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:16], y[:16]),
                                      batch_size=16)
    at_w = _plain_at_w(loader, STEPS)
    net_w = _net()
    with torch.no_grad():
        for p, w in zip(net_w.parameters(), at_w):
            p.copy_(w)
    val_at_w = float(nn.functional.cross_entropy(net_w(x[:16]), y[:16]))

    def gap(params, ref):
        return max(float((p - r).abs().max()) for p, r in zip(params, ref))

    results = {}
    for name, callbacks in (("plain", []), ("callback", [EvalAtWeights()])):
        module = AscentModule()
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, callbacks=callbacks,
                            default_root_dir=tmp_path / name,
                            enable_checkpointing=False)
        trainer.fit(module, loader, val)
        results[name] = (gap(module.net.parameters(), at_w),
                         abs(module.val_losses[-1] - val_at_w))
    assert results["plain"][0] > 1e-4 and results["plain"][1] > 1e-6  # ascent point read
    assert results["callback"][0] < 1e-6 and results["callback"][1] < 1e-6

    # A checkpoint at the end of the first of two epochs holds w (and the optimizer in eval
    # mode); resuming from it ends where the uninterrupted run ends.
    from lightning.pytorch.callbacks import ModelCheckpoint

    def two_epochs(module, **fit):
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1,
                                save_on_train_epoch_end=True, filename="{epoch}")
        L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[saver, EvalAtWeights()]
                  ).fit(module, loader, **fit)

    module = AscentModule()
    two_epochs(module)
    saved = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)
    assert gap([saved["state_dict"][f"net.{k}"] for k in ("0.weight", "0.bias", "2.weight",
                                                           "2.bias")], at_w) < 1e-6
    resumed = AscentModule()
    two_epochs(resumed, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert gap(resumed.net.parameters(), list(module.net.parameters())) < 1e-6
