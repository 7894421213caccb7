"""Turn every JSON under benchmarks/results/ into markdown tables, Mermaid charts and PNG plots.

    python benchmarks/report.py                 # REPORT.md, PNGs, and README.md's block
    python benchmarks/report.py --check         # exit 1 if README.md's block is stale

Writes ``<results>/REPORT.md`` (everything: tables, plots, learning-rate searches) and replaces
the text between ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->`` in README.md with
a short block (at most 60 lines): the verdict on the three announced claims and a link to
REPORT.md. Every number in both comes from the result files through the
formatting functions below; nothing is typed by hand. The convergence records are the
time-to-target suite's (``<results>/suite_cosine/*.jsonl``: ``suite_analysis``,
``suite_verdicts``, ``suite_charts``, ``suite_report`` and ``state_precision``);
``communication.json`` and ``sharded.json`` get their own sections; any
other JSON holding a list of flat records (``[...]`` or ``{"meta": ..., "records": [...]}``)
is shown as a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN = "<!-- benchmarks:begin -->"
END = "<!-- benchmarks:end -->"
SUITE_KEY = "suite"  # load_results' key for the time-to-target suite's records
# The suite's record folder under the results: warm-up + cosine protocol only (the earlier
# constant-LR records are retired from the report; git history keeps them).
SUITE_DIR = "suite_cosine"
# The three claims NeuroOptima was announced with; the suite's verdict table answers each.
CLAIMS = ("faster convergence: target in 20 epochs where Adam needs 30",
          "better generalization: 92 % vs 89 % test accuracy",
          "lower loss variance than Adam")


# ------------------------------------------------------------------ number formatting

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


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
              for row in rows]
    return "\n".join(lines)


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
        import suite_analysis
        meta_path = folder / "suite_meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        loaded[SUITE_KEY] = suite_analysis.analyse(suite.load_records(folder), meta)
    return loaded


def render(results: dict[str, object], detail: bool) -> str:
    """The markdown for every result file, in a fixed order."""
    parts = []
    if SUITE_KEY in results:
        import suite_report
        import state_precision
        parts.append(suite_report.markdown(results[SUITE_KEY]))
        parts.append(state_precision.section(results[SUITE_KEY]))
    if "communication.json" in results:
        parts.append(communication_section(results["communication.json"]))
    if "sharded.json" in results:
        parts.append(sharded_section(results["sharded.json"]))
    for name, data in results.items():
        if name in ("communication.json", "sharded.json", SUITE_KEY):
            continue
        section = generic_section(f"{Path(name).stem.replace('_', ' ')} (`{name}`)", data)
        if section:
            parts.append(section)
    return "\n".join(parts).rstrip() + "\n"


README_BLOCK_MAX_LINES = 60


def claims_rows(results: dict[str, object]) -> list[list[str]]:
    """(claim, measured, verdict) for the three announced claims. Filled from the time-to-target
    suite's records when they exist (see ``suite_verdicts``); until then each claim is open."""
    suite = results.get(SUITE_KEY)
    if suite:
        import suite_verdicts
        return suite_verdicts.verdict_rows(suite)
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
        import suite_charts
        import suite_verdicts
        lines += ["", suite_verdicts.status_line(suite)]
        answers = suite_verdicts.readme_answers(suite)
        if answers:
            lines += [""] + answers
        charts = suite_charts.readme_charts(suite)
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
        import suite_charts
        written += suite_charts.plots(results[SUITE_KEY], out_dir)
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
