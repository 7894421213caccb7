"""Run every benchmark, then the report.

    python benchmarks/run_all.py --smoke    # CI: < 1 min (the suite's quick profile), temp folder
    python benchmarks/run_all.py --quick    # every benchmark reduced, < 10 min, temp folder
    python benchmarks/run_all.py --full     # the committed results: benchmarks/results/ + README

``--smoke`` and ``--quick`` write into ``--out-dir`` (default: a new temporary folder) and
never touch the committed results or README.md; the report is injected into a copy of README.md
in that folder and checked. ``--full`` writes ``benchmarks/results/*.json``, the PNGs,
``REPORT.md`` and README.md's benchmark block.

Benchmark scripts that are missing from this checkout are skipped with a message.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PY = sys.executable


def _torchrun() -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def plan(mode: str, out: Path) -> list[tuple[str, list[str]]]:
    """(name, command) of each benchmark in ``mode``."""
    suite = [PY, str(BENCH / "suite.py")]
    if mode == "smoke":
        return [("suite", suite + ["--profile", "quick", "--out", str(out / "suite_cosine")])]
    quick = ["--quick"] if mode == "quick" else []
    return [
        # full: runs or resumes the whole time-to-target suite (hours on two cores; it skips
        # every run already recorded in benchmarks/results/suite_cosine/)
        ("suite", suite + (["--profile", "quick", "--out", str(out / "suite_cosine")] if quick
                           else [])),
        ("communication", [PY, str(BENCH / "communication.py"), *quick,
                           "--out", str(out / "communication.json")]),
        ("step_speed", [PY, str(BENCH / "step_speed.py"), *quick,
                        "--out", str(out / "step_speed.json")]),
        ("memory", [PY, str(BENCH / "memory.py"), *quick, "--out", str(out / "memory.json")]),
        ("sharded", [*_torchrun(), str(BENCH / "bench_sharded.py"), *quick,
                     "--out", str(out / "sharded.json")]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--smoke", action="store_true", help="CI: under a minute, temp folder")
    mode.add_argument("--quick", action="store_true", help="under 10 minutes, temp folder")
    mode.add_argument("--full", action="store_true", help="the committed results")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="results folder for --smoke/--quick (default: a new temp folder)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only these benchmarks (suite, communication, "
                             "step_speed, memory, sharded)")
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    if name == "full":
        if args.out_dir is not None:
            parser.error("--full always writes benchmarks/results/; drop --out-dir")
        out = BENCH / "results"
    else:
        out = args.out_dir or Path(tempfile.mkdtemp(prefix=f"neurooptima-bench-{name}-"))
        if out.resolve() == (BENCH / "results").resolve():
            parser.error("--smoke/--quick must not overwrite the committed benchmarks/results/")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    for bench, command in plan(name, out):
        if args.only and bench not in args.only:
            continue
        script = next(Path(c) for c in command if c.endswith(".py") and c != PY)
        if not script.is_file():
            print(f"[run_all] {bench}: {script.relative_to(ROOT)} is not in this checkout; "
                  f"skipped", flush=True)
            continue
        print(f"[run_all] {bench}: {' '.join(command)}", flush=True)
        subprocess.run(command, cwd=ROOT, check=True)

    report = [PY, str(BENCH / "report.py"), "--results", str(out)]
    if name == "full":
        subprocess.run(report, cwd=ROOT, check=True)
    else:
        readme = out / "README.md"
        shutil.copyfile(ROOT / "README.md", readme)
        subprocess.run(report + ["--readme", str(readme)], cwd=ROOT, check=True)
        subprocess.run(report + ["--readme", str(readme), "--check"], cwd=ROOT, check=True)
    print(f"[run_all] {name} finished in {time.perf_counter() - t0:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
