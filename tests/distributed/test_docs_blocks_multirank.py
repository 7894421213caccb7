"""The multi-rank Python blocks of README.md and docs/*.md (``<!-- run: torchrun 2 -->``) run as
written on every rank of the shared process group (see ``tests/docs_blocks.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from docs_blocks import chains, run_chain  # noqa: E402

MULTI = chains("torchrun")


@pytest.mark.parametrize("chain", MULTI, ids=[c[0].where for c in MULTI])
def test_multirank_block_runs(world, chain, tmp_path_factory):
    # Every rank writes into the same scratch folder (rank 0 names it).
    folder = [str(tmp_path_factory.mktemp("block")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder, src=0)

    cwd = os.getcwd()
    os.chdir(folder[0])
    try:
        torch.manual_seed(0)
        run_chain(chain)
    finally:
        os.chdir(cwd)
        dist.barrier()
