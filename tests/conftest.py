"""Session set-up for the single-process unit tests.

The models here are tiny: one intra-op thread is faster than two, and keeps a shared 2-core
machine from spinning threads against other jobs. Multi-rank tests in tests/distributed set the
same in their own processes.
"""

from __future__ import annotations

import torch


def pytest_configure(config):
    torch.set_num_threads(1)
