"""NeuroOptima on FSDP2 (``fully_shard``) equals single-process NeuroOptima on the global batch.

Run: ``torchrun --standalone --nproc_per_node=2 -m pytest -q tests/distributed/test_fsdp2.py``
(and with 3). The checkpoint test saves and loads on meshes over the first ranks of the
session: 2 -> 3 and 3 -> 2 ranks in the 3-rank run, 2 -> 1 in the 2-rank run.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from fsdp_support import (BF16_RTOL, FP32_RTOL, HYPER, STEPS, Net, batch, local_slice,
                          make_net, reference, train)

from neurooptima import NeuroOptima
from neurooptima.distributed.fsdp import for_fsdp, materialize_state


def shard(net: Net, mp: MixedPrecisionPolicy | None = None,
          mesh: DeviceMesh | None = None) -> Net:
    kw = {} if mp is None else {"mp_policy": mp}
    if mesh is not None:
        kw["mesh"] = mesh
    fully_shard(net.block, **kw)  # nested: the block's unit inside the root's
    fully_shard(net, **kw)
    return net


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().clone()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def worst_rel_err(net: nn.Module, ref: nn.Module) -> float:
    return max(rel_err(full(p), q.detach()) for p, q in
               zip(net.parameters(), ref.parameters(), strict=True))


@pytest.mark.parametrize("update,adaptive", [("adan", False), ("lion", False),
                                             ("lion_adan", False), ("adan", True)])
def test_matches_single_process(world, update, adaptive):
    rank, size = world
    kw = dict(HYPER, update=update, sam_adaptive=adaptive)
    net = shard(make_net())
    opt = for_fsdp(NeuroOptima(net.parameters(), **kw), net)
    train(net, opt, range(STEPS), rank, size)
    err = worst_rel_err(net, reference(STEPS, **kw))
    moved = worst_rel_err(net, make_net())
    state = opt.state[net.inp.weight]
    assert all(isinstance(v, DTensor) for k, v in state.items() if k != "step"), state.keys()
    assert moved > 1e-2  # the comparison below is not vacuous
    assert err <= FP32_RTOL, f"{update} asam={adaptive}: relative error {err:.2e}"


def test_bf16_mixed_precision(world):
    rank, size = world
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    net = shard(make_net(), mp)
    opt = for_fsdp(NeuroOptima(net.parameters(), **HYPER), net)
    train(net, opt, range(STEPS), rank, size)
    # FSDP keeps the sharded parameters (what the optimizer sees) and its state in fp32.
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert opt.state[net.inp.weight]["adan.exp_avg"].dtype == torch.float32
    err = worst_rel_err(net, reference(STEPS, **HYPER))
    moved = worst_rel_err(net, make_net())
    assert moved > 10 * BF16_RTOL  # a tolerance far below what training changes
    assert err <= BF16_RTOL, f"bf16 relative error {err:.2e}"


def test_sam_costs_exactly_one_all_reduce(world, monkeypatch):
    """Per step: one all-reduce for the SAM norm plus one for the update's finite/clip check.

    FSDP2's own reduce-scatter and all-gather do not go through ``dist.all_reduce``, so the
    counter sees only the optimizer's norm collectives.
    """
    rank, size = world
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting)
    counts = {}
    for rho in (0.05, 0.0):
        net = shard(make_net())
        opt = NeuroOptima(net.parameters(), **dict(HYPER, sam_rho=rho))
        calls.clear()
        train(net, opt, range(4), rank, size)
        counts[rho] = len(calls)
        assert all(n == 2 for n in calls)  # packed [sum of squares, non-finite count]
    # The two-phase API: the first phase alone costs the SAM norm's single all-reduce.
    net = shard(make_net())
    opt = NeuroOptima(net.parameters(), **HYPER)
    x, y = (local_slice(t, rank, size) for t in batch(0))
    nn.functional.mse_loss(net(x), y).backward()
    calls.clear()
    opt.first_step()
    first_phase = len(calls)
    opt.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    calls.clear()
    opt.second_step()
    second_phase = len(calls)
    assert counts == {0.05: 2 * 4, 0.0: 1 * 4}
    assert (first_phase, second_phase) == (1, 1)


def test_sam_local_mode_is_refused(world):
    net = shard(make_net())
    opt = NeuroOptima(net.parameters(), **HYPER)
    with pytest.raises(ValueError, match="sam_mode='local'"):
        for_fsdp(opt, net, sam_mode="local")
    with pytest.raises(ValueError, match="sam_mode must be one of"):
        for_fsdp(opt, net, sam_mode="loose")
    with pytest.raises(ValueError, match="not wrapped"):
        plain = make_net()
        for_fsdp(NeuroOptima(plain.parameters()), plain)


# ------------------------------------------------------------------ checkpoint: save on one mesh, load on another

SAVE_AT = 4  # mid Lookahead period (k = 3), so slow weights and buffers both matter
RESUME_STEPS = 3
DCP_KW = dict(HYPER, update="adan")


def _full_snapshot(net: nn.Module, opt: NeuroOptima) -> dict[str, torch.Tensor]:
    snap = {}
    for name, p in net.named_parameters():
        snap[name] = full(p)
        for key, value in opt.state[p].items():
            snap[f"{name}/{key}"] = full(value)
    return snap


def _state_dicts(net: nn.Module, opt: NeuroOptima) -> dict[str, dict]:
    model_sd, optim_sd = get_state_dict(net, opt)
    return {"model": model_sd, "optim": optim_sd}


def _save(mesh: DeviceMesh, ckpt: str) -> None:
    rank, size = mesh.get_local_rank(), mesh.size()
    net = shard(make_net(), mesh=mesh)
    opt = NeuroOptima(net.parameters(), **DCP_KW)
    train(net, opt, range(SAVE_AT), rank, size)
    dcp.save(_state_dicts(net, opt), checkpoint_id=ckpt, process_group=mesh.get_group())
    snap = _full_snapshot(net, opt)
    if rank == 0:
        torch.save(snap, os.path.join(ckpt, "expected.pt"))


def _load_and_resume(mesh: DeviceMesh, ckpt: str) -> list[str]:
    """Problems found after loading on ``mesh`` and training on (empty when all is exact)."""
    rank, size = mesh.get_local_rank(), mesh.size()
    net = shard(make_net(), mesh=mesh)
    with torch.no_grad():  # weights other than the saved ones, so a key that is not loaded shows
        for p in net.parameters():
            p.to_local().fill_(0.25)
    opt = materialize_state(NeuroOptima(net.parameters(), **DCP_KW))
    sd = _state_dicts(net, opt)
    dcp.load(sd, checkpoint_id=ckpt, process_group=mesh.get_group())
    set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    loaded = _full_snapshot(net, opt)
    train(net, opt, range(SAVE_AT, SAVE_AT + RESUME_STEPS), rank, size)
    err = worst_rel_err(net, reference(SAVE_AT + RESUME_STEPS, **DCP_KW))
    expected = torch.load(os.path.join(ckpt, "expected.pt"))
    problems = []
    if loaded.keys() != expected.keys():
        problems.append(f"state keys differ: {sorted(loaded.keys() ^ expected.keys())}")
    else:
        problems += [f"{k} not loaded exactly" for k in expected
                     if not torch.equal(loaded[k], expected[k])]
    if not err <= FP32_RTOL:
        problems.append(f"resumed trajectory: relative error {err:.2e}")
    return problems


def _sub_mesh(size: int) -> DeviceMesh:
    # Every rank takes part in creating the mesh's process group, members or not.
    return DeviceMesh("cpu", list(range(size)))


@pytest.mark.multi_rank
def test_dcp_reshards_between_world_sizes(world):
    """Save with 2 ranks and load with 3 (and 3 -> 2); on a 2-rank run, 2 -> 1."""
    rank, size = world
    pairs = [(2, 3), (3, 2)] if size >= 3 else [(2, 1)]
    problems = []
    for save_size, load_size in pairs:
        box = [tempfile.mkdtemp(prefix="neurooptima-dcp-") if rank == 0 else None]
        dist.broadcast_object_list(box)
        ckpt = box[0]
        save_mesh, load_mesh = _sub_mesh(save_size), _sub_mesh(load_size)
        if rank < save_size:
            _save(save_mesh, ckpt)
        dist.barrier()
        if rank < load_size:
            problems += [f"{save_size} -> {load_size} ranks: {p}"
                         for p in _load_and_resume(load_mesh, ckpt)]
        dist.barrier()
        if rank == 0:
            shutil.rmtree(ckpt, ignore_errors=True)
    # Every rank learns every problem, so all fail together instead of one hanging.
    gathered = [None] * size
    dist.all_gather_object(gathered, problems)
    assert not [p for ps in gathered for p in ps], gathered


def test_dcp_load_into_a_fresh_optimizer_without_materialize_state_raises(world):
    """A fresh optimizer's state dict lists only the slow weights, so DCP would read nothing
    else; the load is refused with the call to make, and nothing is loaded."""
    rank, size = world
    box = [tempfile.mkdtemp(prefix="neurooptima-dcp-") if rank == 0 else None]
    dist.broadcast_object_list(box)
    ckpt = box[0]
    mesh = _sub_mesh(size)
    _save(mesh, ckpt)
    net = shard(make_net(), mesh=mesh)
    opt = NeuroOptima(net.parameters(), **DCP_KW)  # no materialize_state
    sd = _state_dicts(net, opt)
    dcp.load(sd, checkpoint_id=ckpt, process_group=mesh.get_group())
    with pytest.raises(ValueError, match=r"materialize_state\(optimizer\)"):
        set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    assert all("adan.exp_avg" not in s for s in opt.state.values())
    dist.barrier()
    if rank == 0:
        shutil.rmtree(ckpt, ignore_errors=True)
