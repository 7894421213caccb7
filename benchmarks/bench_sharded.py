"""ShardedNeuroOptima against DDP + NeuroOptima: step time, bytes moved and state memory.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_sharded.py --quick
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_sharded.py

Both candidates train the same MLP (float32, CPU, gloo) on the same random batches and time a
whole step: forward, backward (DDP all-reduces, the sharded optimizer reduce-scatters, both from
backward hooks), the update and, for the sharded optimizer, the all-gather of the weights.
Configurations: SAM off, SAM on (``sam_mode="global"``, and ``"local"`` for the sharded one;
DDP + NeuroOptima synchronizes both SAM passes, i.e. global SAM).

Bytes are counted per collective type with ``neurooptima.distributed.count_communication``
(ring convention, see ``comm_accounting``): DDP's all-reduce through a counting comm hook, the
sharded optimizer's collectives directly; each is compared with its formula,
``passes x model bytes x (N-1)/N`` with 2 passes per synchronized gradient evaluation.

The machine is shared, so candidates are measured in rounds, each round visiting every candidate
in a rotated order, and the reported step time is the median over all timed steps of rank 0.
Ratios divide figures of the same run.

Output (JSON, default ``benchmarks/results/sharded.json``): ``{"meta": {...}, "records": [...]}``
with one record per (configuration, candidate): ``config``, ``candidate``, ``time_ms``,
``time_ms_q1``, ``time_ms_q3``, ``samples``, ``bytes_per_step`` (by collective type),
``bytes_total``, ``bytes_formula``, ``bytes_ratio_to_formula``, ``state_bytes_per_rank``,
``ratio_to_ddp`` (time, same configuration).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from neurooptima import NeuroOptima
from neurooptima.distributed import ShardedNeuroOptima, count_communication
from neurooptima.distributed.comm_accounting import record

RESULTS = Path(__file__).resolve().parent / "results" / "sharded.json"
CONFIGS = {  # name: (sam_rho, sam_mode of the sharded optimizer)
    "plain": (0.0, "global"),
    "sam_global": (0.05, "global"),
    "sam_local": (0.05, "local"),
}


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, 64))


def counting_allreduce_hook(state, bucket):
    """DDP's default all-reduce, reported to the communication counter."""
    buffer = bucket.buffer()
    record("all_reduce", buffer.numel() * buffer.element_size(), dist.get_world_size())
    return allreduce_hook(state, bucket)


def build(candidate: str, config: str, width: int):
    sam_rho, sam_mode = CONFIGS[config]
    hyper = dict(lr=1e-3, weight_decay=0.01, sam_rho=sam_rho, lookahead_k=5)
    model = make_model(width)
    if candidate == "ddp":
        wrapped = DistributedDataParallel(model)
        wrapped.register_comm_hook(None, counting_allreduce_hook)
        return wrapped, NeuroOptima(wrapped.parameters(), **hyper)
    return model, ShardedNeuroOptima(model.parameters(), sam_mode=sam_mode, **hyper)


def state_bytes(optimizer) -> int:
    state = (optimizer.local_optimizer.state if isinstance(optimizer, ShardedNeuroOptima)
             else optimizer.state)
    return sum(t.numel() * t.element_size() for entry in state.values()
               for key, t in entry.items() if torch.is_tensor(t) and key != "step")


def run_steps(model, optimizer, steps: int, batch: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed + dist.get_rank())
    times = []
    for _ in range(steps):
        x = torch.randn(batch, 256, generator=gen)
        y = torch.randn(batch, 64, generator=gen)

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        dist.barrier()
        start = time.perf_counter()
        optimizer.step(closure)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer steps")
    parser.add_argument("--width", type=int, default=None, help="hidden width of the MLP")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--batch", type=int, default=32, help="samples per rank")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    width = args.width or (512 if args.quick else 1024)
    rounds = args.rounds or (2 if args.quick else 4)
    steps = args.steps or (5 if args.quick else 10)

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    candidates = [(config, cand) for config in CONFIGS for cand in ("ddp", "sharded")
                  if not (cand == "ddp" and config == "sam_local")]
    times = {c: [] for c in candidates}
    comm, memory = {}, {}
    model_bytes = sum(p.numel() * p.element_size() for p in make_model(width).parameters())

    bar = tqdm(total=rounds * len(candidates), disable=rank != 0, desc="bench_sharded")
    for r in range(rounds):
        order = candidates[r % len(candidates):] + candidates[:r % len(candidates)]
        for config, cand in order:
            model, optimizer = build(cand, config, width)
            run_steps(model, optimizer, 1, args.batch, seed=r)  # warm-up, state created
            with count_communication() as counter:
                times[(config, cand)] += run_steps(model, optimizer, steps, args.batch, seed=r)
            comm[(config, cand)] = {k: v / steps for k, v in counter.bytes.items()}
            memory[(config, cand)] = state_bytes(optimizer)
            if isinstance(optimizer, ShardedNeuroOptima):
                optimizer.remove_hooks()
            bar.update()
    bar.close()

    records = []
    for (config, cand), samples in times.items():
        q1, median, q3 = statistics.quantiles(samples, n=4)
        sam_rho, sam_mode = CONFIGS[config]
        passes = 2 * (2 if sam_rho > 0 and not (cand == "sharded" and sam_mode == "local")
                      else 1)
        formula = passes * model_bytes * (world - 1) / world
        total = sum(comm[(config, cand)].values())
        records.append(dict(config=config, candidate=cand, time_ms=median, time_ms_q1=q1,
                            time_ms_q3=q3, samples=len(samples),
                            bytes_per_step=comm[(config, cand)], bytes_total=total,
                            bytes_formula=formula,
                            bytes_ratio_to_formula=total / formula if formula else None,
                            state_bytes_per_rank=memory[(config, cand)]))
    ddp_time = {rec["config"]: rec["time_ms"] for rec in records if rec["candidate"] == "ddp"}
    ddp_time["sam_local"] = ddp_time["sam_global"]  # DDP's SAM is global SAM
    for rec in records:
        rec["ratio_to_ddp"] = rec["time_ms"] / ddp_time[rec["config"]]

    if rank == 0:
        print(f"\nmodel: {model_bytes / 4:,.0f} float32 parameters ({model_bytes / 2**20:.2f} "
              f"MiB), {world} ranks, batch {args.batch} per rank, gloo on CPU")
        print(f"{'config':<11} {'candidate':<8} {'step ms':>8} {'x DDP':>6} "
              f"{'bytes/step':>11} {'formula':>11} {'ratio':>6} {'state/rank':>11}")
        for rec in records:
            print(f"{rec['config']:<11} {rec['candidate']:<8} {rec['time_ms']:8.2f} "
                  f"{rec['ratio_to_ddp']:6.2f} {rec['bytes_total']:11,.0f} "
                  f"{rec['bytes_formula']:11,.0f} {rec['bytes_ratio_to_formula']:6.3f} "
                  f"{rec['state_bytes_per_rank']:11,}")
        meta = dict(world_size=world, backend="gloo", device="cpu", width=width,
                    model_bytes=model_bytes, batch_per_rank=args.batch, rounds=rounds,
                    steps_per_round=steps, torch=torch.__version__,
                    machine=platform.machine(), threads_per_rank=1,
                    command="torchrun --standalone --nproc_per_node=%d benchmarks/"
                            "bench_sharded.py%s" % (world, " --quick" if args.quick else ""))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
        print(f"wrote {args.out}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
