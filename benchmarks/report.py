"""Turn every JSON under benchmarks/results/ into markdown tables, Mermaid charts and PNG plots.

    python benchmarks/report.py                 # REPORT.md, PNGs, and README.md's block
    python benchmarks/report.py --check         # exit 1 if README.md's block is stale

Writes ``<results>/REPORT.md`` (everything: tables, plots, learning-rate searches) and replaces
the text between ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->`` in README.md with
a short block (at most 60 lines): the verdict on the three announced claims and a link to
REPORT.md. Every number in both comes from the JSON files through the
formatting functions below; nothing is typed by hand. Known files get their own sections
(``convergence.json``, ``communication.json``, ``sharded.json``); any other JSON holding a list
of flat records (``[...]`` or ``{"meta": ..., "records": [...]}``) is shown as a table.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import sys
from pathlib import Path

from neurooptima import NeuroOptima
from neurooptima.validation import DEFAULT_LR as RULE_LR

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN = "<!-- benchmarks:begin -->"
END = "<!-- benchmarks:end -->"
NEURO_RULES = ("adan", "lion", "lion_adan")
SUITE_KEY = "suite"  # load_results' key for the time-to-target suite's records
# The suite's record folder under the results: warm-up + cosine protocol only (the earlier
# constant-LR records are retired from the report; git history keeps them).
SUITE_DIR = "suite_cosine"
# The three claims NeuroOptima was announced with; the suite's verdict table answers each.
CLAIMS = ("faster convergence: target in 20 epochs where Adam needs 30",
          "better generalization: 92 % vs 89 % test accuracy",
          "lower loss variance than Adam")


# ------------------------------------------------------------------ number formatting

def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def pct_pm(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def num(x, digits: int = 3) -> str:
    """Plain number: integers with thousands separators, floats to about ``digits`` significant
    digits (whole-valued large floats, such as byte counts, as integers)."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float) and math.isfinite(x) and x.is_integer() and abs(x) >= 1000:
        x = int(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        magnitude = abs(x)
        if magnitude >= 10 ** digits:
            return f"{x:,.0f}"
        if magnitude >= 1:
            return f"{x:,.{max(0, digits - 1 - int(math.log10(magnitude)))}f}"
        return f"{x:.{digits}g}"
    return str(x)


def lr_str(lr: float) -> str:
    return f"{lr:g}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
              for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ convergence

STATE_SUFFIX = " bf16 state"  # convergence_optimizers.neuro_name's suffix for bfloat16 state


def short_label(name: str) -> str:
    """Compact optimizer labels for chart axes."""
    if name.startswith("NeuroOptima["):
        state = ""
        if name.endswith(STATE_SUFFIX):
            name, state = name[:-len(STATE_SUFFIX)], " bf16"
        rule = name[len("NeuroOptima["):name.index("]")]
        suffix = name[name.index("]") + 1:].strip()
        return f"N-{rule}" + {"": "", "-SAM": " noSAM", "-Lookahead": " noLA"}[suffix] + state
    return {"SGD+momentum": "SGD", "Lookahead(AdamW)": "LA-AdamW",
            "SAM(AdamW)": "SAM-AdamW", "SAM(SGD)": "SAM-SGD"}.get(name, name)


def _rows_by_task(conv: dict) -> dict[str, list[dict]]:
    by_task: dict[str, list[dict]] = {}
    for row in conv["summary"]:
        by_task.setdefault(row["task"], []).append(row)
    return by_task


def _sizes_line(task_result: dict) -> str:
    t, s = task_result["task"], task_result["sizes"]
    opts = ", ".join(f"{k}={v}" for k, v in t["model_options"].items())
    extra = ""
    if "train_chars" in s:
        extra = (f" ({num(s['train_chars'])} / {num(s['val_chars'])} / "
                 f"{num(s['test_chars'])} characters, sequences of "
                 f"{t['data_options'].get('seq_len')})")
    return (f"**{t['name']}**: {t['model']} ({opts}) on {t['dataset']}, "
            f"{num(s['train'])} train / {num(s['val'])} validation / {num(s['test'])} test "
            f"examples{extra}; batch {t['batch_size']}, {num(t['steps'])} steps "
            f"({num(t['steps'] / task_result['steps_per_epoch'])} epochs), "
            f"{t['metric']} target {pct(t['target'])} %; the task took "
            f"{num(task_result['wall_s'] / 60)} min")


def convergence_table(rows: list[dict]) -> str:
    header = ["optimizer", "LR", "test acc. % (equal epochs)",
              "test acc. % (equal grad. evals)", "reached target", "epochs to target",
              "steps to target", "grad. evals to target", "train s to target",
              "loss variance, last epoch", "train s total"]
    body = []
    for r in rows:
        lr = lr_str(r["lr"]) + (" (grid edge)" if r["lr_at_grid_edge"] else "")
        body.append([r["optimizer"], lr, pct_pm(r["acc_mean"], r["acc_std"]),
                     pct_pm(r["acc_equal_grad_evals_mean"], r["acc_equal_grad_evals_std"]),
                     f"{r['reached']}/{r['seeds']}", num(r["epochs_to_target"]),
                     num(r["steps_to_target"]), num(r["grad_evals_to_target"]),
                     num(r["wall_s_to_target"]), num(r["loss_var_mean"]),
                     num(r["train_wall_s_mean"])])
    return table(header, body)


def lr_grid_table(rows: list[dict]) -> str:
    header = ["optimizer", "grid", "validation accuracy % per LR", "chosen"]
    body = [[r["optimizer"], ", ".join(lr_str(x) for x in r["lr_grid"]),
             ", ".join(f"{lr_str(float(k))}: {pct(v)}" for k, v in r["val_acc_by_lr"].items()),
             lr_str(r["lr"])] for r in rows]
    return table(header, body)


def mermaid_accuracy(task: str, rows: list[dict]) -> str:
    values = [100 * r["acc_mean"] for r in rows]
    lo = max(0, math.floor(min(values) / 5) * 5 - 5)
    hi = min(100, math.ceil(max(values) / 5) * 5)
    labels = ", ".join(f'"{short_label(r["optimizer"])}"' for r in rows)
    bars = ", ".join(f"{v:.1f}" for v in values)
    return "\n".join(["```mermaid", "xychart-beta",
                      f'    title "{task}: mean test accuracy (%), equal epochs"',
                      f"    x-axis [{labels}]",
                      f'    y-axis "test accuracy (%)" {lo} --> {hi}',
                      f"    bar [{bars}]", "```"])


def state_pairs(conv: dict) -> list[tuple[str, str, str]]:
    """(full-precision name, reduced-state name, state dtype) for every configuration measured
    both ways: same settings except ``state_dtype``."""
    opts = conv["optimizers"]
    pairs = []
    for name, spec in opts.items():
        dtype = spec["settings"].get("state_dtype")
        if dtype is None:
            continue
        plain = {k: v for k, v in spec["settings"].items() if k != "state_dtype"}
        twins = [other for other, o in opts.items()
                 if o["settings"] == plain and o["family"] == spec["family"]
                 and o["sam"] == spec["sam"]]
        if twins:
            pairs.append((twins[0], name, dtype))
    return pairs


def _two_standard_errors(a: dict, b: dict) -> float:
    """Two standard errors of the difference of two seed means (a rough 95 % band)."""
    return 2 * math.sqrt(a["acc_std"] ** 2 / a["seeds"] + b["acc_std"] ** 2 / b["seeds"])


def state_dtype_section(conv: dict) -> str | None:
    """Full-precision vs reduced-precision optimizer state, per task, from the same protocol."""
    pairs = state_pairs(conv)
    if not pairs:
        return None
    by_task = _rows_by_task(conv)
    header = ["task", "configuration", "reduced state", "LR full / reduced",
              "test acc. % full-precision state", "test acc. % reduced state",
              "difference, points", "2 std. errors", "test loss full / reduced"]
    body, deltas, inside = [], {}, {}
    for task, rows in by_task.items():
        by_name = {r["optimizer"]: r for r in rows}
        for plain, reduced, dtype in pairs:
            if plain not in by_name or reduced not in by_name:
                continue
            a, b = by_name[plain], by_name[reduced]
            delta, band = b["acc_mean"] - a["acc_mean"], _two_standard_errors(a, b)
            deltas.setdefault(reduced, []).append(delta)
            inside[reduced] = inside.get(reduced, 0) + (abs(delta) < band)
            body.append([task, plain, f"`{dtype}`", f"{lr_str(a['lr'])} / {lr_str(b['lr'])}",
                         pct_pm(a["acc_mean"], a["acc_std"]), pct_pm(b["acc_mean"], b["acc_std"]),
                         f"{100 * delta:+.2f}", f"{100 * band:.2f}",
                         f"{num(a['test_loss_mean'])} / {num(b['test_loss_mean'])}"])
    if not body:
        return None
    out = ["#### Optimizer state in reduced precision", "",
           "Full precision: the state in the parameters' dtype (float32 here). "
           "`state_dtype=torch.bfloat16` stores the rule's buffers in bfloat16 and runs the math "
           "in float32; with SAM it keeps the perturbation in bfloat16 instead of a copy of the "
           "weights. Each configuration below went through the protocol above twice, once per "
           "state dtype (its own LR selection, the same seeds). Difference: reduced minus "
           "full-precision mean test accuracy at equal epochs; a difference smaller than two "
           "standard errors of the difference is within the seed-to-seed noise of these runs. "
           "Training times are not compared: rows added by a later run (see the command above) "
           "ran at a different machine load.", "", table(header, body), ""]
    out.append("Mean difference over the tasks: " + "; ".join(
        f"{name} {100 * statistics.fmean(d):+.2f} points (within two standard errors on "
        f"{inside[name]} of {len(d)} tasks)" for name, d in deltas.items()) + ".")
    return "\n".join(out)


def _gap_to_best(by_task: dict[str, list[dict]], name: str, key: str) -> float | None:
    """Mean over tasks of (accuracy of ``name`` - best accuracy of any optimizer)."""
    gaps = []
    for rows in by_task.values():
        best = max(r[key] for r in rows)
        mine = [r[key] for r in rows if r["optimizer"] == name]
        if not mine:
            return None
        gaps.append(mine[0] - best)
    return statistics.fmean(gaps) if gaps else None


def _mean_delta(by_task, a: str, b: str, key: str) -> float | None:
    deltas = []
    for rows in by_task.values():
        ra = [r[key] for r in rows if r["optimizer"] == a]
        rb = [r[key] for r in rows if r["optimizer"] == b]
        if not ra or not rb:
            return None
        deltas.append(ra[0] - rb[0])
    return statistics.fmean(deltas) if deltas else None


# The code's defaults, read from the signature so the README states what the code does.
_DEFAULTS = {name: p.default for name, p in
             inspect.signature(NeuroOptima.__init__).parameters.items()
             if p.default is not inspect.Parameter.empty}
if _DEFAULTS["lr"] is None:  # lr=None: the default rule's own rate
    _DEFAULTS["lr"] = RULE_LR[_DEFAULTS["update"]]


def recommendation(conv: dict) -> str | None:
    """The default update rule and hyperparameters the numbers support, with the numbers."""
    by_task = _rows_by_task(conv)
    names = {r["optimizer"] for r in conv["summary"]}
    full = {rule: f"NeuroOptima[{rule}]" for rule in NEURO_RULES}
    if not all(n in names for n in full.values()):
        return None
    key_e, key_g = "acc_mean", "acc_equal_grad_evals_mean"
    gaps = {rule: _gap_to_best(by_task, full[rule], key_e) for rule in NEURO_RULES}
    gaps_g = {rule: _gap_to_best(by_task, full[rule], key_g) for rule in NEURO_RULES}
    best = max(NEURO_RULES, key=lambda rule: (gaps[rule], gaps_g[rule]))
    lines = ["**Recommended defaults (from these runs).** Mean over the tasks of each "
             "NeuroOptima rule's test accuracy minus the best optimizer's on that task "
             "(percentage points; 0 = best everywhere):", ""]
    lines.append(table(["rule (SAM + Lookahead)", "gap, equal epochs", "gap, equal grad. evals"],
                       [[f"`{rule}`" + (" (recommended)" if rule == best else ""),
                         f"{100 * gaps[rule]:+.2f}", f"{100 * gaps_g[rule]:+.2f}"]
                        for rule in NEURO_RULES]))
    lines.append("")
    bullets = [f"- update rule: `update=\"{best}\"`, the smallest mean gap at equal epochs."]
    no_sam, no_la = f"NeuroOptima[{best}] -SAM", f"NeuroOptima[{best}] -Lookahead"
    if no_sam in names:
        d_e = _mean_delta(by_task, full[best], no_sam, key_e)
        d_g = _mean_delta(by_task, full[best], no_sam, key_g)
        keep = d_g is not None and d_g > 0
        bullets.append(
            f"- SAM: with SAM minus without, mean over tasks: {100 * d_e:+.2f} points at equal "
            f"epochs, {100 * d_g:+.2f} at equal gradient evaluations; "
            + ("it pays for its second gradient evaluation here."
               if keep else "it does not pay for its second gradient evaluation in these short "
               "runs, so pass `sam_rho=0` when the budget is compute rather than epochs. The "
               f"default stays `sam_rho={num(_DEFAULTS['sam_rho'])}`: SAM's aim is generalization "
               "on long runs, which runs of a few hundred steps do not measure."))
    if no_la in names:
        d_e = _mean_delta(by_task, full[best], no_la, key_e)
        keep = d_e is not None and d_e >= 0
        bullets.append(
            f"- Lookahead: with minus without, mean over tasks: {100 * d_e:+.2f} points at equal "
            f"epochs (same gradient cost); "
            + ("keep `lookahead_k=5, lookahead_alpha=0.5`." if keep
               else "default `lookahead_k=0` (off)."))
    chosen = {task: [r["lr"] for r in rows if r["optimizer"] == full[best]][0]
              for task, rows in by_task.items()}
    at_edge = all(r["lr_at_grid_edge"] for rows in by_task.values() for r in rows
                  if r["optimizer"] == full[best])
    counts: dict[float, int] = {}
    for lr in chosen.values():
        counts[lr] = counts.get(lr, 0) + 1
    top = max(counts.values())
    lr_default = statistics.median_low(sorted(lr for lr, c in counts.items() if c == top))
    bullets.append(
        f"- learning rate: `lr={lr_str(lr_default)}` (chosen per task by the grid: "
        + ", ".join(f"{task} {lr_str(lr)}" for task, lr in chosen.items())
        + f"); the default stays `lr={num(_DEFAULTS['lr'])}`, a conservative value"
        + (" (the grid's choice sits at an edge of the grid on every task, so the best value is "
           "not resolved)" if at_edge else "") + "; betas stay at the rule's official defaults, weight decay "
        f"{num(conv['optimizers'][full[best]]['settings']['weight_decay'])} (not tuned here).")
    lines += bullets
    stds = [r["acc_std"] for r in conv["summary"]]
    edges = sum(r["lr_at_grid_edge"] for r in conv["summary"])
    lines += ["", f"Caveat: the seed-to-seed standard deviation of the test accuracy averages "
              f"{100 * statistics.fmean(stds):.2f} points over all rows, so smaller differences "
              f"are not resolved by these runs; {edges} of {len(stds)} (task, optimizer) rows "
              f"chose an LR at the edge of their grid, where a wider grid could move them."]
    return "\n".join(lines)


def convergence_section(conv: dict, detail: bool) -> str:
    by_task = _rows_by_task(conv)
    out = ["### Convergence, generalization, stability", ""]
    out.append(
        f"Profile `{conv['profile']}`, made by `{conv['command']}` "
        f"({conv['workers']} worker process(es) in all, one thread each, "
        f"{conv['environment']['cpu_count']} shared CPU cores, torch "
        f"{conv['environment']['torch']}). Learning rate per optimizer: best final validation "
        f"accuracy over its 3-point grid (one seed, half the step budget); then "
        f"{conv['seeds']} seeds at that LR, mean ± standard deviation of the test accuracy. "
        f"Constant learning rate. *Equal grad. evals*: SAM optimizers (2 gradient evaluations "
        f"per step) read at half their steps. Loss variance: variance of the per-step training "
        f"loss over the last epoch, mean over seeds. Times are CPU seconds on a shared "
        f"machine (noisy).")
    out.append("")
    for task_result in conv["tasks"]:
        name = task_result["task"]["name"]
        rows = by_task.get(name, [])
        out += [f"#### {name}", "", _sizes_line(task_result), "", convergence_table(rows), ""]
        out += [mermaid_accuracy(name, rows), ""]
        if detail:
            out += ["Learning-rate grid (validation accuracy):", "", lr_grid_table(rows), ""]
    state = state_dtype_section(conv)
    if state:
        out += [state, ""]
    rec = recommendation(conv)
    if rec:
        out += [rec, ""]
    return "\n".join(out)


def early_training_section(conv: dict) -> str:
    """What still holds of the earlier 40-step convergence runs: the full- vs reduced-precision
    state comparison (same protocol on both sides). Their accuracy rows measured start-up noise
    and are superseded by the time-to-target suite."""
    state = state_dtype_section(conv)
    if not state:
        return ""
    return "\n".join([
        "### Optimizer state precision (early-training runs, `convergence.json`)", "",
        f"Made by `{conv['command']}`: runs of a few hundred steps at most (profile "
        f"`{conv['profile']}`), too short to compare optimizers (the suite above does that), "
        "but long enough to compare one configuration with itself at two state precisions.",
        "", state, ""])


# ------------------------------------------------------------------ communication

def communication_section(comm: dict) -> str:
    meta = comm["meta"]
    out = ["### Communication per step and rank", "",
           f"Made by `{meta['command']}`: {num(meta['model_bytes'])} bytes of float32 "
           f"parameters, gloo on CPU; bytes counted per collective with the ring convention "
           f"of `neurooptima.distributed.comm_accounting` (all-reduce 2 S (N-1)/N, "
           f"reduce-scatter and all-gather S (N-1)/N) and compared with the formula "
           f"`passes x model bytes x (N-1)/N`; for `zero 2xM` (hybrid sharding on a 2 x M "
           f"mesh) reduce-scatter and all-gather run within the M-rank shard group and the "
           f"reduced chunk (S / M) is all-reduced across the 2 replicas.", ""]
    rows = [[r["strategy"], r["sam_mode"], str(r["world_size"]),
             ", ".join(f"{k} {num(v)}" for k, v in sorted(r["bytes_by_collective"].items())),
             num(r["bytes_per_step"]), num(r["bytes_formula"]), f"{r['ratio_to_formula']:.4f}",
             f"{r['bytes_per_step'] / meta['model_bytes']:.3f}"]
            for r in comm["records"]]
    out.append(table(["strategy", "SAM", "ranks", "by collective", "bytes/step/rank",
                      "formula", "measured / formula", "x model bytes"], rows))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ other results

def sharded_section(data: dict) -> str:
    meta = data["meta"]
    out = ["### ZeRO-sharded step (`sharded.json`)", "",
           f"Made by `{meta['command']}`: {num(meta['model_bytes'])} bytes of parameters, "
           f"{meta['world_size']} ranks, batch {meta['batch_per_rank']} per rank, "
           f"{meta['backend']} on {meta['device']}.", ""]
    rows = [[r["config"], r["candidate"], num(r["time_ms"]), num(r["ratio_to_ddp"]),
             num(r["bytes_total"]), num(r["bytes_formula"]),
             num(r["bytes_ratio_to_formula"], 5), num(r["state_bytes_per_rank"])]
            for r in data["records"]]
    out.append(table(["config", "candidate", "step ms (median)", "x DDP", "bytes/step",
                      "formula", "ratio", "state bytes/rank"], rows))
    return "\n".join(out) + "\n"


def _records(data) -> tuple[dict, list[dict]] | None:
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return {}, data
    if isinstance(data, dict) and isinstance(data.get("records"), list):
        return data.get("meta", {}) or {}, data["records"]
    return None


def generic_section(name: str, data) -> str | None:
    found = _records(data)
    if found is None:
        return None
    meta, records = found
    columns: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in columns and not isinstance(v, (dict, list)):
                columns.append(k)
    out = [f"### {name}", ""]
    if meta.get("command"):
        out += [f"Made by `{meta['command']}`.", ""]
    out.append(table(columns, [[num(r.get(c)) for c in columns] for r in records]))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ assembly

def load_results(results: Path) -> dict[str, object]:
    """Every JSON in ``results`` by file name, and under ``SUITE_KEY`` the analysis of the
    time-to-target suite's records in ``results/<SUITE_DIR>`` (when there are any)."""
    loaded: dict[str, object] = {p.name: json.loads(p.read_text())
                                 for p in sorted(results.glob("*.json"))}
    folder = results / SUITE_DIR
    if folder.is_dir() and any(folder.glob("*.jsonl")):
        import suite
        import suite_report
        meta_path = folder / "suite_meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        loaded[SUITE_KEY] = suite_report.analyse(suite.load_records(folder), meta)
    return loaded


def render(results: dict[str, object], detail: bool) -> str:
    """The markdown for every result file, in a fixed order."""
    parts = []
    if SUITE_KEY in results:
        import suite_report
        parts.append(suite_report.markdown(results[SUITE_KEY]))
    if "convergence.json" in results:
        parts.append(early_training_section(results["convergence.json"]))
    if "communication.json" in results:
        parts.append(communication_section(results["communication.json"]))
    if "sharded.json" in results:
        parts.append(sharded_section(results["sharded.json"]))
    for name, data in results.items():
        if name in ("convergence.json", "communication.json", "sharded.json", SUITE_KEY):
            continue
        section = generic_section(f"{Path(name).stem.replace('_', ' ')} (`{name}`)", data)
        if section:
            parts.append(section)
    return "\n".join(parts).rstrip() + "\n"


README_BLOCK_MAX_LINES = 60


def claims_rows(results: dict[str, object]) -> list[list[str]]:
    """(claim, measured, verdict) for the three announced claims. Filled from the time-to-target
    suite's records when they exist (see ``suite_report``); until then each claim is open."""
    suite = results.get(SUITE_KEY)
    if suite:
        import suite_report
        return suite_report.verdict_rows(suite)
    return [[claim, "not measured yet by the time-to-target suite", "open"]
            for claim in CLAIMS]


def readme_block(results: dict[str, object]) -> str:
    """The README's short block: the verdict on the three claims and a link to the full report."""
    note = ("Generated by `python benchmarks/report.py` from the records in `benchmarks/results/`. "
            "Full tables, time-to-target plots, performance profiles, learning-rate searches and "
            "the step-speed, memory and communication benchmarks: "
            "[benchmarks/results/REPORT.md](benchmarks/results/REPORT.md); how to run them: "
            "[benchmarks/README.md](benchmarks/README.md).")
    lines = [BEGIN, note, "", table(["claim", "measured", "verdict"], claims_rows(results))]
    suite = results.get(SUITE_KEY)
    if suite:
        import suite_report
        lines += ["", suite_report.status_line(suite)]
        charts = suite_report.readme_charts(suite)
        if charts:
            lines += [""] + charts
    lines.append(END)
    block = "\n".join(lines)
    assert block.count("\n") + 1 <= README_BLOCK_MAX_LINES, "README block must stay short"
    return block


def inject(readme_text: str, block: str) -> str:
    if BEGIN not in readme_text or END not in readme_text:
        raise ValueError(f"README has no {BEGIN} ... {END} markers under '## Benchmarks'")
    head, rest = readme_text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + block + tail


def current_block(readme_text: str) -> str:
    head, rest = readme_text.split(BEGIN, 1)
    inner, _ = rest.split(END, 1)
    return BEGIN + inner + END


# ------------------------------------------------------------------ plots

def plots(results: dict[str, object], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if SUITE_KEY in results:
        import suite_report
        written += suite_report.plots(results[SUITE_KEY], out_dir)
    conv = None  # the 40-step convergence runs are no longer plotted (superseded by the suite)
    if conv:
        by_task = _rows_by_task(conv)
        for task_result in conv["tasks"]:
            name = task_result["task"]["name"]
            fig, ax = plt.subplots(figsize=(9, 5.5))
            runs_by_opt: dict[str, list[dict]] = {}
            for r in task_result["runs"]:
                runs_by_opt.setdefault(r["optimizer"], []).append(r)
            for opt, runs in runs_by_opt.items():
                xs = [p["grad_evals"] for p in runs[0]["curve"]]
                ys = [100 * statistics.fmean(r["curve"][i]["acc"] for r in runs)
                      for i in range(len(xs))]
                style = "-" if opt.startswith("NeuroOptima") else "--"
                ax.plot(xs, ys, style, marker=".", label=short_label(opt))
            ax.set_xlabel("gradient evaluations")
            ax.set_ylabel(f"test {task_result['task']['metric']} (%)")
            ax.set_title(f"{name}: mean over {conv['seeds']} seeds")
            ax.legend(fontsize=7, ncol=2)
            ax.grid(alpha=0.3)
            path = out_dir / f"convergence_{name}_curves.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)

            rows = by_task[name]
            fig, ax = plt.subplots(figsize=(9, 4.5))
            xs = range(len(rows))
            ax.bar([x - 0.2 for x in xs], [100 * r["acc_mean"] for r in rows], 0.4,
                   yerr=[100 * r["acc_std"] for r in rows], label="equal epochs")
            ax.bar([x + 0.2 for x in xs], [100 * r["acc_equal_grad_evals_mean"] for r in rows],
                   0.4, yerr=[100 * r["acc_equal_grad_evals_std"] for r in rows],
                   label="equal gradient evaluations")
            ax.set_xticks(list(xs), [short_label(r["optimizer"]) for r in rows], rotation=60,
                          ha="right", fontsize=8)
            low = min(100 * min(r["acc_mean"], r["acc_equal_grad_evals_mean"]) for r in rows)
            ax.set_ylim(max(0, low - 5), None)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{name}: mean ± std over {conv['seeds']} seeds")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / f"convergence_{name}_final.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    comm = results.get("communication.json")
    if comm:
        recs = comm["records"]
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r['strategy']}\n{r['sam_mode']}\nN={r['world_size']}" for r in recs]
        xs = range(len(recs))
        ax.bar([x - 0.2 for x in xs], [r["bytes_per_step"] / 2**20 for r in recs], 0.4,
               label="measured")
        ax.bar([x + 0.2 for x in xs], [r["bytes_formula"] / 2**20 for r in recs], 0.4,
               label="formula")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel("MiB per step per rank")
        ax.legend()
        fig.tight_layout()
        path = out_dir / "communication.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--check", action="store_true",
                        help="only compare README.md's block with the JSON; exit 1 if stale")
    args = parser.parse_args(argv)
    results = load_results(args.results)
    block = readme_block(results)
    # The Russian README mirrors the block (its charts are code blocks it must share).
    mirror = args.readme.with_name(args.readme.stem + ".ru.md")
    readmes = [args.readme] + ([mirror] if mirror.exists() and BEGIN in mirror.read_text()
                               else [])
    if args.check:
        stale = [path for path in readmes if current_block(path.read_text()) != block]
        for path in stale:
            print(f"{path}: the benchmark block differs from {args.results}/*.json; "
                  f"run python benchmarks/report.py", file=sys.stderr)
        if stale:
            return 1
        print(f"{', '.join(map(str, readmes))}: benchmark block matches {args.results}/*.json")
        return 0
    report = ("# NeuroOptima benchmark report\n\nGenerated by `python benchmarks/report.py` from "
              "the JSON files in this folder.\n\n" + render(results, detail=True))
    (args.results / "REPORT.md").write_text(report)
    print(f"wrote {args.results / 'REPORT.md'}")
    if not args.no_plots:
        for path in plots(results, args.results):
            print(f"wrote {path}")
    if not args.no_readme:
        for path in readmes:
            path.write_text(inject(path.read_text(), block))
            print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
