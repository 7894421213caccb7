"""Step speed of this tree against an earlier revision, measured in the same run.

    python benchmarks/step_speed_vs_revision.py --against d2b4f1e
    python benchmarks/step_speed_vs_revision.py --against HEAD~5 --sizes 1M --rules lion --rounds 3

The revision is exported with ``git archive`` into a temporary folder; each round runs one
worker process per tree, alternating which goes first, so a busy machine disturbs both sides
alike. A worker imports ``neurooptima`` from its tree and times ``NeuroOptima.step()`` on
100 float32 tensors per size (fused, SAM and Lookahead off, gradients set once and kept, as
in ``step_speed.py``), one thread. Reported per (size, rule): the fastest step and the median
of every timed step of every round, for both trees, and the ratio this tree / revision
(below 1: this tree is faster).

Output: a table on stdout and JSON (default ``benchmarks/results/step_speed_vs_revision.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"1M": 1_000_000, "10M": 10_000_000, "100M": 100_000_000}
TENSORS = 100


def _worker(tree: str, sizes: list[str], rules: list[str], steps: int) -> None:
    """Time the step of the tree at ``tree``; prints one JSON object of step times (ms)."""
    sys.path.insert(0, tree)
    import torch

    import neurooptima
    from neurooptima import NeuroOptima

    if not Path(neurooptima.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise RuntimeError(f"neurooptima was imported from {neurooptima.__file__}, not {tree}")
    torch.set_num_threads(1)
    out = {}
    for size in sizes:
        numel = SIZES[size]
        for rule in rules:
            gen = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(numel // TENSORS, generator=gen) * 0.02)
                      for _ in range(TENSORS)]
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            opt = NeuroOptima(params, lr=1e-4, weight_decay=0.01, sam_rho=0.0, lookahead_k=0,
                              update=rule, fused=True)
            for _ in range(3):  # compile and lay out
                opt.step()
            times = []
            for _ in range(steps if numel < 5_000_000 else max(steps // 3, 5)):
                start = time.perf_counter()
                opt.step()
                times.append((time.perf_counter() - start) * 1e3)
            out[f"{size} {rule}"] = times
            del opt, params
    print(json.dumps(out))


def _export(revision: str, into: Path) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision],
                             check=True, capture_output=True).stdout
    tar_path = into / "tree.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into / "tree", filter="data")


def _run_worker(tree: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    cmd = [sys.executable, __file__, "--worker", str(tree), "--sizes", *args.sizes,
           "--rules", *args.rules, "--steps", str(args.steps)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="d2b4f1e",
                        help="git revision to compare with (default: %(default)s)")
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M"], choices=list(SIZES))
    parser.add_argument("--rules", nargs="+", default=["adan", "lion"],
                        choices=["adan", "lion", "lion_adan"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per size at 1M")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "step_speed_vs_revision.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.sizes, args.rules, args.steps)
        return
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.against],
                            check=True, capture_output=True, text=True).stdout.strip()
    times: dict[str, dict[str, list[float]]] = {"this tree": {}, commit: {}}
    with tempfile.TemporaryDirectory() as tmp:
        _export(args.against, Path(tmp))
        trees = {"this tree": ROOT, commit: Path(tmp) / "tree"}
        for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for name in order:
                for key, ts in _run_worker(trees[name], args).items():
                    times[name].setdefault(key, []).extend(ts)
    records = []
    print(f"{'case':12s} {'this tree ms (min / median)':>28s} "
          f"{commit + ' ms (min / median)':>28s} {'ratio (median)':>15s}")
    for key in times["this tree"]:
        now, then = times["this tree"][key], times[commit][key]
        rec = {"case": key, "revision": commit, "this_min_ms": min(now),
               "this_median_ms": statistics.median(now),
               "revision_min_ms": min(then), "revision_median_ms": statistics.median(then),
               "ratio_median": statistics.median(now) / statistics.median(then),
               "ratio_min": min(now) / min(then), "samples": len(now)}
        records.append(rec)
        print(f"{key:12s} {rec['this_min_ms']:12.2f} / {rec['this_median_ms']:8.2f}      "
              f"{rec['revision_min_ms']:12.2f} / {rec['revision_median_ms']:8.2f}      "
              f"{rec['ratio_median']:10.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    args.out.write_text(json.dumps({"meta": {"revision": commit, "this_tree_head": head,
                                             "rounds": args.rounds, "threads": 1,
                                             "tensors": TENSORS},
                                    "records": records}, indent=1) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
