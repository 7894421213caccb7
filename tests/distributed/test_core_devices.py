"""The core's norm statistics and sync-free step across ranks, on each rank's device (its GPU
over nccl where CUDA is available, else the CPU over gloo)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from neurooptima import NeuroOptima
from neurooptima.norms import device_norm


class _Summed(NeuroOptima):
    """NeuroOptima whose norm statistics are summed over the ranks (as for_fsdp does)."""

    def _reduce_norm_stats(self, stats):
        dist.all_reduce(stats)
        return stats


def test_a_rank_without_gradients_sums_its_statistics_on_the_device(world, device):
    rank, n = world
    p = torch.nn.Parameter(torch.ones(4, device=device))
    opt = _Summed([p], sam_rho=0.0, lookahead_k=0)
    grads = [torch.full((4,), 3.0, device=device)] if rank == 0 else []
    stats = opt._norm_stats(grads, [p] if grads else [])
    assert stats.device == p.device
    norm, finite = device_norm(stats)
    assert math.isclose(float(norm), 6.0) and bool(finite)


def test_sync_free_step_skips_on_every_rank_when_one_rank_is_non_finite(world, device):
    rank, n = world
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, device=device)),
              torch.nn.Parameter(torch.randn(7, device=device))]
    opt = _Summed(params, lr=1e-2, sam_rho=0.0, lookahead_k=2, max_grad_norm=1.0, fused=True)
    for k in range(3):
        for p in params:
            gen = torch.Generator().manual_seed(k)
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        if k == 2 and rank == n - 1:
            params[1].grad[0] = math.nan
        before = [p.detach().clone() for p in params]
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # one decision, all ranks
    assert int(opt.param_groups[0]["skipped_steps"]) == 1
