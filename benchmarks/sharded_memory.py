"""Peak memory of a training step: DDP + NeuroOptima against ShardedNeuroOptima on 2, 3, 4 ranks.

    python benchmarks/sharded_memory.py            # 16M parameters (64 MB), N = 2, 3, 4
    python benchmarks/sharded_memory.py --quick    # 1M parameters, N = 2 (seconds; CI)

Each (candidate, N) runs in its own ``torchrun`` job, so one candidate's freed memory cannot
hide another's peak. Every rank measures its resident memory (``VmRSS``) once the process group
is up, builds the model and the optimizer, trains two warm-up steps (the optimizer state now
exists), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and trains three more
steps: forward, backward, step. The figure per rank is the peak (``VmHWM``) minus that first
reading, so it holds the weights, gradients, communication buffers, optimizer state and every
transient of a step. Large allocations are mmap-ed (``MALLOC_MMAP_THRESHOLD_``) so freed tensors
leave the resident set at once.

Both candidates use the same model, batches and NeuroOptima settings (Adan with Lookahead, SAM
off: 20 bytes of state per parameter). The theoretical saving of sharding is the state that a
rank no longer holds, ``state x (N - 1) / N``; the result is measured saving / theory, per N.

Output: ``benchmarks/results/sharded_memory.json`` (records per candidate and N, per rank),
``sharded_memory.md`` (table) and ``sharded_memory.png`` (plot), unless ``--out-dir`` says
otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from memory import _rss_kib  # noqa: E402  (benchmarks/ is the script's folder)

RESULTS = Path(__file__).resolve().parent / "results"
CANDIDATES = ("ddp", "sharded")
STATE_BYTES_PER_PARAM = 20  # Adan's four buffers + Lookahead's slow weights, float32


# ------------------------------------------------------------------ one torchrun job


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from neurooptima import NeuroOptima
    from neurooptima.distributed import ShardedNeuroOptima

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    start = _rss_kib("VmRSS")
    torch.manual_seed(0)
    width = args.width
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(args.layers)])
    params = sum(p.numel() for p in model.parameters())
    hyper = dict(lr=1e-4, weight_decay=0.01, sam_rho=0.0, lookahead_k=5, update="adan")
    if args.candidate == "ddp":
        net = nn.parallel.DistributedDataParallel(model)
        optimizer = NeuroOptima(net.parameters(), **hyper)
    else:
        net = model
        optimizer = ShardedNeuroOptima(model.parameters(), **hyper)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, width, generator=gen)
    y = torch.randn(args.batch, width, generator=gen)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)  # gradients live between steps, as usual
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()

    for _ in range(2):
        step()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark
    for _ in range(3):
        step()
    peak = (_rss_kib("VmHWM") - start) * 1024
    everyone = [None] * world
    dist.all_gather_object(everyone, {"rank": rank, "peak_bytes": peak})
    if rank == 0:
        Path(args.record).write_text(json.dumps({
            "candidate": args.candidate, "world_size": world, "params": params,
            "model_bytes": params * 4, "ranks": everyone}))
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


# ------------------------------------------------------------------ orchestration


def run_job(candidate: str, world: int, sizes: dict, scratch: Path) -> dict:
    record = scratch / f"{candidate}-{world}.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={world}", __file__, "--worker",
           "--candidate", candidate, "--record", str(record),
           "--width", str(sizes["width"]), "--layers", str(sizes["layers"]),
           "--batch", str(sizes["batch"])]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}"
                           f"{result.stderr[-3000:]}")
    return json.loads(record.read_text())


def summarize(records: list[dict]) -> list[dict]:
    """Per N: the largest per-rank peak of each candidate, the saving and its ratio to theory."""
    rows = []
    for world in sorted({r["world_size"] for r in records}):
        peaks = {r["candidate"]: max(x["peak_bytes"] for x in r["ranks"])
                 for r in records if r["world_size"] == world}
        params = next(r["params"] for r in records if r["world_size"] == world)
        theory = STATE_BYTES_PER_PARAM * params * (world - 1) / world
        saving = peaks["ddp"] - peaks["sharded"]
        rows.append({"world_size": world, "params": params,
                     "ddp_peak_bytes": peaks["ddp"], "sharded_peak_bytes": peaks["sharded"],
                     "saving_bytes": saving, "theory_bytes": theory,
                     "saving_to_theory": saving / theory,
                     "ddp_bytes_per_param": peaks["ddp"] / params,
                     "sharded_bytes_per_param": peaks["sharded"] / params})
    return rows


def render(rows: list[dict], out_dir: Path) -> None:
    lines = ["# Peak memory of a training step: DDP + NeuroOptima vs ShardedNeuroOptima", "",
             "Generated by `python benchmarks/sharded_memory.py` (see its docstring for the "
             "method). Peak resident memory per rank (largest rank), model of "
             f"{rows[0]['params'] / 1e6:.1f}M float32 parameters, Adan + Lookahead "
             f"({STATE_BYTES_PER_PARAM} bytes of state per parameter).", "",
             "| ranks | DDP + NeuroOptima | ShardedNeuroOptima | saving | theory: state x (N-1)/N "
             "| saving / theory |", "|---|---|---|---|---|---|"]
    mb = 2 ** 20
    for r in rows:
        lines.append(f"| {r['world_size']} | {r['ddp_peak_bytes'] / mb:.0f} MiB "
                     f"({r['ddp_bytes_per_param']:.1f} B/param) | "
                     f"{r['sharded_peak_bytes'] / mb:.0f} MiB "
                     f"({r['sharded_bytes_per_param']:.1f} B/param) | "
                     f"{r['saving_bytes'] / mb:.0f} MiB | {r['theory_bytes'] / mb:.0f} MiB | "
                     f"{100 * r['saving_to_theory']:.0f} % |")
    (out_dir / "sharded_memory.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    worlds = [r["world_size"] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["ddp_peak_bytes"] / mb for r in rows], 0.4,
           label="DDP + NeuroOptima")
    ax.bar([x + 0.2 for x in xs], [r["sharded_peak_bytes"] / mb for r in rows], 0.4,
           label="ShardedNeuroOptima")
    ax.plot([x + 0.2 for x in xs], [(r["ddp_peak_bytes"] - r["theory_bytes"]) / mb
                                    for r in rows], "k_", markersize=22,
            label="DDP peak - state x (N-1)/N")
    ax.set_xticks(list(xs), [f"N = {w}" for w in worlds])
    ax.set_ylabel("peak memory per rank (MiB)")
    ax.set_title("Peak memory of a training step")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_dir / "sharded_memory.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M parameters, N = 2")
    parser.add_argument("--worlds", type=int, nargs="+", default=None)
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="default: benchmarks/results (a temporary folder with --quick)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--candidate", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    sizes = ({"width": 512, "layers": 4, "batch": 16} if args.quick
             else {"width": 2048, "layers": 4, "batch": 16})
    worlds = args.worlds or ([2] if args.quick else [2, 3, 4])
    if any(w < 2 for w in worlds):
        parser.error("--worlds: each world size must be >= 2")
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="sharded-memory-")) if args.quick
                               else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    records = []
    with tempfile.TemporaryDirectory() as scratch:
        jobs = [(c, w) for w in worlds for c in CANDIDATES]
        for candidate, world in tqdm(jobs, desc="jobs"):
            records.append(run_job(candidate, world, sizes, Path(scratch)))
    rows = summarize(records)
    (out_dir / "sharded_memory.json").write_text(json.dumps({
        "meta": {"machine": platform.machine(), "python": platform.python_version(),
                 "sizes": sizes, "state_bytes_per_param": STATE_BYTES_PER_PARAM,
                 "command": "python benchmarks/sharded_memory.py"
                            + (" --quick" if args.quick else "")},
        "records": records, "summary": rows}, indent=1))
    render(rows, out_dir)
    print((out_dir / "sharded_memory.md").read_text())
    print(f"written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
