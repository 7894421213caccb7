"""Step speed: one optimizer step of NeuroOptima's rules against torch AdamW and pytorch-optimizer.

    python benchmarks/step_speed.py --quick     # 1M and 10M parameters, few repeats (minutes)
    python benchmarks/step_speed.py             # 1M, 10M and 100M parameters

Every size is split into 100 float32 tensors (10M in 100 tensors is the headline case). Only the
update is timed: gradients are set once and stay (as with ``zero_grad(set_to_none=False)``),
NeuroOptima runs with SAM and Lookahead off (``sam_rho=0, lookahead_k=0``) so each rule's step
is compared with the other optimizers' steps. The candidate ``fused_fresh_grads`` hands the
fused step new gradient tensors every step (the ``set_to_none=True`` case), so it includes the
copy of the gradients into the flat layout.

The machine is shared, so timings are noisy: candidates are measured in rounds, each round
visits every candidate in a rotated order (build, two untimed warm-up steps, then timed steps),
and the reported time is the median over all timed steps of all rounds. The ratio to fused
AdamW uses the fused AdamW median of the same size in the same run.

Output (JSON, default ``benchmarks/results/step_speed.json``): ``{"meta": {...}, "records":
[...]}`` with one record per (size, candidate):

    size_label       str    "1M", "10M", "100M"
    params           int    number of parameters
    tensors          int    number of parameter tensors
    dtype            str    parameter dtype ("float32")
    optimizer        str    "neurooptima", "torch.AdamW", "pytorch_optimizer.Adan", ...
    rule             str    update rule: "adan", "lion", "lion_adan", "adamw"
    implementation   str    "for_loop", "foreach", "fused", "fused_fresh_grads",
                            "fused_checked" (torch AdamW fused, skipping steps with
                            non-finite gradients as NeuroOptima does),
                            "fused_bf16_state", "default" (the library's own choice),
                            "fused_update_pass" (the compiled update pass alone, without
                            the gradient check and the step's bookkeeping)
    label            str    short display name, e.g. "NeuroOptima adan fused"
    time_ms          float  median step time, milliseconds
    time_ms_min      float  fastest step, milliseconds
    time_ms_q1, time_ms_q3  float  quartiles of the step time, milliseconds
    samples          int    number of timed steps behind the statistics
    bytes_per_param  int    bytes the rule must read and write per parameter and step
                            (e.g. AdamW 28, Adan 44, Lion 20, Lion-Adan 36 in float32)
    gb_per_s         float  params * bytes_per_param / time_ms, in GB/s (1e9 bytes)
    ratio_to_fused_adamw  float  time_ms / time_ms of torch.AdamW fused, same size, same run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from neurooptima import RULE_BUFFERS, NeuroOptima
from neurooptima.fused import flat_view, fused_rule_

RESULTS = Path(__file__).resolve().parent / "results" / "step_speed.json"
SIZES = {"1M": 1_000_000, "10M": 10_000_000, "100M": 100_000_000}
TENSORS = 100

# Bytes read + written per parameter and step: the parameter, the gradient (read only) and
# every state buffer (read and written). Float32 unless the candidate says otherwise.
_F32 = 4


def _bytes_per_param(rule: str, state_bytes: int = _F32) -> int:
    buffers = {"adamw": 2, "adan": 4, "lion": 1, "lion_adan": 3}[rule]
    return 2 * _F32 + _F32 + 2 * buffers * state_bytes  # w read+write, g read, buffers r+w


@dataclass
class Candidate:
    label: str
    optimizer: str
    rule: str
    implementation: str
    build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    bytes_per_param: int
    fresh_grads: bool = False


def candidates() -> list[Candidate]:
    import pytorch_optimizer as po

    out = [
        Candidate("torch AdamW foreach", "torch.AdamW", "adamw", "foreach",
                  lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True),
                  _bytes_per_param("adamw")),
        Candidate("torch AdamW fused", "torch.AdamW", "adamw", "fused",
                  lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
                  _bytes_per_param("adamw")),
        Candidate("torch AdamW fused + finite check", "torch.AdamW", "adamw",
                  "fused_checked", _CheckedAdamW, _bytes_per_param("adamw")),
        Candidate("pytorch_optimizer Adan", "pytorch_optimizer.Adan", "adan", "default",
                  lambda ps: po.Adan(ps, lr=1e-3, weight_decay=0.01), _bytes_per_param("adan")),
        Candidate("pytorch_optimizer Adan foreach", "pytorch_optimizer.Adan", "adan", "foreach",
                  lambda ps: po.Adan(ps, lr=1e-3, weight_decay=0.01, foreach=True),
                  _bytes_per_param("adan")),
        Candidate("pytorch_optimizer Lion", "pytorch_optimizer.Lion", "lion", "default",
                  lambda ps: po.Lion(ps, lr=1e-4, weight_decay=0.01), _bytes_per_param("lion")),
        Candidate("pytorch_optimizer Lion foreach", "pytorch_optimizer.Lion", "lion", "foreach",
                  lambda ps: po.Lion(ps, lr=1e-4, weight_decay=0.01, foreach=True),
                  _bytes_per_param("lion")),
    ]
    impls = {"for_loop": dict(foreach=False), "foreach": dict(foreach=True),
             "fused": dict(fused=True)}
    for rule in ("adan", "lion", "lion_adan"):
        for impl, kw in impls.items():
            out.append(Candidate(
                f"NeuroOptima {rule} {impl}", "neurooptima", rule, impl,
                lambda ps, rule=rule, kw=kw: NeuroOptima(ps, lr=1e-4, weight_decay=0.01,
                                                         sam_rho=0.0, lookahead_k=0,
                                                         update=rule, **kw),
                _bytes_per_param(rule)))
    for rule in ("adan", "lion"):
        out.append(Candidate(
            f"NeuroOptima {rule} fused, update pass only", "neurooptima", rule,
            "fused_update_pass", lambda ps, rule=rule: _UpdatePassOnly(ps, rule),
            _bytes_per_param(rule)))
    out.append(Candidate(
        "NeuroOptima adan fused, fresh grads", "neurooptima", "adan", "fused_fresh_grads",
        lambda ps: NeuroOptima(ps, lr=1e-4, weight_decay=0.01, sam_rho=0.0, lookahead_k=0,
                               fused=True), _bytes_per_param("adan"), fresh_grads=True))
    out.append(Candidate(
        "NeuroOptima adan fused, bf16 state", "neurooptima", "adan", "fused_bf16_state",
        lambda ps: NeuroOptima(ps, lr=1e-4, weight_decay=0.01, sam_rho=0.0, lookahead_k=0,
                               fused=True, state_dtype=torch.bfloat16),
        _bytes_per_param("adan", state_bytes=2)))
    return out


class _CheckedAdamW:
    """Fused AdamW that skips any step with a non-finite gradient, as every NeuroOptima step does.

    torch's fused AdamW does not look at the gradients' values; this is it with the same
    guarantee, checked the way ``torch.nn.utils.clip_grad_norm_`` finds non-finite gradients (a
    foreach norm, one read of the gradients), for a like-for-like comparison.
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)

    def step(self) -> None:
        norms = torch._foreach_norm([p.grad for p in self.params], 2.0)
        if bool(torch.stack(norms).isfinite().all()):
            self.opt.step()


class _UpdatePassOnly:
    """The compiled update pass of ``fused=True`` alone, on the optimizer's own flat buffers.

    A fused ``step()`` is this pass plus the gradient check (one read of the gradients, so that
    non-finite gradients never reach the weights) and the per-step bookkeeping in Python;
    timing the pass alone shows how close the kernel itself is to memory bandwidth.
    """

    def __init__(self, params: list[torch.nn.Parameter], rule: str) -> None:
        self.opt = NeuroOptima(params, lr=1e-4, weight_decay=0.01, sam_rho=0.0, lookahead_k=0,
                               update=rule, fused=True)
        self.opt.step()  # lays parameters, gradients and buffers out flat
        state = [self.opt.state[p] for p in params]
        self.rule = rule
        self.flat_p = flat_view(params)
        self.flat_g = flat_view([p.grad for p in params])
        self.flat_bufs = [flat_view([s[f"{rule}.{name}"] for s in state])
                          for name in RULE_BUFFERS[rule]]
        if self.flat_p is None or self.flat_g is None or None in self.flat_bufs:
            raise RuntimeError("the fused step did not lay the buffers out flat")
        self.group = self.opt.param_groups[0]
        self.k = 1

    def step(self) -> None:
        self.k += 1
        g = self.group
        fused_rule_(self.rule, self.flat_p, self.flat_g, self.flat_bufs, self.k, lr=g["lr"],
                    betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"],
                    no_prox=g["no_prox"])


def _model(numel: int, tensors: int, seed: int = 0) -> tuple[list[torch.nn.Parameter],
                                                            list[list[torch.Tensor]]]:
    """Parameters with gradients, plus two spare gradient sets for the fresh-grads case."""
    gen = torch.Generator().manual_seed(seed)
    per = numel // tensors
    params = [torch.nn.Parameter(torch.randn(per, generator=gen) * 0.02) for _ in range(tensors)]
    spares = [[torch.randn(per, generator=gen) * 1e-3 for _ in range(tensors)] for _ in range(2)]
    for p, g in zip(params, spares[0]):
        p.grad = g.clone()
    return params, spares


def _time_candidate(cand: Candidate, params, spares, steps: int) -> list[float]:
    opt = cand.build(params)
    flip = 0

    def one_step() -> float:
        nonlocal flip
        if cand.fresh_grads:
            flip ^= 1
            for p, g in zip(params, spares[flip]):
                p.grad = g  # a gradient that is not yet in the flat layout
        start = time.perf_counter()
        opt.step()
        return time.perf_counter() - start

    for _ in range(2):  # warm-up: state, compilation, then the flat layout's steady state
        one_step()
    times = [one_step() for _ in range(steps)]
    del opt
    gc.collect()
    for p, g in zip(params, spares[0]):
        p.grad = g.clone()
    return times


def run(sizes: list[str], rounds: int, steps: int, only: str | None = None) -> dict:
    cands = [c for c in candidates() if only is None or only in c.label]
    records = []
    total = len(sizes) * rounds * len(cands)
    with tqdm(total=total, desc="step speed", unit="step-set") as bar:
        for size in sizes:
            numel = SIZES[size]
            params, spares = _model(numel, TENSORS)
            samples: dict[str, list[float]] = {c.label: [] for c in cands}
            for r in range(rounds):
                order = cands[r % len(cands):] + cands[:r % len(cands)]
                for cand in order:
                    bar.set_postfix_str(f"{size} {cand.label}")
                    samples[cand.label] += _time_candidate(cand, params, spares, steps)
                    bar.update()
            ref = statistics.median(samples["torch AdamW fused"]) if (
                samples.get("torch AdamW fused")) else None
            for cand in cands:
                ts = sorted(samples[cand.label])
                med = statistics.median(ts)
                q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [med, med, med]
                records.append(dict(
                    size_label=size, params=numel, tensors=TENSORS, dtype="float32",
                    optimizer=cand.optimizer, rule=cand.rule,
                    implementation=cand.implementation, label=cand.label,
                    time_ms=med * 1e3, time_ms_min=ts[0] * 1e3, time_ms_q1=q[0] * 1e3,
                    time_ms_q3=q[2] * 1e3, samples=len(ts),
                    bytes_per_param=cand.bytes_per_param,
                    gb_per_s=numel * cand.bytes_per_param / med / 1e9,
                    ratio_to_fused_adamw=(med / ref) if ref else None))
            del params, spares
            gc.collect()
    return dict(records=records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M and 10M only, few repeats")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), help="override the sizes")
    parser.add_argument("--rounds", type=int, help="rounds over all candidates per size")
    parser.add_argument("--steps", type=int, help="timed steps per candidate and round")
    parser.add_argument("--only", help="keep candidates whose label contains this text")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args(argv)
    sizes = args.sizes or (["1M", "10M"] if args.quick else list(SIZES))
    rounds = args.rounds or (3 if args.quick else 5)
    steps = args.steps or (2 if args.quick else 3)
    started = time.time()
    result = run(sizes, rounds, steps, args.only)
    result["meta"] = dict(
        mode="quick" if args.quick else "full", sizes=sizes, rounds=rounds,
        steps_per_round=steps, tensors_per_size=TENSORS, torch=torch.__version__,
        threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
        machine=platform.machine(), python=platform.python_version(),
        load_average=os.getloadavg(), wall_s=round(time.time() - started, 1),
        command="python benchmarks/step_speed.py " + " ".join(sys.argv[1:] if argv is None
                                                             else argv),
        time_unit="ms", bandwidth_unit="GB/s (1e9 bytes)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for rec in result["records"]:
        ratio = rec["ratio_to_fused_adamw"]
        print(f"{rec['size_label']:>5} {rec['label']:<40} {rec['time_ms']:9.2f} ms "
              f"{rec['gb_per_s']:7.2f} GB/s  x{ratio:.2f} fused AdamW" if ratio is not None
              else f"{rec['size_label']:>5} {rec['label']:<40} {rec['time_ms']:9.2f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
