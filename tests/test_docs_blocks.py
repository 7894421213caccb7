"""Every Python block of README.md and docs/*.md runs as written (see ``docs_blocks`` for the
markers). Multi-rank blocks run in ``tests/distributed/test_docs_blocks_multirank.py``; blocks
that cannot run here carry a skip marker with the reason, and are listed and counted here."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re

import pytest
import torch

from docs_blocks import ROOT, all_blocks, chains, run_chain
from neurooptima import NeuroOptima

SINGLE = chains("single")


@pytest.mark.parametrize("chain", SINGLE, ids=[c[0].where for c in SINGLE])
def test_block_runs(chain, tmp_path, monkeypatch, capsys):
    for block in chain:  # optional packages a page is about (Lightning)
        for module in re.findall(r"^import (\w+)", block.code, flags=re.M):
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"{block.where} needs {module}, which is not installed")
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands in a scratch folder
    torch.manual_seed(0)
    run_chain(chain)


def test_every_block_is_accounted_for():
    found = all_blocks()
    single = sum(b.mode == "single" for b in found)
    multi = sum(b.mode == "torchrun" for b in found)
    skipped = [b for b in found if b.mode == "skip"]
    print(f"{len(found)} python blocks: {single} single-process, {multi} multi-rank, "
          f"{len(skipped)} skipped")
    for block in skipped:
        print(f"  skipped {block.where}: {block.reason}")
    assert single >= 8 and multi >= 2
    assert all(b.reason for b in skipped)
    # Only a few blocks may be out of reach here (CUDA, a cluster launcher).
    assert len(skipped) <= 4


def test_readme_options_table_states_the_code_defaults():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## Options", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = ast.literal_eval(cells[2].strip("`"))
    signature = inspect.signature(NeuroOptima.__init__).parameters
    expected = {name: p.default for name, p in signature.items()
                if p.default is not inspect.Parameter.empty}
    assert rows == expected
