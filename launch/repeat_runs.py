"""Run one launch command many times and count how each run ended.

A launcher that fails one run in ten fails CI one time in ten. This runs the same command N
times (default: the README's two-rank digits run, two epochs) and prints a table of exit codes;
it exits 1 if any run failed, with the tail of each failed run's output.

    python launch/repeat_runs.py --runs 30
    python launch/repeat_runs.py --runs 10 -- --strategy zero --epochs 1
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]


def command(nproc: int, train_args: list[str]) -> list[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", f"--nproc_per_node={nproc}",
            str(ROOT / "launch" / "train.py"), "--no-progress", *train_args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    parser.add_argument("train_args", nargs="*", default=["--epochs", "2"],
                        help="arguments for launch/train.py (after --)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    cmd = command(args.nproc, args.train_args)
    print("command:", " ".join(cmd), flush=True)
    endings: collections.Counter[str] = collections.Counter()
    failures = []
    started = time.time()
    for i in tqdm(range(args.runs), desc="runs", disable=not sys.stderr.isatty()):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                    cwd=ROOT, env=os.environ.copy())
            ending = f"exit {result.returncode}"
            text = result.stdout + result.stderr
        except subprocess.TimeoutExpired as e:
            ending = f"timeout after {args.timeout:g} s"
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
                else (e.stdout or "")
        endings[ending] += 1
        if not sys.stderr.isatty():  # no bar: one line per run, so a log shows progress
            print(f"run {i + 1}/{args.runs}: {ending}", flush=True)
        if ending != "exit 0":
            failures.append((i, ending, text[-3000:]))
    for i, ending, text in failures:
        print(f"--- run {i + 1}: {ending}\n{text}")
    print(f"{args.runs} runs in {time.time() - started:.0f} s: "
          + ", ".join(f"{count} x {ending}" for ending, count in sorted(endings.items())))
    print(f"{args.runs - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
