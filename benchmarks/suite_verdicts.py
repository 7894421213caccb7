"""The answers the suite's analysis (``suite_analysis.analyse``) gives: the verdict on the three
announced claims, the three questions per workload, performance profiles and the recommended
NeuroOptima settings, as table rows and text for REPORT.md and the README block; with the small
formatting helpers they and the report share.
"""

from __future__ import annotations

import math
import statistics

from suite_analysis import BASE, _final_key, _says, difference
from suite_candidates import (CANDIDATES, LOOKAHEAD, NEURO_CONFIGS, PLAIN, SAM_INTERVAL,
                              constructor_defaults)
from suite_protocol import RHO_LADDER, ladder_index, score
from suite_workloads import Workload

CLAIMS = ("faster convergence: target in 20 epochs where Adam needs 30",
          "better generalization: 92 % vs 89 % test accuracy",
          "lower loss variance than Adam")
# The questions the report answers per workload: (label, candidate, the same without it).
ONE_GRADIENT = (("MSAM(AdamW)", "AdamW"),
                ("NeuroOptima momentum ascent", PLAIN),
                ("NeuroOptima momentum ascent + Lookahead", LOOKAHEAD))
SCHEDULED = (("SAM(AdamW)", "AdamW"),
             (f"NeuroOptima SAM every {SAM_INTERVAL}th", PLAIN),
             ("NeuroOptima late SAM", PLAIN),
             (f"NeuroOptima SAM every {SAM_INTERVAL}th + Lookahead", LOOKAHEAD),
             ("NeuroOptima late SAM + Lookahead", LOOKAHEAD))
# Settings a configuration chooses per workload or per run, which a constructor default
# cannot equal: any default value matches them (the rho is compared with the robust one).
PER_RUN = ("tuned", "the LR warm-up steps")


# ------------------------------------------------------------------ formatting

def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "never"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


# Short candidate names for chart labels and the README's table.
SHORT = {"NeuroOptima": "N", "momentum ascent": "MA", "Lookahead": "LA",
         f"SAM every {SAM_INTERVAL}th": f"SAM/{SAM_INTERVAL}", "SGD Nesterov": "SGD-N"}


def short(name: str) -> str:
    for long, abbrev in SHORT.items():
        name = name.replace(long, abbrev)
    return name


# ------------------------------------------------------------------ verdicts

def defaults_config() -> str | None:
    """The configuration the constructor's defaults run (a tuned or per-run setting matches
    any default), or None when they run none of those the suite measures."""
    defaults = constructor_defaults()
    found = [name for name, settings in NEURO_CONFIGS.items()
             if all(v in PER_RUN or defaults.get(k) == v for k, v in settings.items())]
    return found[0] if len(found) == 1 else None


def _pairs(result: dict) -> list[tuple[str, dict, dict, Workload]]:
    """(workload, row of the defaults' configuration, AdamW row) where both are complete."""
    out, neuro = [], defaults_config()
    for name, wl in result["workloads"].items():
        n, a = wl["rows"].get(neuro), wl["rows"].get(BASE)
        if n and a and n["complete"] and a["complete"] and wl["target"] is not None:
            out.append((name, n, a, wl["workload"]))
    return out


def _diff_text(w: Workload, n: dict, a: dict, key: str) -> str:
    d = difference(w, n, a, key)
    if d is None:
        return "–"
    scale, fmt = (100, ".1f") if w.higher_is_better else (1, ".3f")
    (nm, _), (am, _) = n[key], a[key]
    return (f"{scale * nm:{fmt}} vs {scale * am:{fmt}} ({scale * d[0]:+{fmt}} ± "
            f"{scale * d[1]:{fmt}})")


def verdict_rows(result: dict) -> list[list[str]]:
    pairs, neuro = _pairs(result), defaults_config()
    if not pairs:
        return [[c, f"not measured yet (no workload has complete AdamW and {neuro} rows; the "
                 f"defaults' configuration)", "open"] for c in CLAIMS]
    # The claims are about NeuroOptima as constructed with its defaults.
    who = f"NeuroOptima's defaults ({short(neuro)}, LR and any rho tuned per workload)"
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
    rows.append([CLAIMS[0], f"median epochs of gradient evaluations to target, {who} vs "
                 "AdamW: " + "; ".join(parts) + "; CPU seconds to target: "
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
        rows.append([CLAIMS[1], f"test accuracy %, {who} vs AdamW (difference ± 2 std. "
                     "errors), at equal gradient evaluations: " + "; ".join(parts)
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
    where = (" (its training loss is taken where the model is while training, at the ascent "
             "point)" if CANDIDATES[neuro].moves_weights else "")
    rows.append([CLAIMS[2], f"training-loss variance over the last 10 % of steps, {who}{where} "
                 "/ AdamW (equal gradient evaluations): " + "; ".join(parts),
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
    cands = [c for c, r in wl["rows"].items() if c in NEURO_CONFIGS and r["complete"]]
    if not cands:
        return None
    return max(cands, key=lambda c: statistics.fmean(score(w, r) for r in wl["rows"][c]["runs"]))


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


def _pm_diff(w: Workload, d: tuple[float, float] | None) -> str:
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
            ("scheduled SAM", f"NeuroOptima SAM every {SAM_INTERVAL}th"): 2,
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
        elif (c["question"], c["a"]) in asks and c["b"] == PLAIN:
            row[asks[(c["question"], c["a"])]] = f"{_pm_diff(c['w'], c['equal_g'])} ({c['says_g']})"
    if not rows:
        return []
    return ["The three questions per workload (test metric at equal gradient evaluations, "
            "difference ± 2 standard errors, positive = better; each against NeuroOptima "
            "without it, the last against tuned AdamW):", "",
            _table(["workload", "momentum ascent", f"SAM every {SAM_INTERVAL}th",
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


# ------------------------------------------------------------------ recommended settings

def _describe(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) if settings else "the defaults"


def robust_lr(rows_by_workload: list[dict], key: str = "search_scores") -> float | None:
    """The ladder LR that is never far from a workload's best: among the LRs every workload's
    search tried (selection seed, whole budget), the one whose worst rank over the workloads is
    best (then the best mean rank, then the smaller LR). A diverged run ranks last. With
    ``key="rho_scores"``, the same for rho (each workload's search at its chosen LR)."""
    common = set.intersection(*(set(r[key]) for r in rows_by_workload))
    if not common:
        return None
    ranks: dict[float, list[int]] = {x: [] for x in common}
    for row in rows_by_workload:
        order = sorted(row[key], key=lambda x: -row[key][x])
        for x in common:
            ranks[x].append(order.index(x) + 1)
    return min(common, key=lambda x: (max(ranks[x]), statistics.fmean(ranks[x]), x))


def one_gradient(name: str) -> bool:
    """Whether a configuration takes one gradient a step, so that ``step()`` without a
    closure runs it in any loop (scheduled exact SAM needs a closure on its SAM steps)."""
    return CANDIDATES[name].sam_every == 0


def recommended(result: dict) -> dict | None:
    """The NeuroOptima configuration for the defaults: fastest to target in gradient
    evaluations (geometric mean over the workloads) among those that take one gradient a step
    (the defaults must run in any loop), and its robust LR; also the fastest of all
    (``best_any``). The configurations compared are those every workload runs (a "+ Lookahead"
    form that a workload leaves out, Lookahead paying nothing there, is not one); None until
    each of them is complete on every workload with a target."""
    times = profile_times(result, "grad_evals_to_target")
    planned = [set(wl["planned"]) for wl in result["workloads"].values()]
    names = [n for n in NEURO_CONFIGS if all(n in p for p in planned)]
    usable = times if names and all(n in t for t in times.values() for n in names) else {}
    if not usable or not any(one_gradient(n) for n in names):
        return None
    score = {n: statistics.fmean(
        math.log(t[n] / min(t[m] for m in names)) if math.isfinite(t[n]) else 10.0
        for t in usable.values()) for n in names}
    best_any = min(names, key=lambda n: score[n])
    best = min((n for n in names if one_gradient(n)), key=lambda n: score[n])
    best_rows = [result["workloads"][w]["rows"][best] for w in usable]
    defaults = constructor_defaults()
    settings = {**{k: v for k, v in defaults.items() if k != "lr"}, **NEURO_CONFIGS[best]}
    lr = robust_lr(best_rows)
    tuned_rho = settings.get("sam_rho") == "tuned"
    rho = robust_lr(best_rows, "rho_scores") if tuned_rho else None
    agrees = (len(usable) == len(result["workloads"]) and lr is not None
              and all(defaults.get(k) == v for k, v in settings.items() if v not in PER_RUN)
              and ladder_index(defaults["lr"]) == ladder_index(lr)
              and (not tuned_rho or rho is not None and defaults["sam_rho"] > 0 and
                   ladder_index(defaults["sam_rho"], RHO_LADDER) == ladder_index(rho,
                                                                                  RHO_LADDER)))
    return dict(names=names, times=usable, best=best, best_any=best_any, score=score,
                settings=settings, lr=lr, tuned_lrs=[r["lr"] for r in best_rows], rho=rho,
                tuned_rhos=[r["rho"] for r in best_rows] if tuned_rho else [],
                defaults=defaults, defaults_agree=agrees)


def recommendation(result: dict) -> list[str]:
    """``recommended`` in words and a table, and whether the constructor defaults are it."""
    rec = recommended(result)
    if rec is None:
        return ["Recommended defaults: not enough complete NeuroOptima rows yet (needs a "
                f"configuration among {', '.join(NEURO_CONFIGS)} complete on every workload "
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
    if rec["rho"] is not None:
        rhos = ", ".join(f"{x:g}" for x in rec["tuned_rhos"])
        lines[-1] += (f" Its tuned rho per workload: {rhos}; the rho never far from each "
                      f"workload's best (the same rule over the rhos every workload tried at "
                      f"its LR): **{_fmt(rec['rho'])}**.")
    for k, v in rec["settings"].items():
        if v in PER_RUN and k != "sam_rho":
            lines[-1] += (f" It ran with {k}={v}, which no default can hold: set it for your "
                          f"run (the constructor's is {k}={rec['defaults'].get(k)}).")
    defaults = _describe(rec["defaults"])
    if rec["defaults_agree"]:
        verdict = (f"The constructor defaults ({defaults}) are this recommendation (lr"
                   + (" and sam_rho" if rec["rho"] is not None else "")
                   + ": a round value nearest that ladder point).")
    else:
        total = len(result["workloads"])
        covered = len(rec["times"])
        verdict = (f"The constructor defaults ({defaults}) are not this recommendation"
                   + (f" (which covers {covered} of {total} workloads)" if covered < total
                      else "") + ".")
    return lines + ["", verdict]
