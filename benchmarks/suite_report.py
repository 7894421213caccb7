"""Everything the report says about the time-to-target suite, computed from its records.

Nothing here is stored: targets, chosen settings, times to target, verdicts and profiles are all
derived from the run records that ``suite.py`` writes (warm-up + cosine protocol), so adding
records (a later sitting) changes the report and nothing else.

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
from pathlib import Path

import suite as S

CLAIMS = ("faster convergence: target in 20 epochs where Adam needs 30",
          "better generalization: 92 % vs 89 % test accuracy",
          "lower loss variance than Adam")
NEURO = "NeuroOptima default"
BASE = "AdamW"
TARGET_FRACTION = 0.85
# Curve points: [step, gradient evaluations, CPU s, validation metric];
# test points: [step, gradient evaluations, CPU s, test accuracy, test loss].
STEP, GRADS, CPU, VALUE = 0, 1, 2, 3
# The questions the report answers per workload: (label, candidate, the same without it).
ONE_GRADIENT = (("MSAM(AdamW)", "AdamW"),
                ("NeuroOptima momentum ascent", NEURO),
                ("NeuroOptima momentum ascent + Lookahead", "NeuroOptima Lookahead"))
SCHEDULED = (("SAM(AdamW)", "AdamW"),
             (f"NeuroOptima SAM every {S.SAM_INTERVAL}th", NEURO),
             ("NeuroOptima late SAM", NEURO),
             (f"NeuroOptima SAM every {S.SAM_INTERVAL}th + Lookahead", "NeuroOptima Lookahead"),
             ("NeuroOptima late SAM + Lookahead", "NeuroOptima Lookahead"))


def workloads(meta: dict | None = None) -> dict[str, S.Workload]:
    """The workload specs: from a record folder's meta (quick profile) or the full suite."""
    if meta and meta.get("profile") == "quick":
        return S._workloads(True)
    return S._workloads(False)


# ------------------------------------------------------------------ rows

def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "never"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def target_of(w: S.Workload, adamw_seeds: list[dict]) -> float | None:
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


def reach(w: S.Workload, rec: dict, target: float) -> dict | None:
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


def chosen_setting(w: S.Workload, cand: S.Candidate, search: list[dict]) -> dict | None:
    """The (lr, rho) the runner's tuning chose from these search records, with the values
    tried and whether the choice sits at an edge of what was tried; None without records."""
    lr_runs = {r["lr"]: r for r in search if r["rho"] == cand.rho_start}
    if not lr_runs:
        return None
    lr, lr_edge = S.choose(w, lr_runs)
    out = dict(lr=lr, lr_tried=sorted(lr_runs),
               lr_edge=lr_edge or lr in (S.LADDER[0], S.LADDER[-1]),
               lr_capped=len(lr_runs) >= S.MAX_LR_TRIALS,
               search_scores={x: S.score(w, r) for x, r in lr_runs.items()},
               rho=None, rho_tried=[], rho_edge=False, rho_capped=False, rho_scores={})
    if cand.tune_rho:
        rho_runs = {r["rho"]: r for r in search if r["lr"] == lr}
        rho, rho_edge = S.choose(w, rho_runs)
        out.update(rho=rho, rho_tried=sorted(rho_runs),
                   rho_edge=rho_edge or rho in (S.RHO_LADDER[0], S.RHO_LADDER[-1]),
                   rho_capped=len(rho_runs) >= S.MAX_RHO_TRIALS,
                   rho_scores={x: S.score(w, r) for x, r in rho_runs.items()})
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
        for cname, cand in S.CANDIDATES.items():
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
                          planned=[c for c, cand in S.CANDIDATES.items()
                                   if not cand.only_on or wname in cand.only_on],
                          not_run=_not_run(w, rows))
        out[wname]["planned"] = [c for c in out[wname]["planned"]
                                 if c not in out[wname]["not_run"]]
    return dict(workloads=out, seeds=seeds, n_records=len(records))


def _not_run(w: S.Workload, rows: dict[str, dict]) -> list[str]:
    """The "+ Lookahead" sharpness-aware rows the suite does not run on this workload
    because Lookahead does not pay there (as ``suite.Suite.due`` decides)."""
    la, plain = rows.get(S.LOOKAHEAD), rows.get(S.DEFAULT)
    if not (la and plain and la["complete"] and plain["complete"]) or \
            S.lookahead_pays(w, la["runs"], plain["runs"]):
        return []
    return [c for c, cand in S.CANDIDATES.items() if cand.with_lookahead and c not in rows]


def _measure(w: S.Workload, row: dict, target: float | None, ref_cpu: float | None) -> None:
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


def _final_key(w: S.Workload, equal: str) -> str:
    """Row key of the final test metric at equal gradient evaluations ("g") or CPU ("cpu")."""
    base = "acc" if w.higher_is_better else "loss"
    return base if equal == "g" else f"{base}_equal_cpu"


def difference(w: S.Workload, a: dict, b: dict, key: str) -> tuple[float, float] | None:
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


# ------------------------------------------------------------------ verdicts

def _pairs(result: dict) -> list[tuple[str, dict, dict, S.Workload]]:
    """(workload, NeuroOptima default row, AdamW row) where both are complete."""
    out = []
    for name, wl in result["workloads"].items():
        n, a = wl["rows"].get(NEURO), wl["rows"].get(BASE)
        if n and a and n["complete"] and a["complete"] and wl["target"] is not None:
            out.append((name, n, a, wl["workload"]))
    return out


def _diff_text(w: S.Workload, n: dict, a: dict, key: str) -> str:
    d = difference(w, n, a, key)
    if d is None:
        return "–"
    scale, fmt = (100, ".1f") if w.higher_is_better else (1, ".3f")
    (nm, _), (am, _) = n[key], a[key]
    return (f"{scale * nm:{fmt}} vs {scale * am:{fmt}} ({scale * d[0]:+{fmt}} ± "
            f"{scale * d[1]:{fmt}})")


def verdict_rows(result: dict) -> list[list[str]]:
    pairs = _pairs(result)
    if not pairs:
        return [[c, "not measured yet (no workload has complete AdamW and NeuroOptima default "
                 "rows)", "open"] for c in CLAIMS]
    rows = []
    # 1. speed: epochs to target (gradient evaluations and CPU seconds)
    parts, cpu_parts, faster_g, faster_cpu, holds = [], [], 0, 0, True
    for name, n, a, _ in pairs:
        ne, ae = n["epochs_to_target"], a["epochs_to_target"]
        nc, ac = n["cpu_s_to_target"], a["cpu_s_to_target"]
        ng, ag = n["grad_evals_to_target"], a["grad_evals_to_target"]
        faster_g += ng < ag
        faster_cpu += nc < ac
        holds &= math.isfinite(ag) and ng <= ag * 20 / 30
        parts.append(f"{name} {_fmt(ne, 2)} vs {_fmt(ae, 2)}")
        cpu_parts.append(f"{name} {_fmt(nc, 2)} vs {_fmt(ac, 2)}")
    k = len(pairs)
    rows.append([CLAIMS[0], "median epochs of gradient evaluations to target, NeuroOptima "
                 "default vs AdamW: " + "; ".join(parts) + "; CPU seconds to target: "
                 + "; ".join(cpu_parts) + " (claim: ratio 0.67)",
                 "holds" if holds else
                 f"does not hold: faster on {faster_g} of {k} workloads in gradient "
                 f"evaluations, {faster_cpu} of {k} in CPU time, never by 1.5x everywhere"
                 if faster_g or faster_cpu else "does not hold: slower on every workload"])
    # 2. generalization: final test accuracy at equal gradient evaluations and CPU seconds
    parts, cpu_parts, better_g, better_cpu, worse, n_acc, big = [], [], 0, 0, 0, 0, True
    for name, n, a, w in pairs:
        if not w.higher_is_better:
            continue
        n_acc += 1
        d_g, d_c = difference(w, n, a, "acc"), difference(w, n, a, "acc_equal_cpu")
        better_g += _says(d_g) == "better"
        better_cpu += _says(d_c) == "better"
        worse += _says(d_g) == "worse" or _says(d_c) == "worse"
        big &= d_g is not None and d_g[0] >= 0.03
        parts.append(f"{name} {_diff_text(w, n, a, 'acc')}")
        cpu_parts.append(f"{name} {_diff_text(w, n, a, 'acc_equal_cpu')}")
    if n_acc:
        verdict = ("holds" if big else
                   f"does not hold: better beyond noise on {better_g} of {n_acc} workloads at "
                   f"equal gradient evaluations, {better_cpu} of {n_acc} at equal CPU time, "
                   f"worse beyond noise on {worse}")
        rows.append([CLAIMS[1], "test accuracy %, NeuroOptima default vs AdamW (difference ± 2 "
                     "std. errors), at equal gradient evaluations: " + "; ".join(parts)
                     + "; at equal CPU seconds: " + "; ".join(cpu_parts) + " (claim: +3)",
                     verdict])
    else:
        rows.append([CLAIMS[1], "no accuracy workload complete yet", "open"])
    # 3. loss variance over the last 10 % of steps
    parts, lower = [], 0
    for name, n, a, _ in pairs:
        nv, av = n["loss_var"][0], a["loss_var"][0]
        if nv is None or av is None:
            continue
        lower += nv < av
        parts.append(f"{name} {nv / av:.2f}")
    rows.append([CLAIMS[2], "training-loss variance over the last 10 % of steps, NeuroOptima "
                 "default / AdamW (equal gradient evaluations): " + "; ".join(parts),
                 "holds" if parts and lower == len(parts) else
                 (f"partly: lower on {lower} of {len(parts)} workloads" if lower
                  else "does not hold")])
    return rows


def status_line(result: dict) -> str:
    done = [name for name, *_ in _pairs(result)]
    total = list(result["workloads"])
    rows = sum(r["complete"] for wl in result["workloads"].values() for r in wl["rows"].values())
    planned = sum(len(wl["planned"]) for wl in result["workloads"].values())
    return (f"Warm-up + cosine protocol, equal gradient budgets. Measured on {len(done)} of "
            f"{len(total)} workloads ({', '.join(done) or 'none yet'}); {rows} of "
            f"{planned} (workload, candidate) rows complete, "
            f"{result['n_records']} runs recorded.")


# ------------------------------------------------------------------ comparisons

def best_neuro(wl: dict) -> str | None:
    """The NeuroOptima configuration with the best mean final validation metric on this
    workload (complete rows only): the one a user tuning on validation would keep."""
    w = wl["workload"]
    cands = [c for c, r in wl["rows"].items() if c in S.NEURO_CONFIGS and r["complete"]]
    if not cands:
        return None
    return max(cands, key=lambda c: statistics.fmean(S.score(w, r) for r in wl["rows"][c]["runs"]))


def comparisons(result: dict) -> list[dict]:
    """Per workload, the three questions: a one-gradient sharpness-aware form against the same
    optimizer without it, scheduled SAM against the same without, and NeuroOptima's best
    configuration against tuned AdamW; each where both rows are complete."""
    out = []
    for name, wl in result["workloads"].items():
        w, rows = wl["workload"], wl["rows"]
        asks = [("one gradient", a, b) for a, b in ONE_GRADIENT]
        asks += [("scheduled SAM", a, b) for a, b in SCHEDULED]
        best = best_neuro(wl)
        if best:
            asks.append(("best NeuroOptima vs AdamW", best, BASE))
        for question, a, b in asks:
            ra, rb = rows.get(a), rows.get(b)
            if not (ra and rb and ra["complete"] and rb["complete"]):
                continue
            g, c = difference(w, ra, rb, _final_key(w, "g")), \
                difference(w, ra, rb, _final_key(w, "cpu"))
            out.append(dict(workload=name, question=question, a=a, b=b, w=w,
                            grads=(ra["grad_evals_to_target"], rb["grad_evals_to_target"]),
                            cpu=(ra["cpu_s_to_target"], rb["cpu_s_to_target"]),
                            equal_g=g, equal_cpu=c, says_g=_says(g), says_cpu=_says(c)))
    return out


def _pm_diff(w: S.Workload, d: tuple[float, float] | None) -> str:
    if d is None:
        return "–"
    scale, fmt = (100, ".1f") if w.higher_is_better else (1, ".3f")
    return f"{scale * d[0]:+{fmt}} ± {scale * d[1]:{fmt}}"


def comparison_table(result: dict) -> str:
    body = []
    for c in comparisons(result):
        faster_g = c["grads"][0] < c["grads"][1]
        faster_c = c["cpu"][0] < c["cpu"][1]
        body.append([c["workload"], c["question"], f"{c['a']} vs {c['b']}",
                     f"{_fmt(c['grads'][0])} vs {_fmt(c['grads'][1])}"
                     + (" (faster)" if faster_g else ""),
                     f"{_fmt(c['cpu'][0])} vs {_fmt(c['cpu'][1])}"
                     + (" (faster)" if faster_c else ""),
                     f"{_pm_diff(c['w'], c['equal_g'])}: {c['says_g']}",
                     f"{_pm_diff(c['w'], c['equal_cpu'])}: {c['says_cpu']}"])
    if not body:
        return "No comparison has both rows complete yet."
    return _table(["workload", "question", "rows", "grad. evals to target (median)",
                   "CPU s to target (median)",
                   "test metric, equal grad. evals (difference ± 2 SE, accuracy points or "
                   "loss, positive = better)", "test metric, equal CPU s"], body)


def readme_answers(result: dict) -> list[str]:
    """The three questions in one row per workload (complete rows only), for the README:
    test metric differences at equal gradient evaluations, and the best configuration against
    tuned AdamW in time to target and test metric at equal compute."""
    asks = {("one gradient", "NeuroOptima momentum ascent"): 1,
            ("scheduled SAM", f"NeuroOptima SAM every {S.SAM_INTERVAL}th"): 2,
            ("scheduled SAM", "NeuroOptima late SAM"): 3}
    rows: dict[str, list[str]] = {}
    for c in comparisons(result):
        row = rows.setdefault(c["workload"], [c["workload"], "–", "–", "–", "–"])
        if c["question"] == "best NeuroOptima vs AdamW":
            g = "fewer" if c["grads"][0] < c["grads"][1] else "not fewer"
            row[4] = (f"{short(c['a'])}: {g} grad. evals to target ({_fmt(c['grads'][0])} vs "
                      f"{_fmt(c['grads'][1])}); test {_pm_diff(c['w'], c['equal_g'])} "
                      f"({c['says_g']}), at equal CPU s {_pm_diff(c['w'], c['equal_cpu'])} "
                      f"({c['says_cpu']})")
        elif (c["question"], c["a"]) in asks and c["b"] == NEURO:
            row[asks[(c["question"], c["a"])]] = f"{_pm_diff(c['w'], c['equal_g'])} ({c['says_g']})"
    if not rows:
        return []
    return ["The three questions per workload (test metric at equal gradient evaluations, "
            "difference ± 2 standard errors, positive = better; each against NeuroOptima "
            "without it, the last against tuned AdamW):", "",
            _table(["workload", "momentum ascent", f"SAM every {S.SAM_INTERVAL}th",
                    "late SAM", "best NeuroOptima vs AdamW"], list(rows.values()))]


def losses_plainly(result: dict) -> list[str]:
    """Where NeuroOptima's best configuration loses to tuned AdamW, one line each."""
    lines = []
    for c in comparisons(result):
        if c["question"] != "best NeuroOptima vs AdamW":
            continue
        lost = []
        if not c["grads"][0] < c["grads"][1]:
            lost.append("time to target in gradient evaluations")
        if not c["cpu"][0] < c["cpu"][1]:
            lost.append("time to target in CPU seconds")
        if c["says_g"] != "better":
            lost.append(f"test metric at equal gradient evaluations ({c['says_g']})")
        if c["says_cpu"] != "better":
            lost.append(f"test metric at equal CPU seconds ({c['says_cpu']})")
        if lost:
            lines.append(f"- {c['workload']}: {c['a']} does not beat tuned AdamW in "
                         + ", ".join(lost) + ".")
        else:
            lines.append(f"- {c['workload']}: {c['a']} beats tuned AdamW on all four readings.")
    return lines


# ------------------------------------------------------------------ profiles

def profile_times(result: dict, key: str = "cpu_s_to_target") -> dict[str, dict[str, float]]:
    """{workload: {candidate: time}} over complete rows of workloads with a target."""
    out = {}
    for name, wl in result["workloads"].items():
        if wl["target"] is None:
            continue
        out[name] = {c: r[key] for c, r in wl["rows"].items() if r["complete"]}
    return out


def performance_profile(times: dict[str, dict[str, float]], taus: list[float]
                        ) -> dict[str, list[float]]:
    cands = sorted({c for t in times.values() for c in t})
    profile = {}
    for c in cands:
        fractions = []
        for tau in taus:
            solved = 0
            for t in times.values():
                best = min(t.values())
                if c in t and math.isfinite(t[c]) and math.isfinite(best) and t[c] <= tau * best:
                    solved += 1
            fractions.append(solved / len(times) if times else 0.0)
        profile[c] = fractions
    return profile


# ------------------------------------------------------------------ markdown

def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _pm(ms, scale=100.0, digits=1) -> str:
    m, s = ms
    return "–" if m is None else f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def _spread(row, key) -> str:
    med = row[f"{key}_to_target"]
    sp = row[f"{key}_spread"]
    if med is None:
        return "–"
    s = _fmt(med, 3)
    return s + (f" ({_fmt(sp[0], 3)}–{_fmt(sp[1], 3)})" if sp else "")


def workload_line(w: S.Workload, sizes: dict | None) -> str:
    budget = f"{w.epochs} epoch(s) of gradient evaluations, batch {w.batch_size}"
    if sizes:
        budget += f", {sizes['budget']:,} gradient evaluations"
    noise = f", {int(100 * w.label_noise)} % of training labels flipped" if w.label_noise else ""
    aug = (f"; augmentation: random crops after padding {w.augment.get('pad', 0)} pixel(s)"
           + (", horizontal flips" if w.augment.get("flip") else "")) if w.augment else ""
    return (f"**{w.name}**: {w.about}. Sizes: {w.n_train or 'all'} training / {w.n_val} "
            f"validation / {w.n_test or 'all'} test examples{noise}{aug}; budget {budget}; "
            f"validation {w.metric} at {w.evals} evenly spaced points of the budget.")


def _describe(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) if settings else "the defaults"


def robust_lr(rows_by_workload: list[dict]) -> float | None:
    """The ladder LR that is never far from a workload's best: among the LRs every workload's
    search tried (selection seed, whole budget), the one whose worst rank over the workloads is
    best (then the best mean rank, then the smaller LR). A diverged run ranks last."""
    common = set.intersection(*(set(r["search_scores"]) for r in rows_by_workload))
    if not common:
        return None
    ranks: dict[float, list[int]] = {lr: [] for lr in common}
    for row in rows_by_workload:
        order = sorted(row["search_scores"], key=lambda x: -row["search_scores"][x])
        for lr in common:
            ranks[lr].append(order.index(lr) + 1)
    return min(common, key=lambda lr: (max(ranks[lr]), statistics.fmean(ranks[lr]), lr))


def one_gradient(name: str) -> bool:
    """Whether a configuration takes one gradient a step, so that ``step()`` without a
    closure runs it in any loop (scheduled exact SAM needs a closure on its SAM steps)."""
    return S.CANDIDATES[name].sam_every == 0


def recommended(result: dict) -> dict | None:
    """The NeuroOptima configuration for the defaults: fastest to target in gradient
    evaluations (geometric mean over the workloads) among those that take one gradient a step
    (the defaults must run in any loop) and have a complete row on every workload with a
    target, and its robust LR; also the fastest of all (``best_any``). None when no
    configuration is complete everywhere. (A "+ Lookahead" form that a workload does not run,
    Lookahead paying nothing there, is not a candidate.)"""
    times = profile_times(result, "grad_evals_to_target")
    names = [n for n in S.NEURO_CONFIGS if times and all(n in t for t in times.values())]
    usable = times if names else {}
    if not usable or not any(one_gradient(n) for n in names):
        return None
    score = {n: statistics.fmean(
        math.log(t[n] / min(t[m] for m in names)) if math.isfinite(t[n]) else 10.0
        for t in usable.values()) for n in names}
    best_any = min(names, key=lambda n: score[n])
    best = min((n for n in names if one_gradient(n)), key=lambda n: score[n])
    best_rows = [result["workloads"][w]["rows"][best] for w in usable]
    defaults = S.constructor_defaults()
    settings = {**{k: v for k, v in defaults.items() if k != "lr"}, **S.NEURO_CONFIGS[best]}
    lr = robust_lr(best_rows)
    agrees = (len(usable) == len(result["workloads"]) and lr is not None
              and all(defaults.get(k) == v for k, v in settings.items())
              and S.ladder_index(defaults["lr"]) == S.ladder_index(lr))
    return dict(names=names, times=usable, best=best, best_any=best_any, score=score,
                settings=settings, lr=lr, tuned_lrs=[r["lr"] for r in best_rows],
                defaults=defaults, defaults_agree=agrees)


def recommendation(result: dict) -> list[str]:
    """``recommended`` in words and a table, and whether the constructor defaults are it."""
    rec = recommended(result)
    if rec is None:
        return ["Recommended defaults: not enough complete NeuroOptima rows yet (needs a "
                f"configuration among {', '.join(S.NEURO_CONFIGS)} complete on every workload "
                "with a target)."]
    names = rec["names"]
    body = []
    for w, t in rec["times"].items():
        rows = result["workloads"][w]["rows"]
        body.append([w] + [f"{_fmt(t[n])} (lr {rows[n]['lr']:g})" for n in names])
    tuned = ", ".join(f"{x:g}" for x in rec["tuned_lrs"])
    lines = ["Median gradient evaluations to target (lower is better) of the NeuroOptima "
             "configurations, and the LR each chose:", "", _table(["workload", *names], body),
             ""]
    if rec["best_any"] != rec["best"]:
        lines += [f"Fastest to target of all (geometric mean over {len(rec['times'])} "
                  f"workload(s)): **{rec['best_any']}**; it takes a second gradient on some "
                  "steps, so `step()` needs a closure there and it cannot be the default of an "
                  "optimizer that must run in any loop.", ""]
    lines += [f"Fastest to target in gradient evaluations among the configurations that take "
              f"one gradient a step (geometric mean over {len(rec['times'])} workload(s)): "
              f"**{rec['best']}** ({_describe(rec['settings'])}). Its tuned LR per workload: "
              f"{tuned}; the LR never far from each workload's best (best worst rank over the "
              f"LRs every workload tried): **{_fmt(rec['lr'])}**."]
    defaults = _describe(rec["defaults"])
    if rec["defaults_agree"]:
        verdict = (f"The constructor defaults ({defaults}) are this recommendation (lr: a "
                   f"round value nearest that ladder point).")
    else:
        total = len(result["workloads"])
        covered = len(rec["times"])
        verdict = (f"The constructor defaults ({defaults}) are not this recommendation"
                   + (f" (which covers {covered} of {total} workloads)" if covered < total
                      else "") + ".")
    return lines + ["", verdict]


# ------------------------------------------------------------------ charts

SHORT = {"NeuroOptima": "N", "momentum ascent": "MA", "Lookahead": "LA",
         f"SAM every {S.SAM_INTERVAL}th": f"SAM/{S.SAM_INTERVAL}", "SGD Nesterov": "SGD-N"}


def short(name: str) -> str:
    for long, abbrev in SHORT.items():
        name = name.replace(long, abbrev)
    return name


def _bar_chart(title: str, axis: str, labels: list[str], values: list[float],
               min_pad: float = 0.0) -> list[str]:
    lo = min(values)
    hi = max(values)
    # min_pad keeps differences within the seed noise from filling the whole axis.
    pad = max((hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0, min_pad)
    lo = max(0.0, lo - pad) if lo >= 0 else lo - pad
    return ["```mermaid", "xychart-beta", f'    title "{title}"',
            "    x-axis [" + ", ".join(f'"{short(c)}"' for c in labels) + "]",
            f'    y-axis "{axis}" {lo:.3g} --> {hi + pad:.3g}',
            "    bar [" + ", ".join(f"{v:.4g}" for v in values) + "]", "```"]


def mermaid_charts(wl: dict, name: str) -> list[str]:
    """The announcement's three comparisons for one workload, drawn as it drew them: epochs to
    target, final test accuracy (or loss) and loss variance per optimizer (complete rows)."""
    w = wl["workload"]
    rows = {c: r for c, r in wl["rows"].items() if r["complete"]}
    if not rows or wl["target"] is None:
        return []
    out = []
    reached = {c: r["epochs_to_target"] for c, r in rows.items()
               if r["epochs_to_target"] is not None and math.isfinite(r["epochs_to_target"])}
    never = [short(c) for c in rows if c not in reached]
    if reached:
        out += _bar_chart(f"{name}: epochs to target, median of {wl['seeds']} seeds"
                          + (f" (never: {', '.join(never)})" if never else ""),
                          "epochs", list(reached), list(reached.values()))
    key = "acc" if w.higher_is_better else "loss"
    final = {c: r[key][0] * (100 if w.higher_is_better else 1) for c, r in rows.items()
             if r[key][0] is not None}
    if final:
        out += _bar_chart(f"{name}: final test {'accuracy %' if w.higher_is_better else 'loss'}"
                          f", equal gradient evaluations", "test " + key, list(final),
                          list(final.values()), 2.0 if w.higher_is_better else 0.05)
    # Ascent candidates' training loss is taken at the ascent point: not comparable here.
    var = {c: r["loss_var"][0] for c, r in rows.items() if r["loss_var"][0] is not None
           and not S.CANDIDATES[c].moves_weights}
    if var:
        out += _bar_chart(f"{name}: training-loss variance, last 10 % of steps (one-gradient "
                          "ascent rows left out)",
                          "variance", list(var), list(var.values()))
    return out


GENERALIZATION_BOUND = "fashion-2k"


def readme_charts(result: dict) -> list[str]:
    """The three charts, with a line naming their workload: the generalization-bound workload,
    else (until it has a target) the first workload with one."""
    names = [GENERALIZATION_BOUND] + list(result["workloads"])
    for name in names:
        wl = result["workloads"].get(name)
        if wl and wl["target"] is not None:
            wl["seeds"] = result["seeds"]
            charts = mermaid_charts(wl, name)
            if not charts:
                return []
            which = ("the generalization-bound workload" if name == GENERALIZATION_BOUND
                     else f"{name} (the generalization-bound workload has no target yet)")
            return [f"The announcement's three comparisons, drawn as it drew them, on {which}; "
                    "every workload, with error bars: REPORT.md.", ""] + charts
    return []


def markdown(result: dict) -> str:
    out = ["### Time to target (the suite)", "",
           "Made by `python benchmarks/suite.py` (resumable; see `benchmarks/README.md`), one "
           "thread per run, CPU seconds of training (`time.process_time`). Protocol: every run "
           f"a linear warm-up over {100 * S.WARMUP_FRACTION:.0f} % of its steps, then cosine "
           "decay to 0; every candidate on a workload the same budget of gradient evaluations "
           "(a candidate that takes a second gradient on some steps gets fewer steps, its own "
           "schedule over them). LR on a half-decade ladder, starting from three points around "
           "each candidate's usual value and widened past the best edge until interior (at most "
           f"{S.MAX_LR_TRIALS} LRs, selection seed {S.SELECTION_SEED}, whole budget, final "
           "validation metric); candidates with a rho then search "
           f"{list(S.RHO_LADDER)} the same way at that LR (at most {S.MAX_RHO_TRIALS}); then "
           f"{result['seeds']} seeds (0–{result['seeds'] - 1}) at the chosen setting. Target: "
           "the validation metric tuned AdamW reaches at 85 % of its budget (median over its "
           "seeds). Times to target: median over seeds (a seed that never reaches counts as "
           "infinite), with the range over the seeds that reach; epochs are gradient "
           "evaluations over steps per epoch. *Equal grad. evals*: the final test metric (every "
           "run spends the same budget). *Equal CPU s*: the test metric at tuned AdamW's median "
           "CPU seconds of training (between the run's test points; its final metric if it "
           "finished sooner). Loss variance: variance of the per-step training loss over the "
           "last 10 % of steps, mean over seeds (for MSAM and momentum ascent the loss at the "
           "ascent point, where their gradient is taken, so their variance is not comparable "
           "with the others'). Error bars: ± one standard deviation over "
           "seeds; differences ± two standard errors.", "", status_line(result), ""]
    out += ["#### Verdict on the three announced claims", "",
            _table(["claim", "measured", "verdict"], verdict_rows(result)), "",
            "Each claim compares NeuroOptima with its constructor defaults (LR tuned) against "
            "tuned AdamW (the announcement said Adam; AdamW is Adam with decoupled decay, and "
            "is the stronger baseline).", ""]
    out += ["#### The three questions, per workload", "",
            "Does a one-gradient sharpness-aware form (MSAM, NeuroOptima's momentum ascent) beat "
            "the same optimizer without it at equal gradient evaluations? Does scheduled SAM "
            "(every k-th step, late phase; SAM(AdamW) on every step)? Does NeuroOptima's best "
            "configuration (per workload, by mean final validation metric) beat tuned AdamW in "
            "time to target and in final test metric at equal compute?", "",
            comparison_table(result), ""]
    lost = losses_plainly(result)
    if lost:
        out += ["Where NeuroOptima's best configuration loses to tuned AdamW:", ""] + lost + [""]
    for name, wl in result["workloads"].items():
        w = wl["workload"]
        rows = wl["rows"]
        any_run = next((r["runs"][0] for r in rows.values() if r["runs"]), None)
        sizes = dict(budget=any_run["budget"]) if any_run else None
        out += [f"#### {name}", "", workload_line(w, sizes), ""]
        if wl["target"] is None:
            out += ["Target: not set yet (tuned AdamW's seeds not complete).", ""]
        else:
            shown = (f"≥ {100 * wl['target']:.1f} %" if w.higher_is_better
                     else f"≤ {wl['target']:.3f}")
            out += [f"Target: validation {w.metric} {shown}; equal CPU time: "
                    f"{_fmt(wl['ref_cpu'])} s of training (tuned AdamW's median).", ""]
            base = rows.get(BASE)
            if base and base["gap"][0] is not None and w.higher_is_better:
                out += [f"Tuned AdamW: training accuracy {_pm(base['train_acc'])} %, test "
                        f"accuracy {_pm(base['acc'])} %, gap {_pm(base['gap'])} points.", ""]
        if not rows:
            out += ["No records yet.", ""]
            continue
        metric_head = "test acc. %" if w.higher_is_better else "test loss"
        body = []
        for c, r in rows.items():
            lr = f"{r['lr']:g}" + (" **(edge)**" if r["lr_edge"] else "")
            rho = "" if r["rho"] is None else f"{r['rho']:g}" + (" **(edge)**" if r["rho_edge"]
                                                                else "")
            if w.higher_is_better:
                m, mc = _pm(r["acc"]), _pm(r["acc_equal_cpu"])
            else:
                m, mc = _pm(r["loss"], 1, 3), _pm(r["loss_equal_cpu"], 1, 3)
            if r["equal_cpu_missing"]:
                mc += f" ({r['equal_cpu_missing']} seed(s) without a test point by then)"
            tried = ", ".join(f"{x:g}" for x in r["lr_tried"])
            if r["rho_tried"]:
                tried += "; rho " + ", ".join(f"{x:g}" for x in r["rho_tried"])
            body.append([c, lr, rho, tried, f"{len(r['runs'])}/{result['seeds']}",
                         f"{r['reached']}/{len(r['runs'])}" if r["runs"] else "–",
                         _spread(r, "epochs"), _spread(r, "grad_evals"), _spread(r, "cpu_s"),
                         m, mc, _pm(r["train_acc"]) if w.higher_is_better else "–",
                         _pm(r["gap"]) if w.higher_is_better else "–",
                         _fmt(r["loss_var"][0]) if r["loss_var"][0] is not None else "–"])
        out += [_table(["candidate", "LR", "rho", "tried", "seeds", "reached",
                        "epochs to target", "grad. evals to target", "CPU s to target",
                        f"{metric_head} (equal grad. evals)", f"{metric_head} (equal CPU s)",
                        "train acc. %", "gap, points", "loss variance"], body), ""]
        if wl["not_run"]:
            out += [f"Not run here: {', '.join(wl['not_run'])} ({S.LOOKAHEAD} does not end "
                    f"above {S.DEFAULT} on validation, so Lookahead is no contender on this "
                    "workload).", ""]
        edges = [c for c, r in rows.items() if r["lr_edge"] or r["rho_edge"]]
        if edges:
            out += [f"LR or rho at the edge of its searched range (search still widening or "
                    f"capped): {', '.join(edges)}.", ""]
        wl["seeds"] = result["seeds"]
        out += mermaid_charts(wl, name)
        out += ["", f"![{name}: the three comparisons with error bars](suite_{name}.png)", ""]
    times = profile_times(result)
    if times:
        out += ["#### Performance profiles", "",
                "Fraction of workloads (with a target) a candidate solves within tau times the "
                "best candidate's median CPU seconds to target (complete rows only); "
                "plot: `suite_profiles.png`.", "", "![performance profiles](suite_profiles.png)",
                ""]
        taus = [1, 1.5, 2, 4]
        prof = performance_profile(times, taus)
        out += [_table(["candidate"] + [f"tau = {t:g}" for t in taus],
                       [[c] + [f"{v:.2f}" for v in vals] for c, vals in prof.items()]), ""]
    out += ["#### Recommended NeuroOptima settings", ""] + recommendation(result) + [""]
    return "\n".join(out)


# ------------------------------------------------------------------ plots

def plots(result: dict, out_dir: Path) -> list[Path]:
    """Per workload the three comparisons with error bars (epochs to target per seed, final
    test metric at equal gradient evaluations and equal CPU s, loss variance), and the
    performance profiles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, wl in result["workloads"].items():
        rows = {c: r for c, r in wl["rows"].items() if r["runs"]}
        w = wl["workload"]
        if not rows:
            continue
        labels = list(rows)
        xs = range(len(labels))
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
        for i, c in enumerate(labels):
            per_seed = rows[c]["epochs_per_seed"]
            hit = [v for v in per_seed if math.isfinite(v)]
            ax1.plot([i] * len(hit), hit, "o", alpha=0.6, color="C0")
            if rows[c]["epochs_to_target"] is not None and \
                    math.isfinite(rows[c]["epochs_to_target"]):
                ax1.plot([i - 0.3, i + 0.3], [rows[c]["epochs_to_target"]] * 2, "k-")
            misses = len(per_seed) - len(hit)
            if misses:
                ax1.annotate(f"{misses} never", (i, 0), fontsize=6, rotation=90)
        ax1.set_ylabel("epochs to target (dots: seeds, bar: median)")
        key = "acc" if w.higher_is_better else "loss"
        scale = 100 if w.higher_is_better else 1
        for shift, k, label in ((-0.2, key, "equal grad. evals"),
                                (0.2, f"{key}_equal_cpu", "equal CPU s")):
            ms = [rows[c][k] for c in labels]
            ax2.bar([x + shift for x in xs], [scale * (m or 0) for m, _ in ms], 0.4,
                    yerr=[scale * (s or 0) for _, s in ms], label=label, capsize=2)
        vals = [scale * rows[c][key][0] for c in labels if rows[c][key][0] is not None]
        if vals:
            ax2.set_ylim(min(vals) - (2 if w.higher_is_better else 0.05), None)
        ax2.set_ylabel(f"final test {'accuracy %' if w.higher_is_better else 'loss'}")
        ax2.legend(fontsize=7)
        lv = [rows[c]["loss_var"] for c in labels]
        ax3.bar(list(xs), [m or 0 for m, _ in lv], 0.6, yerr=[s or 0 for _, s in lv],
                capsize=2)
        ax3.set_ylabel("training-loss variance, last 10 % of steps")
        for ax in (ax1, ax2, ax3):
            ax.set_xticks(list(xs), [short(c) for c in labels], rotation=60, ha="right",
                          fontsize=7)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{name}: mean ± std over seeds (warm-up + cosine, equal gradient "
                     f"budget)")
        fig.tight_layout()
        path = out_dir / f"suite_{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    times = profile_times(result)
    if times:
        taus = [1 + 0.05 * i for i in range(0, 181)]
        prof = performance_profile(times, taus)
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for c, vals in prof.items():
            ax.step(taus, vals, where="post", label=c,
                    ls="-" if c.startswith("NeuroOptima") else "--")
        ax.set_xscale("log")
        ax.set_xlabel("tau (x best median CPU seconds to target)")
        ax.set_ylabel("fraction of workloads solved")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / "suite_profiles.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
