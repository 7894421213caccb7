"""REPORT.md's section on the time-to-target suite (``markdown``), from the analysis of its
records (``suite_analysis``), the answers (``suite_verdicts``) and the charts
(``suite_charts``).
"""

from __future__ import annotations

from suite_analysis import BASE
from suite_candidates import LOOKAHEAD, PLAIN, WARMUP_FRACTION
from suite_charts import mermaid_charts
from suite_protocol import MAX_LR_TRIALS, MAX_RHO_TRIALS, RHO_LADDER, SELECTION_SEED
from suite_verdicts import (_fmt, _table, comparison_table, losses_plainly, performance_profile,
                            profile_times, recommendation, status_line, verdict_rows)
from suite_workloads import Workload


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


def workload_line(w: Workload, sizes: dict | None) -> str:
    budget = f"{w.epochs} epoch(s) of gradient evaluations, batch {w.batch_size}"
    if sizes:
        budget += f", {sizes['budget']:,} gradient evaluations"
    noise = f", {int(100 * w.label_noise)} % of training labels flipped" if w.label_noise else ""
    aug = (f"; augmentation: random crops after padding {w.augment.get('pad', 0)} pixel(s)"
           + (", horizontal flips" if w.augment.get("flip") else "")) if w.augment else ""
    return (f"**{w.name}**: {w.about}. Sizes: {w.n_train or 'all'} training / {w.n_val} "
            f"validation / {w.n_test or 'all'} test examples{noise}{aug}; budget {budget}; "
            f"validation {w.metric} at {w.evals} evenly spaced points of the budget.")


def markdown(result: dict) -> str:
    out = ["### Time to target (the suite)", "",
           "Made by `python benchmarks/suite.py` (resumable; see `benchmarks/README.md`), one "
           "thread per run, CPU seconds of training (`time.process_time`). Protocol: every run "
           f"a linear warm-up over {100 * WARMUP_FRACTION:.0f} % of its steps, then cosine "
           "decay to 0; every candidate on a workload the same budget of gradient evaluations "
           "(a candidate that takes a second gradient on some steps gets fewer steps, its own "
           "schedule over them). LR on a half-decade ladder, starting from three points around "
           "each candidate's usual value and widened past the best edge until interior (at most "
           f"{MAX_LR_TRIALS} LRs, selection seed {SELECTION_SEED}, whole budget, final "
           "validation metric); candidates with a rho then search "
           f"{list(RHO_LADDER)} the same way at that LR (at most {MAX_RHO_TRIALS}); then "
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
            out += [f"Not run here: {', '.join(wl['not_run'])} ({LOOKAHEAD} does not end "
                    f"above {PLAIN} on validation, so Lookahead is no contender on this "
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
