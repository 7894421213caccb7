"""A gradient reaching ShardedNeuroOptima twice before step(): each cause named, or supported.

- accumulation without ``no_sync()``: the error says to use it;
- a second optimizer on the same parameters while the first is alive (a resumed optimizer):
  the error names it and says to call ``remove_hooks()`` or drop the first, and both fixes work;
- reentrant activation checkpointing (``use_reentrant=True``): supported, equal to one process.

Run: torchrun --standalone --nproc_per_node=2 (and 3) -m pytest -q tests/distributed/test_sharded_twice.py
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from test_sharded_support import (agree_max, closure_for, global_batch, local_batch, loss_fn,
                                  make_model, relative_error)

from neurooptima import NeuroOptima
from neurooptima.distributed import ShardedNeuroOptima

HYPER = dict(lr=3e-3, weight_decay=0.01, sam_rho=0.0, lookahead_k=0, eps=1e-2)


def _raises_everywhere(fn, *fragments):
    try:
        fn()
        message = ""
    except RuntimeError as error:
        message = str(error)
    assert agree_max(0.0 if message and all(f in message for f in fragments) else 1.0) == 0.0, \
        message


def test_accumulation_without_no_sync_names_no_sync(world):
    rank, n = world
    model = make_model(1)
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=0.001, **HYPER)
    x, y = local_batch(0, rank, n)
    loss_fn(model, x, y).backward()
    _raises_everywhere(lambda: loss_fn(model, x, y).backward(), "produced twice before step()",
                       "optimizer.no_sync()")


def test_second_optimizer_on_the_same_parameters_is_named_and_both_fixes_work(world):
    rank, n = world
    model = make_model(2)
    first = ShardedNeuroOptima(model.parameters(), **HYPER)
    first.step(closure_for(model, first, *local_batch(0, rank, n)))
    resumed = ShardedNeuroOptima(model.parameters(), **HYPER)

    def train_resumed(steps):
        for step in steps:
            resumed.zero_grad()
            loss_fn(model, *local_batch(step, rank, n)).backward()
            resumed.step()
    _raises_everywhere(lambda: train_resumed(range(1, 3)), "two optimizers are hooked",
                       "remove_hooks()")

    # Fix 1: remove the first optimizer's hooks; the resumed one then trains as one process.
    for fix in ("remove_hooks", "drop"):
        model = make_model(3)
        first = ShardedNeuroOptima(model.parameters(), **HYPER)
        reference = make_model(3)
        ref_opt = NeuroOptima(reference.parameters(), **HYPER)
        for m, opt, batch in ((model, first, local_batch(0, rank, n)),
                              (reference, ref_opt, global_batch(0))):
            opt.step(closure_for(m, opt, *batch))
        if fix == "remove_hooks":
            first.remove_hooks()
        else:
            gone = weakref.ref(first)
            del first  # freed at once: no reference cycle keeps its hooks alive
            assert gone() is None
        resumed = ShardedNeuroOptima(model.parameters(), **HYPER)
        ref_resumed = NeuroOptima(reference.parameters(), **HYPER)
        for step in range(1, 4):
            resumed.step(closure_for(model, resumed, *local_batch(step, rank, n)))
            ref_resumed.step(closure_for(reference, ref_resumed, *global_batch(step)))
        assert agree_max(relative_error(model, reference)) <= 1e-6, fix
    gc.collect()


class SegmentedNet(nn.Module):
    """Three segments; ``checkpointed`` picks the ones run under reentrant checkpointing."""

    def __init__(self, checkpointed: tuple[int, ...]) -> None:
        super().__init__()
        torch.manual_seed(17)
        self.segments = nn.ModuleList([nn.Sequential(nn.Linear(33, 16), nn.Tanh()),
                                       nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
                                       nn.Linear(16, 5)])
        self.checkpointed = checkpointed

    def forward(self, x):
        for i, segment in enumerate(self.segments):
            if i in self.checkpointed:
                x = checkpoint(segment, x, use_reentrant=True)
            else:
                x = segment(x)
        return x


@pytest.mark.parametrize("checkpointed", [(2,), (1,), (1, 2)], ids=["last", "middle", "two"])
def test_reentrant_checkpointing_is_supported(world, checkpointed):
    rank, n = world
    model = SegmentedNet(checkpointed)
    optimizer = ShardedNeuroOptima(model.parameters(), bucket_cap_mb=0.001, **HYPER)
    reference = SegmentedNet(())
    ref_opt = NeuroOptima(reference.parameters(), **HYPER)
    for step in range(4):
        optimizer.step(closure_for(model, optimizer, *local_batch(step, rank, n)))
        ref_opt.step(closure_for(reference, ref_opt, *global_batch(step)))
    assert agree_max(relative_error(model, reference)) <= 1e-6
