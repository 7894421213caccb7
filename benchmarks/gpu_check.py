"""GPU check: everything that needs a CUDA GPU, in one run of a few minutes.

    python benchmarks/gpu_check.py            # or: make gpu-check
    python benchmarks/gpu_check.py --render   # benchmarks/results/gpu.json -> GPU.md

On a machine with one CUDA GPU it runs, in order, each within its own time limit:

1. ``unit``: the unit suite's CUDA half (``pytest tests -k cuda``: every test that takes the
   ``device`` fixture, on cuda);
2. ``distributed``: the multi-rank suite with world size 1 (``torchrun --nproc_per_node=1``):
   CUDA tensors over nccl, CPU tensors over gloo (see ``tests/distributed/conftest.py``);
3. ``step_speed``: one optimizer step at 10M and 100M float32 parameters (100 tensors):
   NeuroOptima fused (adan, lion, lion_adan, adan with bfloat16 state, adan and lion with
   momentum ascent) and
   ``torch.optim.AdamW(fused=True)``, each against a plain device copy of the same number of
   bytes measured in the same run: GB/s = bytes the step must read and write / time, and the
   fraction of the copy's GB/s;
4. ``cuda_graph``: a plain fused step (no SAM) captured once with ``torch.cuda.graph`` and
   replayed 10 times, against 10 eager steps from the same state: largest weight difference
   and time per step;
5. ``digits``: a short training run on cuda (``launch/train.py --device cuda --epochs 2``).

Results go to ``benchmarks/results/gpu.json`` (``--out``) and ``--render`` writes
``benchmarks/results/GPU.md`` from it. Without a CUDA GPU it prints so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
REPORT = ROOT / "benchmarks" / "results" / "GPU.md"
NO_GPU = "no CUDA GPU: nothing to check"
SIZES = {"10M": 10_000_000, "100M": 100_000_000}
TENSORS = 100
# Seconds each part may take; together well under the 8 minutes the check is sized for.
LIMITS = {"unit": 150, "distributed": 90, "digits": 60}


# ------------------------------------------------------------------------ arithmetic


def bytes_per_param(rule: str, state_bytes: int = 4, param_bytes: int = 4) -> int:
    """Bytes a step must move per parameter: the weight read and written, the gradient read,
    every state buffer read and written (as benchmarks/step_speed.py counts)."""
    buffers = {"adamw": 2, "adan": 4, "lion": 1, "lion_adan": 3}[rule]
    return 2 * param_bytes + param_bytes + 2 * buffers * state_bytes


def gb_per_s(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def speed_record(label: str, params: int, nbytes_per_param: int, step_s: float,
                 copy_s: float) -> dict[str, Any]:
    """One step-speed row: the step's and the same-bytes copy's GB/s, and their ratio.

    The copy reads and writes ``params * nbytes_per_param / 2`` bytes each, so it moves the
    same number of bytes as the step.
    """
    moved = params * nbytes_per_param
    step_bw, copy_bw = gb_per_s(moved, step_s), gb_per_s(moved, copy_s)
    return dict(label=label, params=params, bytes_per_param=nbytes_per_param,
                time_ms=step_s * 1e3, gb_per_s=step_bw, copy_time_ms=copy_s * 1e3,
                copy_gb_per_s=copy_bw, fraction_of_copy=step_bw / copy_bw)


# ------------------------------------------------------------------------ CUDA parts


def _cuda_time(fn: Callable[[], Any], steps: int, warmup: int = 3) -> float:
    """Median seconds per call of ``fn`` on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _copy_seconds(nbytes: int, steps: int) -> float:
    """A device-to-device copy that reads ``nbytes / 2`` and writes ``nbytes / 2``."""
    n = max(1, nbytes // 2 // 4)
    src = torch.ones(n, device="cuda")
    dst = torch.empty_like(src)
    seconds = _cuda_time(lambda: dst.copy_(src), steps)
    del src, dst
    return seconds


def _speed_candidates() -> list[tuple[str, str, int, Callable[[list[torch.Tensor]], Any]]]:
    from neurooptima import NeuroOptima

    def neuro(rule: str, **kw: Any) -> Callable[[list[torch.Tensor]], Any]:
        options = dict(dict(lr=1e-4, weight_decay=0.01, sam_rho=0.0, lookahead_k=0), **kw)
        return lambda ps: NeuroOptima(ps, update=rule, fused=True, **options)

    return [
        ("torch AdamW fused", "adamw", bytes_per_param("adamw"),
         lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True)),
        ("NeuroOptima adan fused", "adan", bytes_per_param("adan"), neuro("adan")),
        ("NeuroOptima lion fused", "lion", bytes_per_param("lion"), neuro("lion")),
        ("NeuroOptima lion_adan fused", "lion_adan", bytes_per_param("lion_adan"),
         neuro("lion_adan")),
        ("NeuroOptima adan fused, bf16 state", "adan", bytes_per_param("adan", state_bytes=2),
         neuro("adan", state_dtype=torch.bfloat16)),
        # Momentum ascent: the kernel's moves are free; the sums read m and g once more.
        ("NeuroOptima adan fused, momentum ascent", "adan", bytes_per_param("adan") + 8,
         neuro("adan", sam_ascent="momentum", sam_rho=2.0)),
        ("NeuroOptima lion fused, momentum ascent", "lion", bytes_per_param("lion") + 8,
         neuro("lion", sam_ascent="momentum", sam_rho=2.0)),
    ]


def step_speed(sizes: list[str], steps: int = 20) -> list[dict[str, Any]]:
    records = []
    for size in sizes:
        numel = SIZES[size]
        for label, rule, nbytes, build in _speed_candidates():
            gen = torch.Generator(device="cuda").manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(numel // TENSORS, device="cuda",
                                                     generator=gen) * 0.02)
                      for _ in range(TENSORS)]
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 1e-3
            opt = build(params)
            step_s = _cuda_time(opt.step, steps)
            del opt, params
            torch.cuda.empty_cache()
            copy_s = _copy_seconds(numel * nbytes, steps)
            record = speed_record(label, numel, nbytes, step_s, copy_s)
            record.update(size_label=size, rule=rule)
            records.append(record)
            print(f"  {size} {label}: {record['time_ms']:.3f} ms, {record['gb_per_s']:.0f} GB/s"
                  f" = {record['fraction_of_copy']:.0%} of copy", flush=True)
    return records


def cuda_graph(replays: int = 10) -> dict[str, Any]:
    """A plain fused step captured once and replayed, against the same steps run eagerly."""
    from neurooptima import NeuroOptima

    def build() -> tuple[torch.nn.Module, NeuroOptima]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(),
                                    torch.nn.Linear(1024, 256)).cuda()
        opt = NeuroOptima(model.parameters(), lr=1e-3, weight_decay=0.01, sam_rho=0.0,
                          lookahead_k=5, max_grad_norm=1.0, fused=True)
        x = torch.randn(64, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        for _ in range(3):  # warm-up: state, flat layout, compiled kernels
            opt.zero_grad(set_to_none=False)
            model(x).square().mean().backward()
            opt.step()
        return model, opt

    eager_model, eager_opt = build()
    graph_model, graph_opt = build()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        eager_opt.step()  # the gradients of the last warm-up step, unchanged
    torch.cuda.synchronize()
    eager_s = (time.perf_counter() - start) / replays
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    graph_s = (time.perf_counter() - start) / replays
    diff = max((a - b).abs().max().item() for a, b in zip(eager_model.parameters(),
                                                            graph_model.parameters()))
    steps = [int(graph_opt.state[p]["step"]) for p in graph_model.parameters()]
    eager_steps = [int(eager_opt.state[p]["step"]) for p in eager_model.parameters()]
    return dict(replays=replays, max_abs_diff=diff, eager_ms=eager_s * 1e3,
                graph_ms=graph_s * 1e3, steps_graph=steps[0], steps_eager=eager_steps[0],
                ok=diff == 0.0 and steps == eager_steps)


def _run(name: str, command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=LIMITS[name], env={**os.environ, **(env or {})})
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    tail = [line for line in out.strip().splitlines() if line.strip()][-3:]
    print(f"  {name}: rc={rc} {tail[-1] if tail else ''}", flush=True)
    return dict(command=" ".join(command), returncode=rc, seconds=time.perf_counter() - start,
                tail=tail, ok=rc == 0)


def run_all(sizes: list[str]) -> dict[str, Any]:
    py = sys.executable
    torchrun = str(Path(py).with_name("torchrun"))
    result: dict[str, Any] = dict(meta=dict(
        device=torch.cuda.get_device_name(0), torch=torch.__version__,
        cuda=torch.version.cuda, python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M:%S")))
    print("1/5 unit suite on cuda", flush=True)
    result["unit"] = _run("unit", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
                                   "--ignore=tests/distributed", "-k", "cuda"])
    print("2/5 distributed suite, world size 1, nccl", flush=True)
    result["distributed"] = _run("distributed", [torchrun, "--standalone", "--nproc_per_node=1",
                                                 "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                 "tests/distributed"])
    print("3/5 step speed", flush=True)
    result["step_speed"] = step_speed(sizes)
    print("4/5 CUDA graph of a plain step", flush=True)
    result["cuda_graph"] = cuda_graph()
    print(f"  {result['cuda_graph']}", flush=True)
    print("5/5 digits on cuda", flush=True)
    result["digits"] = _run("digits", [py, "launch/train.py", "--device", "cuda", "--epochs",
                                       "2", "--no-progress"])
    return result


# ------------------------------------------------------------------------ report


def render(result: dict[str, Any]) -> str:
    """GPU.md from a gpu.json result."""
    meta = result["meta"]
    lines = ["# GPU check", "",
             f"{meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), "
             f"{meta['date']}. Written by `benchmarks/gpu_check.py --render` from "
             "`gpu.json`.", "", "| part | result |", "|---|---|"]
    for part in ("unit", "distributed", "digits"):
        entry = result[part]
        verdict = "passed" if entry["ok"] else f"failed (exit {entry['returncode']})"
        last = entry["tail"][-1] if entry["tail"] else ""
        lines.append(f"| {part} | {verdict}: `{last}` ({entry['seconds']:.0f} s) |")
    graph = result["cuda_graph"]
    lines.append(f"| CUDA graph, {graph['replays']} replays | "
                 f"{'same as eager' if graph['ok'] else 'differs from eager'} "
                 f"(max abs diff {graph['max_abs_diff']:.1e}); {graph['graph_ms']:.3f} ms "
                 f"per replay vs {graph['eager_ms']:.3f} ms eager |")
    lines += ["", "Step speed (float32 parameters in 100 tensors; the copy moves the same "
              "bytes in the same run):", "",
              "| size | optimizer | bytes/param | ms/step | GB/s | copy GB/s | of copy |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["step_speed"]:
        lines.append(f"| {r['size_label']} | {r['label']} | {r['bytes_per_param']} | "
                     f"{r['time_ms']:.3f} | {r['gb_per_s']:.0f} | {r['copy_gb_per_s']:.0f} | "
                     f"{r['fraction_of_copy']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    parser.add_argument("--render", action="store_true",
                        help="write GPU.md from the JSON (--out) and stop")
    parser.add_argument("--report", type=Path, default=REPORT, help="Markdown output path")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    args = parser.parse_args(argv)
    if args.render:
        args.report.write_text(render(json.loads(args.out.read_text())))
        print(f"wrote {args.report}")
        return 0
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    result = run_all(args.sizes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.report.write_text(render(result))
    print(f"wrote {args.out} and {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
