"""One process group for the whole multi-rank test session.

Run under torchrun, e.g. ``torchrun --standalone --nproc_per_node=2 -m pytest tests/distributed``.
Without torchrun's environment every test here is skipped. A short collective timeout makes a
rank whose peer failed raise instead of hanging the run.

Backends: gloo for CPU tensors always; where CUDA is available, nccl for CUDA tensors as well
(one group, ``"cpu:gloo,cuda:nccl"``), each rank on GPU ``LOCAL_RANK``. The ``device`` fixture
is that GPU when there is one, else the CPU, so a test that builds its tensors on ``device``
runs on nccl on a GPU machine and on gloo here, unchanged.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
CUDA = torch.cuda.is_available()
BACKEND = "cpu:gloo,cuda:nccl" if CUDA else "gloo"


def rank_device() -> torch.device:
    """This rank's device: its GPU (``LOCAL_RANK``) where CUDA is available, else the CPU."""
    if CUDA:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def pytest_configure(config):
    if "RANK" in os.environ and not dist.is_initialized():
        if CUDA:
            torch.cuda.set_device(rank_device())
        dist.init_process_group(BACKEND, timeout=COLLECTIVE_TIMEOUT)
        torch.set_num_threads(1)
        if dist.get_rank() != 0:
            # Only rank 0 reports; the others still fail the run through their exit code.
            config.option.verbose = -2
            config.option.reportchars = ""


def pytest_unconfigure(config):
    if dist.is_initialized():
        dist.destroy_process_group()


def pytest_collection_modifyitems(config, items):
    if not dist.is_initialized():
        skip = pytest.mark.skip(reason="multi-rank test: run under torchrun")
        for item in items:
            item.add_marker(skip)
        return
    if dist.get_world_size() != 4:
        skip = pytest.mark.skip(reason="needs 4 ranks (a 2 x 2 mesh)")
        for item in items:
            if "four_ranks" in item.keywords:
                item.add_marker(skip)
    if dist.get_world_size() == 1:  # e.g. the GPU check's world-size-1 run
        skip = pytest.mark.skip(reason="needs 2 or more ranks (sharding across ranks)")
        for item in items:
            if "multi_rank" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def shared_dir():
    """A temporary folder whose path every rank knows (rank 0 creates and removes it)."""
    holder = [tempfile.mkdtemp(prefix="neurooptima-ckpt-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    yield holder[0]
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(holder[0], ignore_errors=True)


@pytest.fixture
def world() -> tuple[int, int]:
    """(rank, world size) of the shared process group."""
    return dist.get_rank(), dist.get_world_size()


@pytest.fixture
def device() -> torch.device:
    """The device this rank's tensors live on (see the module docstring)."""
    return rank_device()
