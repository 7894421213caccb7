"""Memory: optimizer-state bytes per parameter for each configuration, and peak memory of a step.

    python benchmarks/memory.py --quick     # 1M parameters, peak only for a subset (minutes)
    python benchmarks/memory.py             # 10M parameters, every configuration

Configurations: update rule x SAM (on/off) x Lookahead (on/off) x state dtype (float32 /
bfloat16), float32 parameters in 100 tensors, plus torch AdamW for reference.

How it is measured:
* State bytes: every tensor in ``optimizer.state`` except the step counters, each storage
  counted once (fused steps keep buffers as views of one flat tensor), divided by the number of
  parameters. ``sam_bytes_per_param`` is what SAM holds only between its two passes (measured
  after ``first_step()``), ``total_bytes_per_param`` their sum: the budget a step needs. Step
  counters (one float32 per tensor) are reported separately as ``step_counter_bytes``.
* Peak of a step: each configuration runs in a fresh process with glibc's mmap threshold at
  64 KiB, so every large temporary is its own mapping and is returned when freed. Before each
  optimizer call (``first_step()``, ``second_step()`` or ``step()``) the kernel's peak-RSS
  mark is reset (``/proc/self/clear_refs``), and afterwards the peak (``VmHWM``) minus the
  resident size before the call is the call's extra memory; the record keeps the larger of the
  calls, per parameter, after one warm-up step (state already exists). This counts the
  temporaries of the kernels and SAM's buffer, not the state that already existed.
* SAM restore: with full-precision state SAM keeps a copy of ``w`` and restores it bitwise;
  with bfloat16 state it keeps ``e`` in bfloat16 and restores ``(w + e) - e``. The
  ``sam_restore`` records give, on an MLP for the sklearn digits data, the fraction of weights
  that the subtraction does not restore bitwise and the largest error in units of the
  weight's last place, for both choices of ``e`` (float32 ``e``: what a copy-free float32 SAM
  would get; bfloat16 ``e``: what NeuroOptima does with bfloat16 state).

Output (JSON, default ``benchmarks/results/memory.json``): ``{"meta", "records",
"sam_restore"}``. Each of ``records``:

    optimizer              str    "neurooptima" or "torch.AdamW"
    rule                   str    "adan", "lion", "lion_adan", "adamw"
    sam, lookahead         bool   component on
    state_dtype            str    "float32" or "bfloat16"
    implementation         str    "foreach" or "fused" (the peak depends on it, state does not)
    params, tensors        int    parameter count, tensor count
    state_bytes_per_param  float  persistent state, bytes per parameter
    sam_bytes_per_param    float  SAM's buffer between the passes, bytes per parameter
    total_bytes_per_param  float  state_bytes_per_param + sam_bytes_per_param
    step_counter_bytes     int    bytes of the per-tensor step counters (not per parameter)
    peak_step_bytes_per_param  float|null  peak extra memory of an optimizer call, bytes per
                                           parameter (null: not measured in this mode)

Each of ``sam_restore``: ``perturbation_dtype`` (str), ``rho`` (float), ``params`` (int),
``inexact_fraction`` (float, share of weights not restored bitwise), ``max_error_ulps`` (float,
largest |restored - w| in units of ulp(w)), ``max_error_rel`` (float, largest |restored - w| /
|w| over nonzero w).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from neurooptima import NeuroOptima, UPDATE_RULES

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
TENSORS = 100


def _params(numel: int, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(numel // TENSORS, generator=gen) * 0.02)
            for _ in range(TENSORS)]


def _set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3


def _build(params, cfg):
    if cfg["optimizer"] == "torch.AdamW":
        return torch.optim.AdamW(params, lr=1e-3, foreach=cfg["implementation"] == "foreach",
                                 fused=cfg["implementation"] == "fused" or None)
    return NeuroOptima(
        params, lr=1e-4, update=cfg["rule"], sam_rho=0.05 if cfg["sam"] else 0.0,
        lookahead_k=5 if cfg["lookahead"] else 0,
        state_dtype=torch.bfloat16 if cfg["state_dtype"] == "bfloat16" else None,
        **({"fused": True} if cfg["implementation"] == "fused" else {"foreach": True}))


def _state_bytes(opt) -> tuple[int, int]:
    storages: dict[int, int] = {}
    steps = 0
    for state in opt.state.values():
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            if key == "step":
                steps += value.untyped_storage().nbytes()
            else:
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()), steps


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_of(call) -> int:
    """Extra resident bytes at the peak of ``call()`` over the resident size before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark
    before = _rss_kib("VmRSS")
    call()
    return (_rss_kib("VmHWM") - before) * 1024


def _one_step(opt, params, seed, sam, peaks=None):
    """One step through the two-phase API (gradients are synthetic); optional peak probes."""
    def run(fn):
        if peaks is None:
            fn()
        else:
            peaks.append(_peak_of(fn))

    _set_grads(params, seed)
    if sam:
        run(opt.first_step)
        between = _state_bytes(opt)[0]
        _set_grads(params, seed + 1)
        run(opt.second_step)
        return between
    run(opt.step)
    return None


def measure(cfg: dict, numel: int, peak: bool) -> dict:
    """State bytes and (optionally) the peak extra memory of one configuration."""
    torch.manual_seed(0)
    params = _params(numel)
    opt = _build(params, cfg)
    sam = cfg["sam"]
    _one_step(opt, params, 1, sam)  # state exists from here on
    peaks: list[int] = []
    between = _one_step(opt, params, 3, sam, peaks if peak else None)
    state, steps = _state_bytes(opt)
    sam_bytes = (between - state) if sam else 0
    return dict(cfg, params=numel, tensors=TENSORS, state_bytes_per_param=state / numel,
                sam_bytes_per_param=sam_bytes / numel,
                total_bytes_per_param=(state + sam_bytes) / numel, step_counter_bytes=steps,
                peak_step_bytes_per_param=(max(peaks) / numel) if peak else None)


def sam_restore_records(rho: float = 0.05) -> list[dict]:
    """How far ``(w + e) - e`` lands from ``w`` on a freshly initialised digits MLP."""
    from sklearn.datasets import load_digits

    from neurooptima.norms import local_norm_stats, norm_from_stats
    from neurooptima.sam import NORM_EPS, perturbation

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    torch.nn.functional.cross_entropy(model(x[:256]), y[:256]).backward()
    params = [p for p in model.parameters()]
    grads = [p.grad for p in params]
    norm, _ = norm_from_stats(local_norm_stats(grads))
    scale = rho / (norm + NORM_EPS)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        inexact, total, worst_ulps, worst_rel = 0, 0, 0.0, 0.0
        for p, g in zip(params, grads):
            w = p.detach()
            e = perturbation(w, g, scale=scale, adaptive=False, eta=0.0).to(dtype)
            restored = (w + e) - e
            err = (restored - w).abs()
            ulp = torch.finfo(torch.float32).eps * w.abs().clamp_min(
                torch.finfo(torch.float32).tiny)
            inexact += int((restored != w).sum())
            total += w.numel()
            worst_ulps = max(worst_ulps, float((err / ulp).max()))
            nonzero = w != 0
            if nonzero.any():
                worst_rel = max(worst_rel, float((err[nonzero] / w[nonzero].abs()).max()))
        out.append(dict(perturbation_dtype=str(dtype).removeprefix("torch."), rho=rho,
                        params=total, inexact_fraction=inexact / total,
                        max_error_ulps=worst_ulps, max_error_rel=worst_rel))
    return out


def configurations(quick: bool) -> list[tuple[dict, bool]]:
    """(configuration, measure peak?) pairs."""
    out = []
    for impl in ("foreach", "fused"):
        out.append((dict(optimizer="torch.AdamW", rule="adamw", sam=False, lookahead=False,
                         state_dtype="float32", implementation=impl), True))
    for rule, sam, la, sd in itertools.product(UPDATE_RULES, (False, True), (False, True),
                                               ("float32", "bfloat16")):
        for impl in ("foreach", "fused"):
            cfg = dict(optimizer="neurooptima", rule=rule, sam=sam, lookahead=la,
                       state_dtype=sd, implementation=impl)
            # Quick mode: peaks for the full adan configuration only (compiles are slow).
            peak = not quick or (rule == "adan" and sam and la)
            if impl == "fused" and not peak:
                continue  # state bytes do not depend on the implementation
            out.append((cfg, peak))
    return out


def _child(cfg_json: str, numel: int, peak: bool) -> None:
    torch.set_num_threads(1)
    print(json.dumps(measure(json.loads(cfg_json), numel, peak)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M parameters, fewer peaks")
    parser.add_argument("--params", type=int, help="override the parameter count")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    numel = args.params or (1_000_000 if args.quick else 10_000_000)
    if args.child:
        _child(args.child, numel, args.peak)
        return
    started = time.time()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    records = []
    for cfg, peak in tqdm(configurations(args.quick), desc="memory", unit="config"):
        cmd = [sys.executable, __file__, "--child", json.dumps(cfg), "--params", str(numel)]
        if peak:
            cmd.append("--peak")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe failed for {cfg}:\n{done.stderr[-3000:]}")
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = dict(
        meta=dict(mode="quick" if args.quick else "full", params=numel, tensors=TENSORS,
                  torch=torch.__version__, wall_s=round(time.time() - started, 1),
                  command="python benchmarks/memory.py " + " ".join(
                      sys.argv[1:] if argv is None else argv),
                  bytes_unit="bytes per parameter",
                  peak_method="fresh process, MALLOC_MMAP_THRESHOLD_=65536, VmHWM after "
                              "clear_refs minus VmRSS before each optimizer call"),
        records=records, sam_restore=sam_restore_records())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in records:
        peak = r["peak_step_bytes_per_param"]
        print(f"{r['optimizer']:<12} {r['rule']:<9} sam={r['sam']!s:<5} la={r['lookahead']!s:<5} "
              f"{r['state_dtype']:<8} {r['implementation']:<7} state+sam "
              f"{r['total_bytes_per_param']:6.2f} B/param  peak "
              + (f"{peak:6.2f} B/param" if peak is not None else "-"))
    for r in result["sam_restore"]:
        print(f"SAM restore with {r['perturbation_dtype']} e: {r['inexact_fraction']:.4%} not "
              f"bitwise, worst {r['max_error_ulps']:.2f} ulp")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
