"""A DeepSpeed training script in DeepSpeed's own style, with NeuroOptima named in the config.

    deepspeed --num_gpus 2 launch/train_deepspeed.py --deepspeed_config launch/ds_config.json

(on a CPU-only machine: ``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 ...``). Trains a small MLP
on scikit-learn's embedded digits with ``sam_step`` and prints one JSON line per rank with the
first and last loss, the test accuracy and a checksum of the weights (equal on every rank).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json

import torch
import torch.distributed as dist


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    test, train = order[:297], order[297:]
    return x[train], y[train], x[test], y[test]


def main(argv: list[str] | None = None) -> int:
    import deepspeed

    from neurooptima.distributed import deepspeed as nds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--collective-timeout", type=float, default=300, metavar="SECONDS",
                        help="how long a collective waits for its peers (default: 300)")
    parser.add_argument("--jit-ops", action="store_true",
                        help="let DeepSpeed JIT-build its ops (default: none are built)")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if not args.jit_ops:
        nds.disable_jit_ops()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None,
                               timeout=datetime.timedelta(seconds=args.collective_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    engine, *_ = nds.initialize(args=args, model=model)
    device = next(engine.module.parameters()).device
    batch = engine.train_micro_batch_size_per_gpu()
    x, y, x_test, y_test = digits()
    losses = []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        idx = torch.randperm(len(y), generator=g)[:batch * world][rank::world]
        xb, yb = x[idx].to(device), y[idx].to(device)
        loss = nds.sam_step(engine, lambda: torch.nn.functional.cross_entropy(engine(xb), yb))
        losses.append(loss.item())
    nds.eval_mode(engine)  # momentum ascent: evaluate at w, not at the ascent point
    with torch.no_grad():
        accuracy = (engine(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
        checksum = sum(p.double().sum().item() for p in engine.module.parameters())
    nds.train_mode(engine)
    print(json.dumps({"rank": rank, "world": world, "first_loss": losses[0],
                      "last_loss": sum(losses[-5:]) / 5, "accuracy": accuracy,
                      "checksum": checksum}), flush=True)
    engine = None  # free what holds the process group's work before the group goes
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
