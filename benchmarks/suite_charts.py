"""The suite's charts: the announcement's three comparisons per workload as Mermaid bar charts
(REPORT.md and the README block) and as PNG plots with error bars, and the performance
profiles' plot.
"""

from __future__ import annotations

import math
from pathlib import Path

from suite_candidates import CANDIDATES
from suite_verdicts import performance_profile, profile_times, short


# ------------------------------------------------------------------ Mermaid charts

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
           and not CANDIDATES[c].moves_weights}
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
