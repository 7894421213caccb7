"""Benchmarks: the CI smoke run works, and README's benchmark block matches the committed JSON."""

from __future__ import annotations

import json
import math
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
import suite  # noqa: E402
import suite_analysis  # noqa: E402
import suite_candidates  # noqa: E402
import suite_charts  # noqa: E402
import suite_protocol  # noqa: E402
import suite_verdicts  # noqa: E402
import suite_workloads  # noqa: E402


def _block(text: str) -> str:
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1, \
        "README.md must hold exactly one benchmarks:begin/end pair"
    return report.current_block(text)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-smoke")
    # Files a smoke run would write if it ignored --out-dir (others' results may change
    # meanwhile: the tree is shared).
    # (A full suite run may be appending records meanwhile, so the suite's record files are
    # checked by content: no record of the quick profile.)
    mine = [RESULTS / "REPORT.md", ROOT / "README.md",
            RESULTS / report.SUITE_DIR / "suite_meta.json"]
    committed = {p: p.stat().st_mtime_ns for p in mine if p.exists()}
    subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--smoke", "--out-dir", str(out)],
                   cwd=ROOT, check=True, timeout=600)
    # The smoke run must not touch the committed results.
    assert {p: p.stat().st_mtime_ns for p in committed} == committed
    assert all(r.get("profile", "full") == "full"
               for r in suite.load_records(RESULTS / report.SUITE_DIR))
    return out


def test_smoke_run_writes_records_report_and_plots(smoke):
    records = suite.load_records(smoke / report.SUITE_DIR)
    assert (smoke / "REPORT.md").is_file()
    assert (smoke / "suite_digits-mlp.png").is_file()
    runnable, _ = suite.available(suite_candidates.CANDIDATES)
    # The "+ Lookahead" sharpness-aware rows run exactly where Lookahead pays.
    w = suite_workloads.workloads_for(quick=True)["digits-mlp"]
    seeds = {c: [r for r in records if r["candidate"] == c and r["phase"] == "seed"]
             for c in (suite_candidates.LOOKAHEAD, suite_candidates.PLAIN)}
    pays = suite_protocol.lookahead_pays(w, seeds[suite_candidates.LOOKAHEAD],
                                         seeds[suite_candidates.PLAIN])
    expected = {c for c in runnable if pays or not suite_candidates.CANDIDATES[c].with_lookahead}
    assert {r["candidate"] for r in records} == expected
    for rec in records:
        cand = suite_candidates.CANDIDATES[rec["candidate"]]
        plan = cand.plan(rec["budget"])
        assert rec["steps"] == plan.steps or rec["diverged"]
        # Gradient evaluations are counted, and every candidate's fit the same budget.
        assert rec["grad_evals"] == plan.grad_evals <= rec["budget"] or rec["diverged"]
        assert rec["curve"][-1][0] == rec["steps"]
        cpu = [p[2] for p in rec["curve"]]
        assert cpu == sorted(cpu)
    # Every candidate's chosen LR and rho are interior to the range searched (or the search
    # was capped), and its seeds ran at that setting.
    result = suite_analysis.analyse(records, {"profile": "quick", "seeds": 2})
    for row in result["workloads"]["digits-mlp"]["rows"].values():
        assert row["complete"]
        assert not row["lr_edge"] or row["lr_capped"]
        assert not row["rho_edge"] or row["rho_capped"]
        assert {(r["lr"], r["rho"]) for r in row["runs"]} == {(row["lr"], row["rho"])}
    readme = (smoke / "README.md").read_text()
    assert _block(readme) == report.readme_block(report.load_results(smoke))


def test_resumed_run_skips_existing_records(smoke, tmp_path):
    folder = tmp_path / "suite"
    shutil.copytree(smoke / report.SUITE_DIR, folder)
    before = (folder / "digits-mlp.jsonl").read_text()
    done = subprocess.run([sys.executable, str(BENCH / "suite.py"), "--profile", "quick",
                           "--out", str(folder), "--only", "AdamW"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "0 new runs" in done.stdout
    assert (folder / "digits-mlp.jsonl").read_text() == before


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
    """The results JSON as git's index holds them, written to ``folder`` (all of them outside
    a checkout): records a running suite is still appending, or files a benchmark has just
    written, are not part of the README until they are added."""
    listed = subprocess.run(["git", "ls-files", "benchmarks/results/*.json",
                             f"benchmarks/results/{report.SUITE_DIR}/*"], cwd=ROOT,
                            capture_output=True, text=True)
    names = listed.stdout.split() if listed.returncode == 0 else []
    if not names:
        for path in [*RESULTS.glob("*.json"), *(RESULTS / report.SUITE_DIR).glob("*")]:
            target = folder / path.relative_to(RESULTS)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        return folder
    for name in names:
        target = folder / (ROOT / name).relative_to(RESULTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run(["git", "show", f":{name}"], cwd=ROOT, check=True,
                                          capture_output=True).stdout)
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


def _committed_records(tmp_path) -> list[dict]:
    folder = _committed_results(tmp_path) / report.SUITE_DIR
    records = suite.load_records(folder) if folder.is_dir() else []
    if not records:
        pytest.skip("no committed suite records")
    return records


def test_verdict_table_recomputed_from_the_records(tmp_path):
    """Independent of suite_analysis's arithmetic: target, median epochs to target and mean test
    accuracy of AdamW and of the configuration NeuroOptima's defaults run, recomputed from the
    raw records, are the numbers README's verdict table shows."""
    records = _committed_records(tmp_path)
    block = _block((ROOT / "README.md").read_text())
    speed_row = next(line for line in block.splitlines() if line.startswith("| faster"))
    acc_row = next(line for line in block.splitlines() if line.startswith("| better"))
    checked = 0
    for name, w in suite_workloads.workloads_for(False).items():
        def chosen(cand):
            # The seed runs of the (lr, rho) the search chose: where a widened search moved
            # the choice after seeds had run, the pair whose search run scored best.
            mine = [r for r in records if r["workload"] == name and r["candidate"] == cand]
            groups: dict = {}
            for r in mine:
                if r["phase"] == "seed":
                    groups.setdefault((r["lr"], r["rho"]), []).append(r)
            search = {(r["lr"], r["rho"]): r for r in mine if r["phase"] == "search"}
            sign = 1 if w.higher_is_better else -1
            full = [k for k, g in groups.items() if len(g) >= 5 and k in search]
            if not full:
                return []
            return groups[max(full, key=lambda k: sign * search[k]["curve"][-1][3])]
        adamw, neuro = chosen("AdamW"), chosen(suite_verdicts.defaults_config())
        if len(adamw) < 5 or len(neuro) < 5:
            continue
        at = []
        for r in adamw:
            goal = 0.85 * r["budget"]
            at.append(min(r["curve"], key=lambda p: abs(p[1] - goal))[3])
        m = statistics.median(at)
        target = (math.floor(m * 1000) / 1000 if w.higher_is_better
                  else math.ceil(m * 200) / 200)

        def epochs(r):
            for _, grads, _, v in r["curve"]:
                if (v >= target) if w.higher_is_better else (v <= target):
                    return grads / r["steps_per_epoch"]
            return math.inf
        ne = statistics.median(sorted(epochs(r) for r in neuro))
        ae = statistics.median(sorted(epochs(r) for r in adamw))
        assert f"{name} {suite_verdicts._fmt(ne, 2)} vs {suite_verdicts._fmt(ae, 2)}" in speed_row
        if w.higher_is_better:
            na = statistics.fmean(r["test_final"]["acc"] for r in neuro)
            aa = statistics.fmean(r["test_final"]["acc"] for r in adamw)
            assert f"{name} {100 * na:.1f} vs {100 * aa:.1f}" in acc_row
        checked += 1
    if not checked:
        pytest.skip("no workload with complete AdamW rows and rows of the defaults yet")


def test_complete_rows_chose_an_interior_lr(tmp_path):
    """The runner widens the LR search until the best is interior before it runs the seeds."""
    result = suite_analysis.analyse(_committed_records(tmp_path))
    for name, wl in result["workloads"].items():
        for cand, row in wl["rows"].items():
            if row["complete"]:
                assert not row["lr_edge"] or row["lr_capped"], \
                    (name, cand, row["lr"], row["lr_tried"])
                assert not row["rho_edge"] or row["rho_capped"], \
                    (name, cand, row["rho"], row["rho_tried"])


def test_constructor_defaults_are_what_the_records_recommend(tmp_path):
    """NeuroOptima's defaults are set from the suite: its fastest configuration (geometric mean
    of gradient evaluations to target) and the LR never far from each workload's best."""
    result = suite_analysis.analyse(_committed_records(tmp_path))
    rec = suite_verdicts.recommended(result)
    if rec is None or len(rec["times"]) < len(result["workloads"]):
        pytest.skip("the NeuroOptima configurations are not complete on every workload yet")
    assert rec["defaults_agree"], (rec["best"], rec["defaults"], rec["settings"], rec["lr"])


def test_lion_learning_rate_is_what_the_records_recommend(tmp_path):
    """lr=None with the lion rules is the LR never far from each workload's best among the
    Lion baseline's searches (lion_adan, without rows of its own, takes Lion's)."""
    from neurooptima.validation import DEFAULT_LR

    result = suite_analysis.analyse(_committed_records(tmp_path))
    rows = [wl["rows"].get("Lion") for wl in result["workloads"].values()]
    if not all(r and r["complete"] for r in rows):
        pytest.skip("Lion is not complete on every workload yet")
    lr = suite_verdicts.robust_lr(rows)
    for rule in ("lion", "lion_adan"):
        assert suite_protocol.ladder_index(DEFAULT_LR[rule]) == suite_protocol.ladder_index(lr), \
            (rule, DEFAULT_LR[rule], lr)


def test_robust_lr_takes_the_best_worst_rank():
    rows = [dict(search_scores={1e-3: 0.9, 3.16e-3: 0.8, 1e-2: 0.1}),   # ranks 1, 2, 3
            dict(search_scores={1e-3: 0.2, 3.16e-3: 0.7, 1e-2: 0.9})]   # ranks 3, 2, 1
    assert suite_verdicts.robust_lr(rows) == 3.16e-3
    rows.append(dict(search_scores={1e-3: 0.5, 1e-2: 0.6}))             # 3.16e-3 untried
    # Worst ranks tie (3 and 3); mean ranks 2 for 1e-3, 5/3 for 1e-2.
    assert suite_verdicts.robust_lr(rows) == 1e-2


def test_adamw_reaches_its_target(tmp_path):
    result = suite_analysis.analyse(_committed_records(tmp_path))
    for name, wl in result["workloads"].items():
        row = wl["rows"].get("AdamW")
        if row and row["complete"]:
            assert row["reached"] >= 4, (name, row["reached"])


def test_generalization_bound_workload_has_a_gap(tmp_path):
    """What makes fashion-2k generalization-bound: tuned AdamW's training accuracy exceeds its
    test accuracy by at least 8 points (mean over seeds), recomputed from the raw records."""
    result = suite_analysis.analyse(_committed_records(tmp_path))
    row = result["workloads"][suite_charts.GENERALIZATION_BOUND]["rows"].get("AdamW")
    if not row or not row["complete"]:
        pytest.skip("tuned AdamW not complete on the generalization-bound workload yet")
    gaps = [r["train_final"]["acc"] - r["test_final"]["acc"] for r in row["runs"]]
    assert statistics.fmean(gaps) >= 0.08, gaps


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


# ------------------------------------------------------------------ protocol pieces

def test_run_plan_fits_the_gradient_budget():
    """SAM on every step: half the steps; every k-th step: k/(k+1); from a fraction f of the
    steps on: 1/(2-f); always the most steps whose gradient evaluations fit."""
    def cost(steps, every, start):
        return steps + sum(1 for i in range(start, steps + 1) if i % every == 0)

    assert suite_candidates.run_plan(1000).steps == 1000
    assert suite_candidates.run_plan(1000, 1).steps == 500
    assert suite_candidates.run_plan(1000, 4).steps == 800
    late = suite_candidates.run_plan(1000, 1, 0.5)
    assert late.steps == 666 and late.sam_start == 334 and late.grad_evals == 999
    for budget in (7, 100, 1001):
        for every, frac in ((1, 0.0), (3, 0.0), (4, 0.25), (1, 0.5)):
            p = suite_candidates.run_plan(budget, every, frac)
            assert p.grad_evals == cost(p.steps, every, p.sam_start) <= budget
            start = math.floor(frac * (p.steps + 1)) + 1
            assert cost(p.steps + 1, every, start) > budget
            assert p.warmup == max(1, round(0.05 * p.steps))


def test_warmup_cosine_schedule():
    import training_step
    f = [training_step.warmup_cosine(s, 100, 5) for s in range(100)]
    assert f[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert f[5] == 1.0 and all(a >= b for a, b in zip(f[5:], f[6:]))
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 94 / 95)))
    assert f[52] == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))


def _msam_reference(w0, grads_at, lr, rho, wd, steps, b1=0.9, b2=0.999, eps=1e-8):
    """Becker et al.'s MSAM-AdamW from its equations on a list of tensors (independent of
    benchmarks/msam_adamw.py): returns (w, w~) after ``steps`` steps."""
    import torch
    w = [t.clone() for t in w0]
    m = [torch.zeros_like(t) for t in w]
    v = [torch.zeros_like(t) for t in w]
    s = 0.0
    for t in range(1, steps + 1):
        w_tilde = [wi - s * mi for wi, mi in zip(w, m)]
        g = grads_at(w_tilde)
        for i in range(len(w)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            step = (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
            w[i] = (w[i] - lr * step) * (1 - lr * wd)
        s = rho / (math.sqrt(sum(float((mi ** 2).sum()) for mi in m)) + 1e-12)
    return w, [wi - s * mi for wi, mi in zip(w, m)]


def test_msam_adamw_follows_the_paper_and_evaluates_at_w():
    import torch
    from msam_adamw import MSAMAdamW
    torch.manual_seed(0)
    a = torch.randn(4, 3, dtype=torch.float64)
    target = torch.randn(4, dtype=torch.float64)
    w0 = [torch.randn(3, dtype=torch.float64), torch.randn(1, dtype=torch.float64)]

    def loss_of(w):
        return ((a @ w[0] + w[1] - target) ** 2).mean() + (w[0] ** 4).sum()

    def grads_at(w):
        w = [t.clone().requires_grad_() for t in w]
        return list(torch.autograd.grad(loss_of(w), w))

    params = [t.clone().requires_grad_() for t in w0]
    opt = MSAMAdamW(params, lr=0.05, rho=0.3, weight_decay=0.1)
    for _ in range(6):
        opt.zero_grad()
        loss_of(params).backward()
        opt.step()
    w, w_tilde = _msam_reference(w0, grads_at, 0.05, 0.3, 0.1, 6)
    for p, ref in zip(params, w_tilde):
        torch.testing.assert_close(p.detach(), ref)
    opt.eval()
    for p, ref in zip(params, w):
        torch.testing.assert_close(p.detach(), ref)
    with pytest.raises(RuntimeError, match="train"):
        opt.step()
    opt.train()
    for p, ref in zip(params, w_tilde):
        torch.testing.assert_close(p.detach(), ref)


def test_train_step_counts_gradient_evaluations():
    """The closure is charged per call: SAM on every 2nd step costs 3 gradients per 2 steps;
    pytorch_optimizer's SAM (first_step / second_step) 2 per step; AdamW 1."""
    import torch
    import training_step
    from neurooptima import NeuroOptima
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert training_step.train_step(model, adamw, x, y)[1] == 1
    sam = suite_candidates._pt("SAM")(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    assert training_step.train_step(model, sam, x, y, two_pass=True)[1] == 2
    cand = suite_candidates.CANDIDATES[f"NeuroOptima SAM every {suite_candidates.SAM_INTERVAL}th"]
    if cand.missing():
        pytest.skip(f"NeuroOptima lacks {cand.missing()}")
    bn = model[1]
    opt = NeuroOptima(model.parameters(), lr=1e-3, sam_rho=0.05, sam_interval=2)
    spent = [training_step.train_step(model, opt, x, y)[1] for _ in range(4)]
    assert spent == [1, 2, 1, 2]
    # BatchNorm's running statistics saw each batch once: 2 (AdamW, SAM) + 4 steps.
    assert int(bn.num_batches_tracked) == 1 + 1 + 4


def test_equal_cpu_reading_interpolates_between_test_points():
    rec = dict(diverged=False, tests=[[50, 50, 10.0, 0.80, 0.6], [75, 75, 15.0, 0.85, 0.5],
                                      [100, 100, 20.0, 0.90, 0.4]])
    assert suite_analysis.test_at_cpu(rec, 25.0) == dict(acc=0.90, loss=0.4)   # finished sooner
    got = suite_analysis.test_at_cpu(rec, 12.5)
    assert got["acc"] == pytest.approx(0.825) and got["loss"] == pytest.approx(0.55)
    assert suite_analysis.test_at_cpu(rec, 5.0) is None                       # no point yet
    assert suite_analysis.test_at_cpu(dict(rec, diverged=True), 25.0) is None


def _scored(values: dict[float, float]) -> dict[float, dict]:
    """Search records whose final validation accuracy is the given value per setting."""
    return {v: dict(diverged=False, curve=[[1, 1, 0.0, acc]]) for v, acc in values.items()}


def test_choose_takes_a_flat_best_inside_the_tried_range():
    w = suite_workloads.workloads_for(quick=True)["digits-mlp"]
    # A plateau from the lower edge into the range: its smallest inner point, no edge.
    assert suite_protocol.choose(w, _scored({1e-3: 0.9, 2e-3: 0.9, 5e-3: 0.9, 1e-2: 0.8})) \
        == (2e-3, False)
    # The best only at an edge: that edge, flagged so the search widens.
    assert suite_protocol.choose(w, _scored({1e-3: 0.9, 2e-3: 0.8, 5e-3: 0.7})) == (1e-3, True)
    assert suite_protocol.choose(w, _scored({1e-3: 0.7, 2e-3: 0.9, 5e-3: 0.9})) == (2e-3, False)


def test_widen_resumes_from_recorded_points():
    """A resumed search chooses from every recorded point, as the report does, and runs only
    what is missing."""
    w = suite_workloads.workloads_for(quick=True)["digits-mlp"]
    ladder = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    acc = {1.0: 0.5, 2.0: 0.6, 3.0: 0.7, 4.0: 0.8, 5.0: 0.9, 6.0: 0.85}
    ran = []

    def run(v):
        ran.append(v)
        return _scored({v: acc[v]})[v]

    search = suite_protocol.widen(w, ladder, 3.0, 9, run)
    assert ran == [2.0, 3.0, 4.0, 5.0, 6.0] and suite_protocol.choose(w, search)[0] == 5.0
    ran.clear()
    again = suite_protocol.widen(w, ladder, 3.0, 9, run, known=search)
    assert ran == [] and suite_protocol.choose(w, again) == (5.0, False)
    # Only the first three recorded: the search goes on from there.
    part = {v: search[v] for v in (2.0, 3.0, 4.0)}
    resumed = suite_protocol.widen(w, ladder, 3.0, 9, run, known=part)
    assert suite_protocol.choose(w, resumed)[0] == 5.0
    assert ran == [5.0, 6.0]


def test_lookahead_rows_are_run_only_where_lookahead_pays():
    w = suite_workloads.workloads_for(quick=True)["digits-mlp"]
    better, worse = [_scored({0: 0.95})[0]] * 2, [_scored({0: 0.90})[0]] * 2
    assert suite_protocol.lookahead_pays(w, better, worse)
    assert not suite_protocol.lookahead_pays(w, worse, better)
    gated = [c for c, cand in suite_candidates.CANDIDATES.items() if cand.with_lookahead]
    assert gated and all("Lookahead" in c for c in gated)
    # The report names the rows the runner leaves out, and does not count them as planned.
    rows = {suite_candidates.LOOKAHEAD: dict(complete=True, runs=worse),
            suite_candidates.PLAIN: dict(complete=True, runs=better)}
    assert suite_analysis._not_run(w, rows) == gated
    rows[suite_candidates.LOOKAHEAD]["runs"] = [_scored({0: 0.97})[0]] * 2
    assert suite_analysis._not_run(w, rows) == []


def test_defaults_are_chosen_among_one_gradient_configurations():
    """The fastest configuration may take a second gradient on some steps (scheduled SAM);
    the defaults are the fastest that takes one a step, so plain step() runs them anywhere."""
    every = f"NeuroOptima SAM every {suite_candidates.SAM_INTERVAL}th"
    assert suite_verdicts.one_gradient("NeuroOptima momentum ascent")
    assert not suite_verdicts.one_gradient(every)
    assert not suite_verdicts.one_gradient("NeuroOptima late SAM")
    times = {"NeuroOptima Adan": 300, "NeuroOptima Lookahead": 400,
             "NeuroOptima momentum ascent": 500, every: 200, "NeuroOptima late SAM": 250}

    def row(t):
        return dict(complete=True, grad_evals_to_target=t, lr=3.16e-3,
                    search_scores={1e-3: 0.5, 3.16e-3: 0.9, 1e-2: 0.7})
    result = dict(workloads={w: dict(target=0.9, rows={n: row(t) for n, t in times.items()},
                                     planned=list(times)) for w in ("a", "b")})
    rec = suite_verdicts.recommended(result)
    assert rec["best_any"] == every and rec["best"] == "NeuroOptima Adan"
    assert rec["lr"] == 3.16e-3
    text = "\n".join(suite_verdicts.recommendation(result))
    # A configuration every workload runs but one has not finished: no recommendation yet;
    # one that a workload leaves out (Lookahead paying nothing there) is not compared.
    extra = "NeuroOptima momentum ascent + Lookahead"
    for wl in result["workloads"].values():
        wl["planned"].append(extra)
    result["workloads"]["a"]["rows"][extra] = row(100)
    assert suite_verdicts.recommended(result) is None
    result["workloads"]["b"]["planned"].remove(extra)
    assert suite_verdicts.recommended(result)["best_any"] == every
    assert f"**{every}**" in text and "needs a closure" in text


def test_store_survives_a_record_cut_short(tmp_path):
    """A run killed while its record was being written loses that run only: the piece is
    ignored, the next record starts a line of its own, and both load again."""
    store = suite.Store(tmp_path)
    store.add(dict(key="a", workload="w", value=1))
    with open(tmp_path / "w.jsonl", "a") as f:
        f.write('{"key":"b","workload":"w","val')  # cut short
    again = suite.Store(tmp_path)
    assert set(again.records) == {"a"}
    again.add(dict(key="c", workload="w", value=3))
    assert set(suite.Store(tmp_path).records) == {"a", "c"}
