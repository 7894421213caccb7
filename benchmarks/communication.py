"""Communication per optimizer step and rank, for each strategy and SAM mode, against formulas.

    python benchmarks/communication.py            # 2, 3 and 4 ranks, ~1.3 M parameters
    python benchmarks/communication.py --quick    # smaller model, 2 ranks

Ranks are started with ``torch.multiprocessing`` (gloo on CPU, one thread each). Every
collective is counted with ``neurooptima.distributed.count_communication`` (ring convention of
``comm_accounting``: all-reduce 2 S (N-1)/N, reduce-scatter and all-gather S (N-1)/N per rank);
DDP's all-reduce is counted through a comm hook that reports each bucket before all-reducing it.

| strategy | SAM mode | collectives per step              | formula (S = model bytes)  |
|----------|----------|-----------------------------------|----------------------------|
| ddp      | off      | all-reduce of the gradients       | 2 S (N-1)/N                |
| ddp      | global   | all-reduce in both passes         | 4 S (N-1)/N                |
| ddp      | local    | first pass under ``no_sync()``    | 2 S (N-1)/N                |
| zero     | off      | reduce-scatter + all-gather       | 2 S (N-1)/N                |
| zero     | global   | both passes, plus the 16-byte norm| 4 S (N-1)/N                |
| zero     | local    | second pass only                  | 2 S (N-1)/N                |
| zero 2xM | off      | reduce-scatter + all-gather in the shard group (M ranks), all-reduce of the chunk across the 2 replicas | 2 S (M-1)/M + 2 (S/M) (2-1)/2 |
| zero 2xM | global   | the above in both passes          | twice the above            |
| zero 2xM | local    | second pass only                  | as SAM off                 |

``zero`` is ``ShardedNeuroOptima`` (ZeRO-1/2 style sharded state); ``zero 2xM`` the same on a
hybrid ``(replicate, shard)`` mesh of 2 x M ranks (run for even world sizes >= 4). The formulas count model-sized
traffic only; the measured figures also hold the 16-byte norm all-reduces and, for ``zero`` on an
odd number of ranks, the padding that makes each parameter split into N equal chunks.

Output: ``benchmarks/results/communication.json``, ``{"meta": {...}, "records": [...]}``, one
record per (world size, strategy, SAM mode).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from neurooptima import NeuroOptima
from neurooptima.distributed import ShardedNeuroOptima, count_communication
from neurooptima.distributed.comm_accounting import record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "communication.json"
STRATEGIES = ("ddp", "zero")
HYBRID = "zero 2xM"
SAM_MODES = ("off", "global", "local")
# Model-sized passes per step: a synchronized gradient evaluation moves 2 S (N-1)/N.
PASSES = {"off": 2, "global": 4, "local": 2}
IN_FEATURES, OUT_FEATURES = 64, 10


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    # Uneven shapes on purpose: chunks of 3 ranks need padding.
    return nn.Sequential(nn.Linear(IN_FEATURES, width), nn.GELU(), nn.Linear(width, width + 3),
                         nn.GELU(), nn.Linear(width + 3, OUT_FEATURES))


def _counting_allreduce_hook(state, bucket):
    buffer = bucket.buffer()
    record("all_reduce", buffer.numel() * buffer.element_size(), dist.get_world_size())
    return allreduce_hook(state, bucket)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(16, IN_FEATURES, generator=gen),
            torch.randint(0, OUT_FEATURES, (16,), generator=gen))


def _step(strategy: str, sam_mode: str, model: nn.Module, opt, x, y) -> None:
    loss_fn = nn.functional.cross_entropy
    if strategy == "ddp" and sam_mode == "local":
        # Per-replica SAM: the first gradient stays local, only the second is all-reduced.
        opt.zero_grad()
        with model.no_sync():
            loss_fn(model(x), y).backward()
        opt.first_step()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.second_step()
        return

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)


def _formula(strategy: str, sam_mode: str, model_bytes: int, world: int) -> float:
    if strategy != HYBRID:
        return PASSES[sam_mode] * model_bytes * (world - 1) / world
    shard, replicas = world // 2, 2
    reductions = PASSES[sam_mode] // 2  # gradient reductions (and weight gathers) per step
    per = (2 * model_bytes * (shard - 1) / shard
           + 2 * (model_bytes / shard) * (replicas - 1) / replicas)
    return reductions * per


def _build(strategy: str, sam_mode: str, width: int):
    hyper = dict(lr=1e-3, weight_decay=0.01, sam_rho=0.0 if sam_mode == "off" else 0.05,
                 lookahead_k=5)
    model = make_model(width)
    if strategy == "ddp":
        wrapped = DistributedDataParallel(model)
        wrapped.register_comm_hook(None, _counting_allreduce_hook)
        return wrapped, NeuroOptima(wrapped.parameters(), **hyper)
    mode = "global" if sam_mode == "off" else sam_mode
    if strategy == HYBRID:
        from torch.distributed.device_mesh import DeviceMesh

        world = dist.get_world_size()
        mesh = DeviceMesh("cpu", torch.arange(world).view(2, world // 2),
                          mesh_dim_names=("replicate", "shard"))
        return model, ShardedNeuroOptima(model.parameters(), sam_mode=mode, device_mesh=mesh,
                                         **hyper)
    return model, ShardedNeuroOptima(model.parameters(), sam_mode=mode, **hyper)


def _rank_main(rank: int, world: int, init_file: str, width: int, steps: int,
               out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        records = []
        model_bytes = sum(p.numel() * p.element_size() for p in make_model(width).parameters())
        hybrid = (HYBRID,) if world >= 4 and world % 2 == 0 else ()
        for strategy in STRATEGIES + hybrid:
            for sam_mode in SAM_MODES:
                model, opt = _build(strategy, sam_mode, width)
                x, y = _batch(1000 + rank)
                _step(strategy, sam_mode, model, opt, x, y)  # warm-up: state exists
                with count_communication() as counter:
                    for s in range(steps):
                        x, y = _batch(s * world + rank)
                        _step(strategy, sam_mode, model, opt, x, y)
                if isinstance(opt, ShardedNeuroOptima):
                    opt.remove_hooks()
                by_kind = {k: v / steps for k, v in counter.bytes.items()}
                measured = sum(by_kind.values())
                formula = _formula(strategy, sam_mode, model_bytes, world)
                records.append(dict(
                    world_size=world, strategy=strategy, sam_mode=sam_mode,
                    bytes_by_collective=by_kind,
                    calls_per_step={k: v / steps for k, v in counter.calls.items()},
                    bytes_per_step=measured, bytes_formula=formula,
                    ratio_to_formula=measured / formula, model_bytes=model_bytes))
        if rank == 0:
            Path(out_file).write_text(json.dumps(records))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(world: int, width: int, steps: int) -> list[dict]:
    """Spawn ``world`` gloo ranks and return rank 0's records."""
    with tempfile.TemporaryDirectory(prefix="neurooptima-comm-") as scratch:
        init_file = os.path.join(scratch, "init")
        out_file = os.path.join(scratch, "records.json")
        tmp.spawn(_rank_main, args=(world, init_file, width, steps, out_file), nprocs=world,
                  join=True)
        return json.loads(Path(out_file).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, 2 ranks only")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--width", type=int, default=None, help="hidden width of the MLP")
    parser.add_argument("--steps", type=int, default=3, help="counted steps per configuration")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    worlds = args.world_sizes or ([2] if args.quick else [2, 3, 4])
    width = args.width or (128 if args.quick else 1024)
    if any(w < 2 for w in worlds):
        parser.error(f"--world-sizes must be >= 2, got {worlds}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    records = []
    for world in tqdm(worlds, desc="communication", unit="world size"):
        records += measure(world, width, args.steps)
    meta = dict(command="python benchmarks/communication.py " + " ".join(
                    argv if argv is not None else sys.argv[1:]),
                model_bytes=records[0]["model_bytes"], width=width, steps=args.steps,
                backend="gloo", device="cpu", torch=torch.__version__,
                machine=platform.machine(), host_cpus=os.cpu_count())
    meta["command"] = meta["command"].strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    for r in records:
        print(f"N={r['world_size']} {r['strategy']:<5} SAM {r['sam_mode']:<6} "
              f"{r['bytes_per_step']:>14,.0f} B/step/rank  formula {r['bytes_formula']:>14,.0f}"
              f"  ratio {r['ratio_to_formula']:.5f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
