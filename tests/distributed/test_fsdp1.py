"""NeuroOptima on FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``) equals single-process
NeuroOptima on the global batch.

Run: ``torchrun --standalone --nproc_per_node=2 -m pytest -q tests/distributed/test_fsdp1.py``
(and with 3). FSDP1 hands the optimizer each rank's piece of a flat shard, empty for some
parameters on some ranks; ``for_fsdp`` makes the norms sum over FSDP's process group.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision

from fsdp_support import (BF16_RTOL, FP32_RTOL, HYPER, STEPS, Net, batch, local_slice,
                          make_net, reference, train)

from neurooptima import NeuroOptima
from neurooptima.distributed.fsdp import for_fsdp, materialize_state

# FSDP1 on one rank does not shard: what these tests look at (pieces, empty shards) needs two.
pytestmark = pytest.mark.multi_rank

CPU = torch.device("cpu")


def wrap(net: Net, mp: MixedPrecision | None = None) -> FSDP:
    kw = dict(use_orig_params=True, device_id=CPU, mixed_precision=mp)
    net.block = FSDP(net.block, **kw)  # nested: the block's unit inside the root's
    return FSDP(net, **kw)


def full_params(model: FSDP) -> list[torch.Tensor]:
    with FSDP.summon_full_params(model, writeback=False):
        return [p.detach().float().clone() for p in model.parameters()]


def worst_rel_err(params: list[torch.Tensor], ref: nn.Module) -> float:
    return max(((p - q.detach()).norm() / q.detach().norm()).item()
               for p, q in zip(params, ref.parameters(), strict=True))


def _holds_empty_shard(model: FSDP) -> bool:
    return any(p.numel() == 0 for p in model.parameters())


@pytest.mark.parametrize("update,adaptive", [("adan", False), ("lion", False),
                                             ("lion_adan", False), ("adan", True)])
def test_matches_single_process(world, update, adaptive):
    rank, size = world
    kw = dict(HYPER, update=update, sam_adaptive=adaptive)
    model = wrap(make_net())
    opt = for_fsdp(NeuroOptima(model.parameters(), **kw), model)
    empty = torch.tensor(float(_holds_empty_shard(model)))
    dist.all_reduce(empty)
    train(model, opt, range(STEPS), rank, size)
    params = full_params(model)
    err = worst_rel_err(params, reference(STEPS, **kw))
    moved = worst_rel_err(params, make_net())
    assert empty.item() > 0  # some rank holds zero-size pieces: the case FSDP1 adds
    assert moved > 1e-2
    assert err <= FP32_RTOL, f"{update} asam={adaptive}: relative error {err:.2e}"


def test_without_for_fsdp_the_first_step_raises(world):
    """FSDP1's pieces carry no sign of being pieces but FSDP's mark: without for_fsdp the norms
    would be each rank's own, so the first step refuses and says what to call."""
    rank, size = world
    model = wrap(make_net())
    opt = NeuroOptima(model.parameters(), **HYPER)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"call neurooptima\.distributed\.for_fsdp"):
        train(model, opt, range(1), rank, size)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    train(model, for_fsdp(opt, model), range(1), rank, size)  # connected, it steps


def test_bf16_mixed_precision(world):
    rank, size = world
    mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = wrap(make_net(), mp)
    opt = for_fsdp(NeuroOptima(model.parameters(), **HYPER), model)
    train(model, opt, range(STEPS), rank, size)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    params = full_params(model)
    err = worst_rel_err(params, reference(STEPS, **HYPER))
    moved = worst_rel_err(params, make_net())
    assert moved > 10 * BF16_RTOL
    assert err <= BF16_RTOL, f"bf16 relative error {err:.2e}"


def test_sam_costs_exactly_one_all_reduce(world, monkeypatch):
    """Per step: the SAM norm's all-reduce plus the update's finite/clip check, 2 elements each."""
    rank, size = world
    model = wrap(make_net())
    counts = {}
    for rho in (0.05, 0.0):
        opt = for_fsdp(NeuroOptima(model.parameters(), **dict(HYPER, sam_rho=rho)), model)
        x, y = (local_slice(t, rank, size) for t in batch(0))
        calls = []
        real = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return real(tensor, *args, **kwargs)

        # Count only the optimizer's own phases: FSDP1 may use all-reduce for gradients.
        with monkeypatch.context() as m:
            nn.functional.mse_loss(model(x), y).backward()
            m.setattr(dist, "all_reduce", counting)
            if rho > 0:
                opt.first_step()
                m.setattr(dist, "all_reduce", real)
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                m.setattr(dist, "all_reduce", counting)
            opt.step()
        opt.zero_grad()
        counts[rho] = calls
    assert counts == {0.05: [2, 2], 0.0: [2]}


def test_sam_local_mode_is_refused(world):
    model = wrap(make_net())
    opt = NeuroOptima(model.parameters(), **HYPER)
    with pytest.raises(ValueError, match="sam_mode='local'"):
        for_fsdp(opt, model, sam_mode="local")
    for_fsdp(opt, model)
    with pytest.raises(ValueError, match="already reduces"):
        for_fsdp(opt, model)


@pytest.mark.two_ranks_only
def test_dcp_round_trip(world):
    """Save and load through torch.distributed.checkpoint; training continues exactly.

    Same world size: resharding between world sizes is shown for FSDP2 in test_fsdp2.py.
    Two ranks only: on 3 ranks torch's FSDP1 sharded *model* state dict of a fresh wrapper
    lacks ``out.*`` on rank 2 while the saved checkpoint has them, and ``dcp.load`` then fails
    with "Missing key ... optim.param_groups" (its fallback for pre-2.4 checkpoints); the
    optimizer is not involved. FSDP2 is the supported path for resharding checkpoints.
    """
    rank, size = world
    box = [tempfile.mkdtemp(prefix="neurooptima-dcp1-") if rank == 0 else None]
    dist.broadcast_object_list(box)
    ckpt = box[0]
    kw = dict(HYPER, update="adan")
    model = wrap(make_net())
    opt = for_fsdp(NeuroOptima(model.parameters(), **kw), model)
    train(model, opt, range(4), rank, size)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)

    fresh = wrap(make_net())
    with torch.no_grad():
        for p in fresh.parameters():
            p.fill_(0.25)
    opt2 = for_fsdp(materialize_state(NeuroOptima(fresh.parameters(), **kw)), fresh)
    msd2, osd2 = get_state_dict(fresh, opt2)
    sd = {"model": msd2, "optim": osd2}
    dcp.load(sd, checkpoint_id=ckpt)
    set_state_dict(fresh, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    same = all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    for p, q in zip(model.parameters(), fresh.parameters()):
        if p.numel() == 0:
            continue  # FSDP1 restores no state for a rank's empty piece; none is ever used
        s1, s2 = opt.state[p], opt2.state[q]
        same = same and s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    train(fresh, opt2, range(4, 7), rank, size)
    err = worst_rel_err(full_params(fresh), reference(7, **kw))
    # Collectives first, then the asserts: a failing rank must not leave its peers waiting.
    flags = [None] * size
    dist.all_gather_object(flags, (same, err))
    if rank == 0:
        shutil.rmtree(ckpt, ignore_errors=True)
    assert all(ok for ok, _ in flags), f"state not restored exactly: {flags}"
    assert all(e <= FP32_RTOL for _, e in flags), f"resumed trajectory: {flags}"
