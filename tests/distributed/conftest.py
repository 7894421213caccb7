"""One process group for the whole multi-rank test session.

Run under torchrun, e.g. ``torchrun --standalone --nproc_per_node=2 -m pytest tests/distributed``.
Without torchrun's environment every test here is skipped. A short collective timeout makes a
rank whose peer failed raise instead of hanging the run.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def pytest_configure(config):
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
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


@pytest.fixture
def world() -> tuple[int, int]:
    """(rank, world size) of the shared gloo process group."""
    return dist.get_rank(), dist.get_world_size()
