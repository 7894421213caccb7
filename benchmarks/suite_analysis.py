"""The time-to-target suite's records turned into numbers: targets, chosen settings, times to
target, final test metrics at equal gradient evaluations and equal CPU seconds, differences.

Nothing here is stored: everything is derived from the run records that ``suite.py`` writes
(warm-up + cosine protocol), so adding records (a later sitting) changes the report and nothing
else. ``suite_verdicts`` turns these numbers into answers, ``suite_charts`` into charts and
``suite_report`` into REPORT.md's section.

Definitions (AlgoPerf-style):

* Target of a workload: the validation metric a tuned AdamW reaches at 85 % of its gradient
  budget (median over its evaluation seeds of the evaluation nearest that point), accuracy
  rounded down to 0.1 point, loss rounded up to 0.005. A run reaches it at its first evaluation
  at or beyond it; gradient evaluations, steps, epochs and CPU seconds of training are read
  there.
* Time to target of a row (workload, candidate): the median over its seeds, a seed that never
  reaches counted as infinitely slow (so the median is infinite when half or more never reach).
* Equal gradient evaluations: every run spends the same budget, so its final test metric is the
  metric at equal gradient evaluations.
* Equal CPU seconds: the test metric when the run had spent tuned AdamW's median CPU seconds of
  training (linear between the run's test points; its final metric when it finished sooner).
  A slower candidate is read part-way through its schedule: that is what it delivers in
  AdamW's time, not what a schedule fitted to that time would.
* Performance profile of a candidate: for each tau, the fraction of workloads where its time to
  target is at most tau times the best candidate's on that workload.
"""

from __future__ import annotations

import math
import statistics

from suite_candidates import CANDIDATES, LOOKAHEAD, PLAIN, Candidate
from suite_protocol import (LADDER, MAX_LR_TRIALS, MAX_RHO_TRIALS, RHO_LADDER, choose,
                            lookahead_pays, score)
from suite_workloads import Workload, workloads_for

BASE = "AdamW"
TARGET_FRACTION = 0.85
# Curve points: [step, gradient evaluations, CPU s, validation metric];
# test points: [step, gradient evaluations, CPU s, test accuracy, test loss].
STEP, GRADS, CPU, VALUE = 0, 1, 2, 3


def workloads(meta: dict | None = None) -> dict[str, Workload]:
    """The workload specs: from a record folder's meta (quick profile) or the full suite."""
    if meta and meta.get("profile") == "quick":
        return workloads_for(True)
    return workloads_for(False)


# ------------------------------------------------------------------ rows

def target_of(w: Workload, adamw_seeds: list[dict]) -> float | None:
    if not adamw_seeds:
        return None
    values = []
    for rec in adamw_seeds:
        goal = TARGET_FRACTION * rec["budget"]
        points = [p for p in rec["curve"] if p[VALUE] is not None]
        if not points:
            continue
        values.append(min(points, key=lambda p: abs(p[GRADS] - goal))[VALUE])
    if not values:
        return None
    m = statistics.median(values)
    return math.floor(m * 1000) / 1000 if w.higher_is_better else math.ceil(m * 200) / 200


def reach(w: Workload, rec: dict, target: float) -> dict | None:
    for step, grads, cpu, value in rec["curve"]:
        if value is None:
            return None
        if (value >= target) if w.higher_is_better else (value <= target):
            # Epochs of gradient evaluations: equal compute for one- and two-gradient steps.
            return dict(steps=step, grad_evals=grads, cpu_s=cpu,
                        epochs=grads / rec["steps_per_epoch"])
    return None


def test_at_cpu(rec: dict, cpu: float) -> dict | None:
    """Test accuracy and loss when the run had spent ``cpu`` seconds of training: its final
    metric if it finished sooner, else linear between the test points around ``cpu``; None
    before its first test point or for a diverged run."""
    pts = [p for p in rec.get("tests", []) if p[3] is not None]
    if rec["diverged"] or not pts:
        return None
    if pts[-1][CPU] <= cpu:
        return dict(acc=pts[-1][3], loss=pts[-1][4])
    for a, b in zip(pts, pts[1:]):
        if a[CPU] <= cpu < b[CPU]:
            t = (cpu - a[CPU]) / max(1e-12, b[CPU] - a[CPU])
            loss = None if a[4] is None or b[4] is None else a[4] + t * (b[4] - a[4])
            return dict(acc=a[3] + t * (b[3] - a[3]), loss=loss)
    return None


def _median_inf(values: list[float]) -> float:
    return statistics.median(sorted(values)) if values else math.inf


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def chosen_setting(w: Workload, cand: Candidate, search: list[dict]) -> dict | None:
    """The (lr, rho) the runner's tuning chose from these search records, with the values
    tried and whether the choice sits at an edge of what was tried; None without records."""
    lr_runs = {r["lr"]: r for r in search if r["rho"] == cand.rho_start}
    if not lr_runs:
        return None
    lr, lr_edge = choose(w, lr_runs)
    out = dict(lr=lr, lr_tried=sorted(lr_runs),
               lr_edge=lr_edge or lr in (LADDER[0], LADDER[-1]),
               lr_capped=len(lr_runs) >= MAX_LR_TRIALS,
               search_scores={x: score(w, r) for x, r in lr_runs.items()},
               rho=None, rho_tried=[], rho_edge=False, rho_capped=False, rho_scores={})
    if cand.tune_rho:
        rho_runs = {r["rho"]: r for r in search if r["lr"] == lr}
        rho, rho_edge = choose(w, rho_runs)
        out.update(rho=rho, rho_tried=sorted(rho_runs),
                   rho_edge=rho_edge or rho in (RHO_LADDER[0], RHO_LADDER[-1]),
                   rho_capped=len(rho_runs) >= MAX_RHO_TRIALS,
                   rho_scores={x: score(w, r) for x, r in rho_runs.items()})
    return out


def analyse(records: list[dict], meta: dict | None = None, seeds: int | None = None) -> dict:
    """Per workload: target and one row per candidate with everything the report shows."""
    specs = workloads(meta)
    seeds = seeds or (meta or {}).get("seeds") or 5
    by: dict[tuple[str, str], list[dict]] = {}
    for rec in records:
        by.setdefault((rec["workload"], rec["candidate"]), []).append(rec)
    out: dict[str, dict] = {}
    for wname, w in specs.items():
        rows: dict[str, dict] = {}
        for cname, cand in CANDIDATES.items():
            recs = by.get((wname, cname), [])
            chosen = chosen_setting(w, cand, [r for r in recs if r["phase"] == "search"])
            if chosen is None:
                continue
            runs = sorted((r for r in recs if r["phase"] == "seed" and r["lr"] == chosen["lr"]
                           and r["rho"] == chosen["rho"]), key=lambda r: r["seed"])
            rows[cname] = dict(chosen, candidate=cname, runs=runs, complete=len(runs) >= seeds,
                               grad_evals_per_step=statistics.fmean(
                                   r["grad_evals"] / r["steps"] for r in recs if r["steps"]))
        base = rows.get(BASE, {})
        target = target_of(w, base.get("runs", []) if base.get("complete") else [])
        ref_cpu = (statistics.median(r["cpu_s"] for r in base["runs"])
                   if base.get("complete") else None)
        for row in rows.values():
            _measure(w, row, target, ref_cpu)
        out[wname] = dict(workload=w, target=target, ref_cpu=ref_cpu, rows=rows,
                          planned=[c for c, cand in CANDIDATES.items()
                                   if not cand.only_on or wname in cand.only_on],
                          not_run=_not_run(w, rows))
        out[wname]["planned"] = [c for c in out[wname]["planned"]
                                 if c not in out[wname]["not_run"]]
    return dict(workloads=out, seeds=seeds, n_records=len(records))


def _not_run(w: Workload, rows: dict[str, dict]) -> list[str]:
    """The "+ Lookahead" sharpness-aware rows the suite does not run on this workload
    because Lookahead does not pay there (as ``suite.Suite.due`` decides)."""
    la, plain = rows.get(LOOKAHEAD), rows.get(PLAIN)
    if not (la and plain and la["complete"] and plain["complete"]) or \
            lookahead_pays(w, la["runs"], plain["runs"]):
        return []
    return [c for c, cand in CANDIDATES.items() if cand.with_lookahead and c not in rows]


def _measure(w: Workload, row: dict, target: float | None, ref_cpu: float | None) -> None:
    runs = row["runs"]
    hits = [reach(w, r, target) if target is not None else None for r in runs]
    row["reached"] = sum(h is not None for h in hits)
    for key in ("steps", "grad_evals", "cpu_s", "epochs"):
        vals = [h[key] if h else math.inf for h in hits]
        row[f"{key}_to_target"] = _median_inf(vals) if runs and target is not None else None
        finite = [v for v in vals if math.isfinite(v)]
        row[f"{key}_spread"] = (min(finite), max(finite)) if finite else None
        row[f"{key}_per_seed"] = vals
    final = [r["test_final"] for r in runs if r["test_final"]]
    at_cpu = [test_at_cpu(r, ref_cpu) for r in runs] if ref_cpu is not None else []
    row["acc"] = _mean_std([e["acc"] for e in final])
    row["loss"] = _mean_std([e["loss"] for e in final])
    row["acc_equal_cpu"] = _mean_std([e["acc"] for e in at_cpu if e])
    row["loss_equal_cpu"] = _mean_std([e["loss"] for e in at_cpu if e])
    row["equal_cpu_missing"] = sum(e is None for e in at_cpu)
    row["train_acc"] = _mean_std([r["train_final"]["acc"] for r in runs if r["train_final"]])
    row["gap"] = _mean_std([r["train_final"]["acc"] - r["test_final"]["acc"] for r in runs
                            if r["train_final"] and r["test_final"]])
    row["loss_var"] = _mean_std([r["train_loss_tail_var"] for r in runs])
    row["diverged"] = sum(r["diverged"] for r in runs)
    row["cpu_s_run"] = _mean_std([r["cpu_s"] for r in runs])


def _final_key(w: Workload, equal: str) -> str:
    """Row key of the final test metric at equal gradient evaluations ("g") or CPU ("cpu")."""
    base = "acc" if w.higher_is_better else "loss"
    return base if equal == "g" else f"{base}_equal_cpu"


def difference(w: Workload, a: dict, b: dict, key: str) -> tuple[float, float] | None:
    """(a - b, two standard errors of the difference) of a per-seed metric's means, in the
    direction where positive is better (loss negated); None when either is missing."""
    (am, as_), (bm, bs) = a[key], b[key]
    if am is None or bm is None:
        return None
    na, nb = max(1, len(a["runs"])), max(1, len(b["runs"]))
    sign = 1.0 if w.higher_is_better else -1.0
    return sign * (am - bm), 2 * math.sqrt(as_ ** 2 / na + bs ** 2 / nb)


def _says(d: tuple[float, float] | None) -> str:
    if d is None:
        return "open"
    delta, band = d
    return "better" if delta > band else "worse" if delta < -band else "no difference beyond noise"
