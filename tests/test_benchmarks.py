"""Benchmarks: the CI smoke run works, and README's benchmark block matches the committed JSON."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402


def _block(text: str) -> str:
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1, \
        "README.md must hold exactly one benchmarks:begin/end pair"
    return report.current_block(text)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-smoke")
    # Files a smoke run would write if it ignored --out-dir (others' results may change
    # meanwhile: the tree is shared).
    mine = [RESULTS / "convergence.json", RESULTS / "REPORT.md", ROOT / "README.md"]
    committed = {p: p.stat().st_mtime_ns for p in mine if p.exists()}
    subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--smoke", "--out-dir", str(out)],
                   cwd=ROOT, check=True, timeout=600)
    # The smoke run must not touch the committed results.
    assert {p: p.stat().st_mtime_ns for p in committed} == committed
    return out


def test_smoke_run_writes_results_report_and_plots(smoke):
    conv = json.loads((smoke / "convergence.json").read_text())
    assert conv["profile"] == "smoke"
    assert (smoke / "REPORT.md").is_file()
    assert list(smoke.glob("convergence_*_curves.png"))
    task = conv["tasks"][0]
    steps = task["task"]["steps"]
    for run in task["runs"]:
        sam = conv["optimizers"][run["optimizer"]]["sam"]
        assert run["steps"] == steps
        assert run["grad_evals"] == steps * (2 if sam else 1)
        assert 0.0 <= run["final_acc"] <= 1.0
        assert run["curve"][-1]["steps"] == steps
        assert any(p["steps"] == steps // 2 for p in run["curve"])
    # The chosen LR is the grid point with the best validation accuracy.
    for name, lr in task["chosen_lr"].items():
        grid = [r for r in task["selection"] if r["optimizer"] == name]
        assert len(grid) == len(conv["optimizers"][name]["lr_grid"])
        assert max(grid, key=lambda r: r["final_acc"])["final_acc"] == \
            [r for r in grid if r["lr"] == lr][0]["final_acc"]
    readme = (smoke / "README.md").read_text()
    assert _block(readme) == report.readme_block(report.load_results(smoke))


def test_check_fails_on_a_stale_block(smoke, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(smoke, results)
    readme = results / "README.md"
    readme.write_text(readme.read_text().replace("| claim | measured | verdict |",
                                                 "| claim | measured (stale) | verdict |"))
    done = subprocess.run([sys.executable, str(BENCH / "report.py"), "--results", str(results),
                           "--readme", str(readme), "--check"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr


def _committed_results(folder: Path) -> Path:
    """The results JSON that git tracks, copied to ``folder`` (all of them outside a checkout):
    files a benchmark has just written but nobody committed yet are not part of the README."""
    listed = subprocess.run(["git", "ls-files", "benchmarks/results/*.json"], cwd=ROOT,
                            capture_output=True, text=True)
    names = listed.stdout.split() if listed.returncode == 0 else []
    paths = [ROOT / n for n in names] if names else list(RESULTS.glob("*.json"))
    for path in paths:
        shutil.copyfile(path, folder / path.name)
    return folder


def test_readme_block_is_generated_from_committed_json(tmp_path):
    block = _block((ROOT / "README.md").read_text())
    expected = report.readme_block(report.load_results(_committed_results(tmp_path)))
    assert block == expected, \
        "README.md's benchmark block is stale: run python benchmarks/report.py and commit"


def _table_rows(markdown: str, header_start: str) -> list[list[str]]:
    lines = markdown.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if line.startswith(f"| {header_start}"):
            for body in lines[i + 2:]:
                if not body.startswith("|"):
                    break
                rows.append([c.strip() for c in body.strip("|").split(" | ")])
    return rows


def test_readme_accuracies_recomputed_from_the_runs():
    """Independent of report.py's arithmetic: mean and std of each optimizer's per-seed final
    test accuracy, recomputed from the raw runs, are what the report shows."""
    path = RESULTS / "convergence.json"
    if not path.exists():
        pytest.skip("no committed convergence results")
    conv = json.loads(path.read_text())
    block = report.render(report.load_results(RESULTS), detail=True)
    shown = []
    for task in conv["tasks"]:
        section = block.split(f"#### {task['task']['name']}", 1)[1].split("####", 1)[0]
        rows = {r[0]: r for r in _table_rows(section, "optimizer | LR")}
        by_opt: dict[str, list[float]] = {}
        for run in task["runs"]:
            by_opt.setdefault(run["optimizer"], []).append(run["final_acc"])
        assert set(rows) == set(by_opt)
        for name, accs in by_opt.items():
            mean, std = statistics.mean(accs), statistics.stdev(accs)
            assert rows[name][2] == f"{100 * mean:.1f} ± {100 * std:.1f}", (task, name)
            shown.append(name)
    assert shown


def test_readme_block_is_short_and_links_the_report():
    block = _block((ROOT / "README.md").read_text())
    assert len(block.splitlines()) <= report.README_BLOCK_MAX_LINES
    assert "benchmarks/results/REPORT.md" in block
    for claim in report.CLAIMS:
        assert claim in block


def test_report_communication_bytes_match_json():
    path = RESULTS / "communication.json"
    if not path.exists():
        pytest.skip("no committed communication results")
    comm = json.loads(path.read_text())
    block = report.render(report.load_results(RESULTS), detail=True)
    rows = _table_rows(block, "strategy | SAM")
    assert len(rows) == len(comm["records"])
    for row, rec in zip(rows, comm["records"]):
        assert row[:3] == [rec["strategy"], rec["sam_mode"], str(rec["world_size"])]
        assert int(re.sub(r"[^0-9]", "", row[4])) == round(rec["bytes_per_step"])
        assert int(re.sub(r"[^0-9]", "", row[5])) == round(rec["bytes_formula"])
