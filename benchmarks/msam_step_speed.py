"""What momentum ascent adds to a step: each rule's fused step with and without it, same run.

    python benchmarks/msam_step_speed.py             # 10M float32 parameters in 100 tensors
    python benchmarks/msam_step_speed.py --quick     # 1M, for a smoke run

Only the optimizer step is timed (gradients set once and kept, as with
``zero_grad(set_to_none=False)``); SAM's other form and Lookahead are off. For every rule the
two candidates, ``NeuroOptima(fused=True)`` and the same with ``sam_ascent="momentum",
sam_rho=2``, are measured in alternating rounds (build, two untimed warm-up steps, timed
steps), and the ratio is of their medians over all rounds. The machine may be shared, so the
rounds interleave the candidates rather than run one after the other.

Writes ``benchmarks/results/msam_step_speed.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from neurooptima import NeuroOptima

RESULTS = Path(__file__).resolve().parent / "results"
RULES = ("adan", "lion", "lion_adan")
TENSORS = 100


def _params(numel: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    per = numel // TENSORS
    params = [torch.nn.Parameter(torch.randn(per, generator=gen) * 0.1) for _ in range(TENSORS)]
    for p in params:
        p.grad = torch.randn(per, generator=gen) * 1e-2
    return params


def _time(rule: str, ascent: bool, numel: int, steps: int) -> list[float]:
    params = _params(numel)
    extra = dict(sam_ascent="momentum", sam_rho=2.0) if ascent else {}
    optimizer = NeuroOptima(params, update=rule, fused=True, **extra)
    for _ in range(2):
        optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M parameters, 2 rounds")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (>= 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (>= 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (>= 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "msam_step_speed.json")
    args = parser.parse_args(argv)
    for name in ("rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    numel = 1_000_000 if args.quick else 10_000_000
    rounds = 2 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    samples: dict[tuple[str, bool], list[float]] = {(r, a): [] for r in RULES for a in (0, 1)}
    order = list(samples)
    for i in tqdm(range(rounds), desc="rounds"):
        rotated = order[i % len(order):] + order[:i % len(order)]
        for rule, ascent in rotated:
            samples[(rule, ascent)] += _time(rule, bool(ascent), numel, args.steps)
    records = []
    print(f"{numel / 1e6:g}M float32 parameters in {TENSORS} tensors, fused, "
          f"{args.threads} thread(s), median of {rounds} x {args.steps} steps")
    print(f"{'rule':<10} {'plain ms':>9} {'momentum ascent ms':>19} {'ratio':>6}")
    for rule in RULES:
        plain = statistics.median(samples[(rule, 0)])
        msam = statistics.median(samples[(rule, 1)])
        records.append(dict(rule=rule, params=numel, plain_ms=plain, momentum_ascent_ms=msam,
                            ratio=msam / plain, samples=len(samples[(rule, 1)])))
        print(f"{rule:<10} {plain:>9.2f} {msam:>19.2f} {msam / plain:>6.3f}")
    meta = dict(torch=torch.__version__, machine=platform.machine(), threads=args.threads,
                rounds=rounds, steps=args.steps, tensors=TENSORS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
