"""Session set-up for the single-process unit tests.

The models here are tiny: one intra-op thread is faster than two, and keeps a shared 2-core
machine from spinning threads against other jobs. Multi-rank tests in tests/distributed set the
same in their own processes.

``device``: the devices a test runs on, one fixture for the whole suite: the CPU always, and
CUDA too where ``torch.cuda.is_available()``, so the same suite runs unchanged on a GPU
machine. ``NEUROOPTIMA_TEST_DEVICES=cuda`` (comma-separated) restricts it, e.g. to run only the
CUDA half there.
"""

from __future__ import annotations

import os

import pytest
import torch


def test_devices() -> list[str]:
    """The devices the ``device`` fixture runs tests on."""
    found = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    wanted = os.environ.get("NEUROOPTIMA_TEST_DEVICES")
    if wanted:
        found = [d for d in found if d in wanted.split(",")]
    return found


test_devices.__test__ = False  # a helper, not a test


@pytest.fixture(params=test_devices())
def device(request) -> torch.device:
    return torch.device(request.param)


def pytest_configure(config):
    torch.set_num_threads(1)
