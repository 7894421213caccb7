"""ShardedNeuroOptima refuses another optimizer's state dict (torch's AdamW, pytorch-optimizer's
Adan) on every rank before anything changes: settings, state and weights stay as they were."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from test_sharded_support import make_model, train_reference, train_sharded

from neurooptima.distributed import ShardedNeuroOptima

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.mark.parametrize("name", ["AdamW", "Adan"])
def test_foreign_state_dict_is_refused_on_every_rank(name):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    optimizer = ShardedNeuroOptima(model.parameters(), lookahead_k=3)
    train_sharded(model, optimizer, range(2), rank, world)
    before = copy.deepcopy(optimizer.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]

    other = make_model()
    cls = torch.optim.AdamW if name == "AdamW" else pytorch_optimizer.Adan
    foreign = cls(other.parameters(), lr=1e-3)
    train_reference(other, foreign, range(2))
    looks = "torch.optim.AdamW's" if name == "AdamW" else "an Adan state dict"
    with pytest.raises(ValueError, match=f"looks like {looks}.*start this optimizer fresh"):
        optimizer.load_state_dict(foreign.state_dict())

    assert _same(optimizer.state_dict(), before)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    train_sharded(model, optimizer, range(2, 3), rank, world)  # steps on from its own state
