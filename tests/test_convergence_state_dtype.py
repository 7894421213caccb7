"""Convergence benchmark rows with bfloat16 optimizer state: they build what they claim, merge
beside the float32 rows of the same tasks, and README's comparison table matches the raw runs."""

from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results" / "convergence.json"
sys.path.insert(0, str(BENCH))

import convergence  # noqa: E402
import report  # noqa: E402
from convergence_optimizers import OPTIMIZERS, neuro_name  # noqa: E402

REDUCED = [name for name, spec in OPTIMIZERS.items() if "state_dtype" in spec.settings]


def _committed() -> dict:
    if not RESULTS.exists():
        pytest.skip("no committed convergence results")
    return json.loads(RESULTS.read_text())


def _only(result: dict, keep) -> dict:
    """The part of a result that holds the optimizers ``keep(name)`` accepts."""
    part = copy.deepcopy(result)
    part["optimizers"] = {k: v for k, v in part["optimizers"].items() if keep(k)}
    for task in part["tasks"]:
        task["chosen_lr"] = {k: v for k, v in task["chosen_lr"].items() if keep(k)}
        task["selection"] = [r for r in task["selection"] if keep(r["optimizer"])]
        task["runs"] = [r for r in task["runs"] if keep(r["optimizer"])]
    part["summary"] = [r for r in part["summary"] if keep(r["optimizer"])]
    return part


def test_reduced_state_specs_store_bfloat16_buffers():
    assert REDUCED, "the zoo has no configuration with reduced-precision state"
    for name in REDUCED:
        spec = OPTIMIZERS[name]
        assert spec.settings["state_dtype"] == "bfloat16"
        assert name == neuro_name(spec.settings["update"], spec.settings["sam_rho"] > 0,
                                  spec.settings["lookahead_k"] > 0, "bfloat16")
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = spec.build(model.parameters(), 1e-3)
        x = torch.randn(5, 4)
        model(x).square().mean().backward()
        if spec.sam:  # the harness's two passes
            opt.first_step()
            model.zero_grad()
            model(x).square().mean().backward()
            opt.second_step()
        else:
            opt.step()
        rule = spec.settings["update"]
        buffers = {k: v for k, v in opt.state[model.weight].items() if k.startswith(rule + ".")}
        assert buffers and all(v.dtype == torch.bfloat16 for v in buffers.values()), (name, {
            k: v.dtype for k, v in buffers.items()})
        assert opt.state[model.weight]["lookahead.slow"].dtype == torch.float32


def test_neuro_name_rejects_an_unknown_state_dtype():
    with pytest.raises(ValueError, match="state_dtype"):
        neuro_name("adan", state_dtype="float8")


def test_merge_of_optimizer_subsets_rebuilds_the_committed_result(tmp_path):
    conv = _committed()
    if not any(name in conv["optimizers"] for name in REDUCED):
        pytest.skip("committed results have no reduced-state rows")
    full = tmp_path / "full.json"
    reduced = tmp_path / "reduced.json"
    full.write_text(json.dumps(_only(conv, lambda n: n not in REDUCED)))
    reduced.write_text(json.dumps(_only(conv, lambda n: n in REDUCED)))
    merged = convergence.merge([full, reduced], tmp_path / "merged.json")
    assert list(merged["optimizers"]) == list(conv["optimizers"])
    for got, want in zip(merged["tasks"], conv["tasks"], strict=True):
        for key in ("chosen_lr", "selection", "runs"):
            assert got[key] == want[key], (want["task"]["name"], key)
    assert merged["summary"] == conv["summary"]
    # The same optimizer on the same task in two files is an error, not a silent overwrite.
    with pytest.raises(ValueError, match="optimizers in two files"):
        convergence.merge([reduced, reduced], tmp_path / "twice.json")


def test_readme_state_table_recomputed_from_the_runs():
    """Independent of report.py's arithmetic: the differences README shows are the difference of
    the per-seed mean test accuracies, from the raw runs."""
    conv = _committed()
    pairs = report.state_pairs(conv)
    if not pairs:
        pytest.skip("committed results have no reduced-state rows")
    for plain, reduced_name, _ in pairs:  # twins differ in nothing but state_dtype
        a, b = conv["optimizers"][plain], conv["optimizers"][reduced_name]
        assert {k: v for k, v in b["settings"].items() if k != "state_dtype"} == a["settings"]
        assert (a["sam"], a["lr_grid"]) == (b["sam"], b["lr_grid"])
    # The table lives in the full report (README.md holds only a short verdict block).
    block = report.render({"convergence.json": conv}, detail=True)
    section = block.split("#### Optimizer state in reduced precision", 1)[1]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| task | configuration"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    expected = []
    for task in conv["tasks"]:
        accs: dict[str, list[float]] = {}
        for run in task["runs"]:
            accs.setdefault(run["optimizer"], []).append(run["final_acc"])
        for plain, reduced_name, _ in pairs:
            delta = statistics.mean(accs[reduced_name]) - statistics.mean(accs[plain])
            expected.append([task["task"]["name"], plain, f"{100 * delta:+.2f}"])
    assert [[r[0], r[1], r[6]] for r in rows] == expected
