"""Resume: save, torch.save, a new process, torch.load(weights_only=True), continue.

For every update rule with SAM and Lookahead on, the resumed trajectory must be bitwise equal
to an uninterrupted one. The saved step count is not a multiple of the Lookahead period, so the
slow weights differ from the fast ones at the checkpoint and must survive it.

Run as a script (``python tests/test_resume.py DIR``) this file is the new process: it loads
every checkpoint in DIR, continues, and writes the final model and optimizer state back.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from neurooptima import NeuroOptima

RULES = ("adan", "lion", "lion_adan")
BEFORE, AFTER = 7, 6  # steps before the checkpoint and after it; Lookahead k = 3
BUFFERS = {"adan": ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad"),
           "lion": ("exp_avg",), "lion_adan": ("exp_avg", "exp_avg_diff", "prev_grad")}


def build(rule: str) -> tuple[nn.Module, NeuroOptima]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    groups = [dict(params=[model[0].weight, model[0].bias]),
              dict(params=[model[2].weight, model[2].bias], lr=3e-3, weight_decay=0.1)]
    optimizer = NeuroOptima(groups, lr=1e-2, weight_decay=0.01, sam_rho=0.05, lookahead_k=3,
                            lookahead_alpha=0.5, update=rule, max_grad_norm=5.0)
    return model, optimizer


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(10, 6, generator=gen), torch.randn(10, 3, generator=gen)


def train(model: nn.Module, optimizer: NeuroOptima, steps: range) -> None:
    for step in steps:
        x, y = batch(step)

        def closure():
            optimizer.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        optimizer.step(closure)


def continue_from(directory: Path) -> None:
    """The new process: load each rule's checkpoint, continue, save the result."""
    torch.set_num_threads(1)
    for rule in RULES:
        model, optimizer = build(rule)
        checkpoint = torch.load(directory / f"{rule}.pt", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        train(model, optimizer, range(BEFORE, BEFORE + AFTER))
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                   directory / f"{rule}.resumed.pt")


def tensors_equal(a, b) -> bool:
    """Bitwise equality of nested state (tensors via torch.equal, everything else by ==)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path):
    uninterrupted = {}
    for rule in RULES:
        model, optimizer = build(rule)
        train(model, optimizer, range(BEFORE))
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                   tmp_path / f"{rule}.pt")
        train(model, optimizer, range(BEFORE, BEFORE + AFTER))
        uninterrupted[rule] = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    subprocess.run([sys.executable, __file__, str(tmp_path)], check=True, timeout=120)

    for rule in RULES:
        resumed = torch.load(tmp_path / f"{rule}.resumed.pt", weights_only=True)
        expected = uninterrupted[rule]
        assert tensors_equal(resumed["model"], expected["model"]), rule
        assert tensors_equal(resumed["optimizer"], expected["optimizer"]), rule
        # Guard: the continuation really moved the weights after the checkpoint.
        saved = torch.load(tmp_path / f"{rule}.pt", weights_only=True)
        assert not tensors_equal(saved["model"], resumed["model"]), rule


def test_state_dict_holds_slow_weights_prev_grad_and_counters():
    for rule in RULES:
        model, optimizer = build(rule)
        train(model, optimizer, range(BEFORE))
        state_dict = optimizer.state_dict()
        params = list(model.parameters())
        assert sorted(state_dict["state"]) == list(range(len(params)))
        for index, p in enumerate(params):
            st = state_dict["state"][index]
            expected_keys = {"step", "lookahead.slow"} | {f"{rule}.{b}" for b in BUFFERS[rule]}
            assert set(st) == expected_keys, (rule, set(st))
            assert isinstance(st["step"], torch.Tensor) and st["step"].item() == BEFORE
            # 7 steps with k = 3: the last sync was at step 6, one update ago.
            assert not torch.equal(st["lookahead.slow"], p.detach())
            if f"{rule}.prev_grad" in st:
                assert st[f"{rule}.prev_grad"].shape == p.shape
                assert st[f"{rule}.prev_grad"].abs().sum() > 0
        for group in state_dict["param_groups"]:
            assert group["skipped_steps"] == 0 and group["update"] == rule


if __name__ == "__main__":
    continue_from(Path(sys.argv[1]))


def test_a_sharded_full_state_dict_with_master_weights_loads_into_one_process():
    """ShardedNeuroOptima's full state dict of a bf16 run holds each parameter's float32
    ``master``; one process loads the rest and trains its parameters themselves."""
    from neurooptima import NeuroOptima

    p = torch.nn.Parameter(torch.randn(3))
    optimizer = NeuroOptima([p])
    p.grad = torch.ones(3)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["state"][0]["master"] = p.detach().clone()
    again = NeuroOptima([p])
    again.load_state_dict(saved)
    assert "master" not in again.state[p]
    assert torch.equal(again.state[p]["adan.exp_avg"], optimizer.state[p]["adan.exp_avg"])
