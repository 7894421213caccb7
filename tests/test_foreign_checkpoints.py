"""Another optimizer's state dict (torch's AdamW, pytorch-optimizer's Adan) is refused before
anything changes, with what it looks like and what to do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neurooptima import NeuroOptima

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


def _trained(optimizer_cls, model: nn.Module, steps: int = 2, **kwargs):
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    x = torch.randn(8, 4)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return optimizer


def snapshot(optimizer) -> tuple[list[dict], dict]:
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
              for g in optimizer.param_groups]
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                     for k, v in entry.items()}
             for p, entry in optimizer.state.items()}
    return groups, state


def assert_unchanged(optimizer, before: tuple[list[dict], dict]) -> None:
    groups, state = snapshot(optimizer)
    assert groups == before[0]
    assert state.keys() == before[1].keys()
    for pid, entry in state.items():
        assert entry.keys() == before[1][pid].keys()
        for key, value in entry.items():
            if torch.is_tensor(value):
                assert torch.equal(value, before[1][pid][key]), key
            else:
                assert value == before[1][pid][key], key


FOREIGN = {
    "AdamW": (lambda: torch.optim.AdamW, "torch.optim.AdamW's: it has per-parameter keys "
              "exp_avg/exp_avg_sq"),
    "Adan": (lambda: pytorch_optimizer.Adan, "Adan state dict .*exp_avg/exp_avg_diff/exp_avg_sq"
             "/previous_grad"),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_state_dict_is_refused_and_nothing_changes(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    ours = _trained(NeuroOptima, model, lookahead_k=3)
    before = snapshot(ours)
    cls, looks = FOREIGN[name]
    foreign = _trained(cls(), copy.deepcopy(model), lr=1e-3).state_dict()
    with pytest.raises(ValueError, match=looks) as info:
        ours.load_state_dict(foreign)
    message = str(info.value)
    assert "load them (model.load_state_dict)" in message
    assert "start this optimizer fresh" in message and "nothing was loaded" in message
    assert_unchanged(ours, before)
    # Still a working optimizer: it steps on from its own state.
    ours.zero_grad()
    model(torch.randn(8, 4)).square().mean().backward()
    ours.step()
    assert ours.state[model[0].weight]["step"].item() == 3


def test_fresh_adamw_state_dict_is_refused_by_its_param_groups():
    """Before AdamW's first step its state is empty: its param groups tell it."""
    model = nn.Linear(4, 2)
    ours = NeuroOptima(model.parameters())
    before = snapshot(ours)
    with pytest.raises(ValueError, match="torch.optim.AdamW's: it has param groups without "
                                         "NeuroOptima's settings"):
        ours.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())
    assert_unchanged(ours, before)


def test_own_state_dict_still_loads():
    model = nn.Linear(4, 2)
    saved = _trained(NeuroOptima, model, update="lion").state_dict()
    fresh = NeuroOptima(model.parameters(), update="lion")
    fresh.load_state_dict(saved)
    assert fresh.state[model.weight]["step"].item() == 2
