"""Host reads of a steady-state ShardedNeuroOptima step (fused kernels, gradients kept between
steps): one per gradient reduction, the use counts (a few bytes), because which parameters the
inner update runs on depends on which ones any rank produced a gradient for; nothing else.
Counted on the accelerator's path: on the CPU, where a read is a plain load, the step also
reads its skip decision (``neurooptima.host_reads``), which the test turns off.
"""

from __future__ import annotations

import pytest
import torch
from test_sharded_support import local_batch, loss_fn, make_model

from neurooptima import host_reads
from neurooptima.distributed import ShardedNeuroOptima

READS = ("item", "tolist", "__bool__", "__int__", "__float__")


@pytest.mark.parametrize("sam_rho, reads", [(0.0, 1), (0.05, 2)], ids=["plain", "sam"])
def test_a_steady_state_sharded_step_reads_only_the_use_counts(world, monkeypatch, sam_rho,
                                                                reads):
    rank, n = world
    monkeypatch.setattr(host_reads, "reads_are_free", lambda device: False)
    model = make_model()
    optimizer = ShardedNeuroOptima(model.parameters(), fused=True, sam_rho=sam_rho,
                                   lookahead_k=3, lr=1e-3)

    def step(s):
        x, y = local_batch(s, rank, n)

        def closure():
            optimizer.zero_grad(set_to_none=False)
            loss = loss_fn(model, x, y)
            loss.backward()
            return loss
        optimizer.step(closure)

    for s in range(4):  # warm-up: compile, lay the buckets out, steady state
        step(s)
    counted = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            counted.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    for s in range(4, 7):
        step(s)
    monkeypatch.undo()
    assert counted == ["tolist"] * (3 * reads)
