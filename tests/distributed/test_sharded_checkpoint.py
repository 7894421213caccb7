"""Checkpoints of ShardedNeuroOptima: DCP resharding N -> M and the full state dict.

One pytest session has one world size W, so resharding runs between W ranks and sub-groups of
the first ranks: W -> W-1, W-1 -> W, W -> 1 and 1 -> W. The 2-rank run covers 2 -> 1 and
1 -> 2, the 3-rank run 3 -> 2, 2 -> 3, 3 -> 1 and 1 -> 3. Every resumed run must follow the
uninterrupted single-process trajectory on the same global batches.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from test_sharded_support import (agree_max, make_model, relative_error, train_reference,
                                  train_sharded)

from neurooptima import NeuroOptima
from neurooptima.distributed import ShardedNeuroOptima
from neurooptima.distributed.checkpoint import load_checkpoint, save_checkpoint

HYPER = dict(lr=3e-3, weight_decay=0.01, sam_rho=0.05, lookahead_k=3, update="adan", eps=1e-2)
BEFORE, AFTER = 4, 4  # Lookahead syncs at steps 3 and 6: one on each side of the checkpoint
TOL = 1e-6

_groups: dict[int, dist.ProcessGroup] = {}


def first_ranks(size: int) -> dist.ProcessGroup:
    """The group of ranks 0..size-1 (created once, by every rank, as new_group requires)."""
    if size not in _groups:
        _groups[size] = dist.new_group(list(range(size)))
    return _groups[size]


def state_error(full: dict, reference: dict) -> float:
    """Largest relative difference between two NeuroOptima-format state dicts."""
    worst = 0.0
    assert full["state"].keys() == reference["state"].keys()
    for index, entry in reference["state"].items():
        assert full["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            diff = (full["state"][index][key].float() - value.float()).norm()
            worst = max(worst, (diff / value.float().norm().clamp_min(1e-30)).item())
    return worst


@pytest.mark.parametrize("case", ["shrink", "grow", "to_one", "from_one"])
def test_resharding_resumes_the_exact_trajectory(world, shared_dir, case):
    rank, n = world
    if n == 1:
        pytest.skip("resharding needs at least 2 ranks")
    saving, loading = {"shrink": (n, n - 1), "grow": (n - 1, n), "to_one": (n, 1),
                       "from_one": (1, n)}[case]
    if n == 2 and case in ("to_one", "from_one"):
        pytest.skip("on 2 ranks the same as shrink / grow")
    # Created by every rank, in the same order, before any rank may skip a part.
    save_group, load_group = first_ranks(saving), first_ranks(loading)
    model_file = os.path.join(shared_dir, "model.pt")
    ckpt = os.path.join(shared_dir, "optimizer")

    if rank < saving:
        model = make_model()
        optimizer = ShardedNeuroOptima(model.parameters(), process_group=save_group, **HYPER)
        train_sharded(model, optimizer, range(BEFORE), rank, saving)
        save_checkpoint(optimizer, ckpt)
        if rank == 0:
            torch.save(model.state_dict(), model_file)
        optimizer.remove_hooks()
    dist.barrier()

    error = 0.0
    if rank < loading:
        model = make_model(seed=99)  # different weights: everything must come from files
        model.load_state_dict(torch.load(model_file))
        # A different lr too: the checkpoint's hyperparameters must replace it.
        optimizer = ShardedNeuroOptima(model.parameters(), process_group=load_group,
                                       **{**HYPER, "lr": 1.0})
        load_checkpoint(optimizer, ckpt)
        train_sharded(model, optimizer, range(BEFORE, BEFORE + AFTER), rank, loading)
        full = optimizer.state_dict()

        reference = make_model()
        ref_opt = NeuroOptima(reference.parameters(), **HYPER)
        train_reference(reference, ref_opt, range(BEFORE + AFTER))
        error = max(relative_error(model, reference), state_error(full, ref_opt.state_dict()))
    assert agree_max(error) <= TOL


def test_full_state_dict_to_single_process(world):
    """Export after sharded steps, continue in single-process NeuroOptima: same trajectory."""
    rank, n = world
    model = make_model()
    optimizer = ShardedNeuroOptima(model.parameters(), **HYPER)
    train_sharded(model, optimizer, range(BEFORE), rank, n)
    full = optimizer.state_dict()

    single = make_model(seed=99)
    single.load_state_dict(model.state_dict())
    single_opt = NeuroOptima(single.parameters(), **{**HYPER, "lr": 1.0})
    single_opt.load_state_dict(full)
    train_reference(single, single_opt, range(BEFORE, BEFORE + AFTER))

    reference = make_model()
    ref_opt = NeuroOptima(reference.parameters(), **HYPER)
    train_reference(reference, ref_opt, range(BEFORE + AFTER))
    error = max(relative_error(single, reference),
                state_error(single_opt.state_dict(), ref_opt.state_dict()))
    assert agree_max(error) <= TOL


def test_full_state_dict_from_single_process(world):
    """Train single-process, load its state dict into the sharded optimizer, continue."""
    rank, n = world
    reference = make_model()
    ref_opt = NeuroOptima(reference.parameters(), **HYPER)
    train_reference(reference, ref_opt, range(BEFORE))

    model = make_model(seed=99)
    model.load_state_dict(reference.state_dict())
    optimizer = ShardedNeuroOptima(model.parameters(), **{**HYPER, "lr": 1.0})
    optimizer.load_state_dict(ref_opt.state_dict())
    train_sharded(model, optimizer, range(BEFORE, BEFORE + AFTER), rank, n)
    full = optimizer.state_dict()

    train_reference(reference, ref_opt, range(BEFORE, BEFORE + AFTER))
    error = max(relative_error(model, reference), state_error(full, ref_opt.state_dict()))
    assert agree_max(error) <= TOL


def _bf16_buffers(optimizer) -> bool:
    """Whether every rule buffer of this rank's chunks is stored in bfloat16."""
    return all(value.dtype == torch.bfloat16
               for entry in optimizer.local_optimizer.state.values()
               for key, value in entry.items() if key.startswith("adan."))


def test_bf16_state_resumes_the_exact_trajectory(world, shared_dir):
    """state_dtype travels with the checkpoint (as a name) and the buffers stay bfloat16."""
    rank, n = world
    lean = {**HYPER, "state_dtype": torch.bfloat16}
    straight = make_model()
    straight_opt = ShardedNeuroOptima(straight.parameters(), fused=True, **lean)
    train_sharded(straight, straight_opt, range(BEFORE + AFTER), rank, n)
    straight_opt.remove_hooks()

    ckpt = os.path.join(shared_dir, "optimizer")
    first = make_model()
    first_opt = ShardedNeuroOptima(first.parameters(), fused=True, **lean)
    train_sharded(first, first_opt, range(BEFORE), rank, n)
    save_checkpoint(first_opt, ckpt)
    first_opt.remove_hooks()

    resumed = make_model(seed=99)
    resumed.load_state_dict(first.state_dict())
    # Created without state_dtype: the checkpoint's setting must replace it.
    resumed_opt = ShardedNeuroOptima(resumed.parameters(), fused=True, **HYPER)
    load_checkpoint(resumed_opt, ckpt)
    assert resumed_opt.param_groups[0]["state_dtype"] == torch.bfloat16
    assert _bf16_buffers(resumed_opt)
    train_sharded(resumed, resumed_opt, range(BEFORE, BEFORE + AFTER), rank, n)
    assert _bf16_buffers(resumed_opt)
    diff = max((a - b).abs().max().item()
               for a, b in zip(straight.parameters(), resumed.parameters()))
    assert agree_max(diff) == 0.0

    # The full state dict keeps the lean buffers through a load as well.
    full = resumed_opt.state_dict()
    again = ShardedNeuroOptima(make_model().parameters(), **HYPER)
    again.load_state_dict(full)
    assert _bf16_buffers(again)


class _WideNet(torch.nn.Module):
    """The test model's parameter count, another hidden width."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(33, 19)
        self.fc2 = torch.nn.Linear(19, 5)
        self.gain = torch.nn.Parameter(torch.tensor([1.5, 0.5]))


def _stepped(model, **hyper):
    optimizer = ShardedNeuroOptima(model.parameters(), sam_rho=0.0, **hyper)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.1)
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("case", ["other_model", "other_rule"])
def test_sharded_checkpoint_from_elsewhere_is_refused_whole(world, shared_dir, case):
    ckpt = os.path.join(shared_dir, "optimizer")
    saved = _stepped(_WideNet() if case == "other_model" else make_model(0),
                     update="adan" if case == "other_model" else "lion")
    save_checkpoint(saved, ckpt)
    optimizer = _stepped(make_model(0))
    before = optimizer.state_dict()
    groups = [dict(g) for g in optimizer.param_groups]
    message = (r"parameter 1: .* has 627 elements.*\(17, 33\)"
               if case == "other_model" else r"saved with update='lion'.*update='adan'")
    with pytest.raises(ValueError, match=message):
        load_checkpoint(optimizer, ckpt)
    after = optimizer.state_dict()
    for index, entry in before["state"].items():  # nothing half-loaded
        for key, value in entry.items():
            assert torch.equal(value, after["state"][index][key])
    assert [g["update"] for g in optimizer.param_groups] == [g["update"] for g in groups]
