"""Everything the report says about the time-to-target suite, computed from its records.

Nothing here is stored: targets, chosen settings, times to target, verdicts and profiles are all
derived from the run records that ``suite.py`` writes, so adding records (a later sitting)
changes the report and nothing else.

Definitions (AlgoPerf-style):

* Target of a workload: the validation metric a tuned AdamW reaches at 85 % of its step budget
  (median over its evaluation seeds of the evaluation nearest that point), accuracy rounded
  down to 0.1 point, loss rounded up to 0.005. A run reaches it at its first evaluation at or
  beyond it; steps, gradient evaluations, epochs and CPU seconds of training are read there.
* Time to target of a row (workload, candidate): the median over its seeds, a seed that never
  reaches counted as infinitely slow (so the median is infinite when half or more never reach).
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
        goal = TARGET_FRACTION * rec["budget_steps"]
        points = [p for p in rec["curve"] if p[2] is not None]
        if not points:
            continue
        values.append(min(points, key=lambda p: abs(p[0] - goal))[2])
    if not values:
        return None
    m = statistics.median(values)
    return math.floor(m * 1000) / 1000 if w.higher_is_better else math.ceil(m * 200) / 200


def reach(w: S.Workload, rec: dict, target: float) -> dict | None:
    for step, cpu, value in rec["curve"]:
        if value is None:
            return None
        if (value >= target) if w.higher_is_better else (value <= target):
            return dict(steps=step, grad_evals=step * rec["grad_evals_per_step"], cpu_s=cpu,
                        epochs=step / rec["steps_per_epoch"])
    return None


def _median_inf(values: list[float]) -> float:
    return statistics.median(sorted(values)) if values else math.inf


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


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
            if not recs:
                continue
            search = [r for r in recs if r["phase"] == "search"]
            lr_runs = {r["lr"]: r for r in search
                       if r["rho"] in (None, S.RHO_START) or not cand.tune_rho}
            if not lr_runs:
                continue
            lr, edge = S.choose_lr(w, lr_runs)
            ladder_end = lr in (S.LADDER[0], S.LADDER[-1])
            rho = None
            rho_runs = {r["rho"]: r for r in search if cand.tune_rho and r["lr"] == lr}
            if cand.tune_rho and len(rho_runs) == len(S.RHO_GRID):
                rho = max(S.RHO_GRID, key=lambda x: S.score(w, rho_runs[x]))
            elif cand.tune_rho:
                rho = S.RHO_START
            runs = sorted((r for r in recs if r["phase"] == "seed" and r["lr"] == lr
                           and (not cand.tune_rho or r["rho"] == rho)), key=lambda r: r["seed"])
            rows[cname] = dict(candidate=cname, sam=cand.sam, lr=lr, rho=rho,
                               lr_tried=sorted(lr_runs), lr_edge=edge or ladder_end,
                               search_scores={lr_: S.score(w, r) for lr_, r in lr_runs.items()},
                               rho_scores={x: S.score(w, r) for x, r in rho_runs.items()},
                               runs=runs, complete=len(runs) >= seeds)
        target = target_of(w, rows.get(BASE, {}).get("runs", []) if
                           rows.get(BASE, {}).get("complete") else [])
        for row in rows.values():
            _measure(w, row, target)
        out[wname] = dict(workload=w, target=target, rows=rows)
    return dict(workloads=out, seeds=seeds, n_records=len(records))


def _measure(w: S.Workload, row: dict, target: float | None) -> None:
    runs = row["runs"]
    hits = [reach(w, r, target) if target is not None else None for r in runs]
    row["reached"] = sum(h is not None for h in hits)
    for key in ("steps", "grad_evals", "cpu_s", "epochs"):
        vals = [h[key] if h else math.inf for h in hits]
        row[f"{key}_to_target"] = _median_inf(vals) if runs and target is not None else None
        finite = [v for v in vals if math.isfinite(v)]
        row[f"{key}_spread"] = (min(finite), max(finite)) if finite else None
    final = [r["test_final"] for r in runs if r["test_final"]]
    equal_g = [(r["test_half"] if row["sam"] else r["test_final"]) for r in runs]
    equal_g = [e for e in equal_g if e]
    row["acc"] = _mean_std([e["acc"] for e in final])
    row["loss"] = _mean_std([e["loss"] for e in final])
    row["acc_equal_g"] = _mean_std([e["acc"] for e in equal_g])
    row["loss_equal_g"] = _mean_std([e["loss"] for e in equal_g])
    row["loss_var"] = _mean_std([r["train_loss_tail_var"] for r in runs])
    row["diverged"] = sum(r["diverged"] for r in runs)
    row["cpu_s_run"] = _mean_std([r["cpu_s"] for r in runs])


# ------------------------------------------------------------------ verdicts

def _pairs(result: dict) -> list[tuple[str, dict, dict, S.Workload]]:
    """(workload, NeuroOptima default row, AdamW row) where both are complete."""
    out = []
    for name, wl in result["workloads"].items():
        n, a = wl["rows"].get(NEURO), wl["rows"].get(BASE)
        if n and a and n["complete"] and a["complete"] and wl["target"] is not None:
            out.append((name, n, a, wl["workload"]))
    return out


def verdict_rows(result: dict) -> list[list[str]]:
    pairs = _pairs(result)
    if not pairs:
        return [[c, "not measured yet (no workload has complete AdamW and NeuroOptima default "
                 "rows)", "open"] for c in CLAIMS]
    rows = []
    # 1. speed: epochs to target, NeuroOptima default / AdamW
    ratios, parts = [], []
    for name, n, a, _ in pairs:
        ne, ae = n["epochs_to_target"], a["epochs_to_target"]
        ratio = ne / ae if math.isfinite(ae) and ae > 0 else math.nan
        ratios.append(ratio)
        parts.append(f"{name} {_fmt(ne, 2)} vs {_fmt(ae, 2)}")
    holds = all(r <= 20 / 30 for r in ratios)
    faster = sum(r < 1 for r in ratios)
    rows.append([CLAIMS[0], "median epochs to target, NeuroOptima default vs AdamW: "
                 + "; ".join(parts) + " (claim: ratio 0.67)",
                 "holds" if holds else (f"partly: faster on {faster} of {len(ratios)} workloads,"
                                        " not by 1.5x" if faster else "does not hold")])
    # 2. generalization: test accuracy at equal epochs, accuracy workloads
    parts, deltas, significant = [], [], 0
    for name, n, a, w in pairs:
        if not w.higher_is_better:
            continue
        (nm, ns), (am, as_) = n["acc"], a["acc"]
        d = nm - am
        band = 2 * math.sqrt(ns ** 2 / len(n["runs"]) + as_ ** 2 / len(a["runs"]))
        deltas.append(d)
        significant += d > band
        parts.append(f"{name} {100 * nm:.1f} vs {100 * am:.1f} ({100 * d:+.1f} ± {100 * band:.1f})")
    if deltas:
        verdict = ("holds" if all(d >= 0.03 for d in deltas) else
                   f"partly: better beyond noise on {significant} of {len(deltas)} workloads, "
                   "by less than 3 points" if significant else "does not hold")
        rows.append([CLAIMS[1], "test accuracy % at equal epochs, NeuroOptima default vs AdamW "
                     "(difference ± 2 std. errors): " + "; ".join(parts) + " (claim: +3)",
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
                 "default / AdamW: " + "; ".join(parts),
                 "holds" if parts and lower == len(parts) else
                 (f"partly: lower on {lower} of {len(parts)} workloads" if lower
                  else "does not hold")])
    return rows


def status_line(result: dict) -> str:
    done = [name for name, *_ in _pairs(result)]
    total = list(result["workloads"])
    rows = sum(r["complete"] for wl in result["workloads"].values() for r in wl["rows"].values())
    return (f"Measured on {len(done)} of {len(total)} workloads "
            f"({', '.join(done) or 'none yet'}); {rows} of {len(total) * len(S.CANDIDATES)} "
            f"(workload, candidate) rows complete, {result['n_records']} runs recorded.")


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
    budget = f"{w.epochs} epoch(s), batch {w.batch_size}"
    if sizes:
        budget += f", {sizes['steps']} steps"
    noise = f", {int(100 * w.label_noise)} % of training labels flipped" if w.label_noise else ""
    return (f"**{w.name}**: {w.about}. Sizes: {w.n_train or 'all'} training / {w.n_val} "
            f"validation / {w.n_test or 'all'} test examples{noise}; budget {budget}; "
            f"validation {w.metric} every 1/{w.evals_per_epoch} epoch.")


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


def recommended(result: dict) -> dict | None:
    """The NeuroOptima configuration fastest to target in gradient evaluations (geometric mean
    over the workloads where every configuration has a complete row) and its robust LR; None
    without such a workload."""
    names = list(S.NEURO_CONFIGS)
    times = profile_times(result, "grad_evals_to_target")
    usable = {w: t for w, t in times.items() if all(n in t for n in names)}
    if not usable:
        return None
    score = {n: statistics.fmean(
        math.log(t[n] / min(t[m] for m in names)) if math.isfinite(t[n]) else 10.0
        for t in usable.values()) for n in names}
    best = min(names, key=lambda n: score[n])
    best_rows = [result["workloads"][w]["rows"][best] for w in usable]
    defaults = S.constructor_defaults()
    settings = {**{k: v for k, v in defaults.items() if k != "lr"}, **S.NEURO_CONFIGS[best]}
    lr = robust_lr(best_rows)
    agrees = (len(usable) == len(result["workloads"]) and lr is not None
              and all(defaults[k] == v for k, v in settings.items())
              and S.ladder_index(defaults["lr"]) == S.ladder_index(lr))
    return dict(names=names, times=usable, best=best, settings=settings, lr=lr,
                tuned_lrs=[r["lr"] for r in best_rows], defaults=defaults,
                defaults_agree=agrees)


def recommendation(result: dict) -> list[str]:
    """``recommended`` in words and a table, and whether the constructor defaults are it."""
    rec = recommended(result)
    if rec is None:
        return ["Recommended defaults: not enough complete NeuroOptima rows yet (needs "
                f"{', '.join(S.NEURO_CONFIGS)} on at least one workload)."]
    names = rec["names"]
    body = []
    for w, t in rec["times"].items():
        rows = result["workloads"][w]["rows"]
        body.append([w] + [f"{_fmt(t[n])} (lr {rows[n]['lr']:g})" for n in names])
    tuned = ", ".join(f"{x:g}" for x in rec["tuned_lrs"])
    lines = ["Median gradient evaluations to target (lower is better) of the NeuroOptima "
             "configurations, and the LR each chose:", "", _table(["workload", *names], body),
             "", f"Fastest to target in gradient evaluations (geometric mean over "
             f"{len(rec['times'])} workload(s)): **{rec['best']}** "
             f"({_describe(rec['settings'])}). Its tuned LR per workload: {tuned}; the LR "
             f"never far from each workload's best (best worst rank over the LRs every "
             f"workload tried): **{_fmt(rec['lr'])}**."]
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


def markdown(result: dict) -> str:
    out = ["### Time to target (the suite)", "",
           "Made by `python benchmarks/suite.py` (resumable; see `benchmarks/README.md`), one "
           "thread per run, CPU seconds of training (`time.process_time`). Protocol: LR on a "
           "half-decade ladder, starting from three points around each candidate's usual value "
           f"and widened past the best edge until interior (at most {S.MAX_LR_TRIALS} LRs, "
           f"selection seed {S.SELECTION_SEED}, whole budget, final validation metric); "
           f"SAM(AdamW) also tries rho in {list(S.RHO_GRID)} at that LR; then "
           f"{result['seeds']} seeds (0–{result['seeds'] - 1}) at the chosen setting. Constant "
           "LR. Target: the validation metric tuned AdamW reaches at 85 % of its budget (median "
           "over its seeds). Times to target: median over seeds (a seed that never reaches "
           "counts as infinite), with the range over the seeds that reach. *Equal grad. evals*: "
           "SAM rows (2 per step) read at half their steps. Loss variance: variance of the "
           "per-step training loss over the last 10 % of steps, mean over seeds.", "",
           status_line(result), ""]
    out += ["#### Verdict on the three announced claims", "",
            _table(["claim", "measured", "verdict"], verdict_rows(result)), "",
            "Each claim compares NeuroOptima with its constructor defaults (LR tuned) against "
            "tuned AdamW (the announcement said Adam; AdamW is Adam with decoupled decay, and "
            "is the stronger baseline).", ""]
    for name, wl in result["workloads"].items():
        w = wl["workload"]
        rows = wl["rows"]
        sizes = None
        any_run = next((r["runs"][0] for r in rows.values() if r["runs"]), None)
        if any_run:
            sizes = dict(steps=any_run["budget_steps"])
        out += [f"#### {name}", "", workload_line(w, sizes), ""]
        if wl["target"] is None:
            out += ["Target: not set yet (tuned AdamW's seeds not complete).", ""]
        else:
            shown = (f"≥ {100 * wl['target']:.1f} %" if w.higher_is_better
                     else f"≤ {wl['target']:.3f}")
            out += [f"Target: validation {w.metric} {shown}.", ""]
        if not rows:
            out += ["No records yet.", ""]
            continue
        metric_head = "test acc. %" if w.higher_is_better else "test loss"
        body = []
        for c, r in rows.items():
            lr = f"{r['lr']:g}" + (" **(edge)**" if r["lr_edge"] else "")
            rho = "" if r["rho"] is None else f"{r['rho']:g}"
            if w.higher_is_better:
                m, mg = _pm(r["acc"]), _pm(r["acc_equal_g"])
            else:
                m, mg = _pm(r["loss"], 1, 3), _pm(r["loss_equal_g"], 1, 3)
            status = f"{len(r['runs'])}/{result['seeds']}"
            body.append([c, lr, rho, ", ".join(f"{x:g}" for x in r["lr_tried"]), status,
                         f"{r['reached']}/{len(r['runs'])}" if r["runs"] else "–",
                         _spread(r, "epochs"), _spread(r, "steps"), _spread(r, "grad_evals"),
                         _spread(r, "cpu_s"), m, mg,
                         _fmt(r["loss_var"][0]) if r["loss_var"][0] is not None else "–"])
        out += [_table(["candidate", "LR", "rho", "LRs tried", "seeds", "reached",
                        "epochs to target", "steps to target", "grad. evals to target",
                        "CPU s to target", f"{metric_head} (equal epochs)",
                        f"{metric_head} (equal grad. evals)", "loss variance"], body), ""]
        if not w.higher_is_better:
            out += ["Next-character test accuracy %, equal epochs: " + "; ".join(
                f"{c} {_pm(r['acc'])}" for c, r in rows.items() if r["runs"]) + ".", ""]
        edges = [c for c, r in rows.items() if r["lr_edge"]]
        if edges:
            out += [f"LR at the edge of its searched range (search still widening or capped): "
                    f"{', '.join(edges)}.", ""]
        out += [f"![time to target, {name}](suite_{name}.png)", ""]
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, wl in result["workloads"].items():
        rows, w, target = wl["rows"], wl["workload"], wl["target"]
        if not any(r["runs"] for r in rows.values()):
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for c, r in rows.items():
            if not r["runs"]:
                continue
            n = min(len(run["curve"]) for run in r["runs"])
            xs = [r["runs"][0]["curve"][i][0] * r["runs"][0]["grad_evals_per_step"]
                  for i in range(n)]
            ys = [statistics.median(run["curve"][i][2] if run["curve"][i][2] is not None
                                    else math.nan for run in r["runs"]) for i in range(n)]
            if w.higher_is_better:
                ys = [100 * y for y in ys]
            ax1.plot(xs, ys, "-" if c.startswith("NeuroOptima") else "--", label=c)
        if target is not None:
            ax1.axhline(100 * target if w.higher_is_better else target, color="k", lw=0.8,
                        ls=":", label="target")
        ax1.set_xlabel("gradient evaluations")
        ax1.set_ylabel(f"validation {w.metric}" + (" (%)" if w.higher_is_better else ""))
        if w.higher_is_better and target is not None:
            ax1.set_ylim(100 * target - 10, None)
        ax1.set_title(f"{name}: median over seeds")
        ax1.legend(fontsize=6)
        ax1.grid(alpha=0.3)
        labels = list(rows)
        top = 0.0
        for i, c in enumerate(labels):
            r = rows[c]
            if target is None:
                continue
            ts = [reach(w, run, target) for run in r["runs"]]
            vals = [t["cpu_s"] for t in ts if t]
            top = max([top] + vals)
            ax2.plot([i] * len(vals), vals, "o", alpha=0.7)
        for i, c in enumerate(labels):
            r = rows[c]
            if target is None:
                continue
            misses = sum(reach(w, run, target) is None for run in r["runs"])
            if misses:
                ax2.plot([i], [top * 1.05 if top else 1], "rx")
                ax2.annotate(f"{misses} never", (i, top * 1.05 if top else 1), fontsize=6)
        ax2.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax2.set_ylabel("CPU seconds to target (per seed)")
        ax2.set_title("time to target (x: seeds that never reach)")
        ax2.grid(alpha=0.3)
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
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / "suite_profiles.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
