"""Train a model with NeuroOptima (or a baseline) on one process, several, or several nodes.

    python launch/train.py                                        # digits + MLP, one process
    torchrun --standalone --nproc_per_node=2 launch/train.py      # the same on 2 ranks (DDP)
    torchrun --nproc_per_node=2 launch/train.py --strategy fsdp2 --dataset fashion-mnist \\
        --model cnn --out runs/fmnist                             # checkpoints + metrics
    torchrun ... launch/train.py --out runs/fmnist --resume      # continue after a crash

Data order is a pure function of (seed, epoch) and every checkpoint holds the position in the
data, the optimizer and RNG states, so a resumed run reproduces the metrics of an uninterrupted
one. Metrics go to ``<out>/metrics.jsonl``, one line per epoch; the last line printed is the
final test accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # started as a script: make ``launch`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from launch import checkpoint as ckpt
from launch.data import DATASETS, epoch_batches, load_dataset, steps_per_epoch
from launch.models import MODELS, build_model
from launch.optimizers import add_optimizer_args
from launch.strategies import STRATEGIES, make_strategy

# Flags that must match between a run and its resumption (the rest may change, e.g. --epochs).
RESUME_KEYS = ("strategy", "dataset", "model", "optimizer", "batch_size", "seed", "subset",
               "test_subset", "seq_len", "lr", "weight_decay", "sam_rho", "sam_adaptive",
               "sam_eta", "sam_ascent", "sam_warmup", "sam_interval", "sam_start",
               "lookahead_k", "lookahead_alpha", "betas", "eps", "update", "beta_diff",
               "no_prox", "max_grad_norm", "momentum", "sam_mode", "zero_stage", "world_size")
# A simulated crash exits with this code (any non-zero code would do for torchrun).
CRASH_EXIT_CODE = 17


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return number


def mesh_shape(value: str) -> tuple[int, int]:
    try:
        replicas, shards = (int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected R,S (two integers), got {value!r}") from None
    if replicas < 1 or shards < 1:
        raise argparse.ArgumentTypeError(f"expected R,S >= 1, got {value!r}")
    return replicas, shards


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a model with NeuroOptima; start with python or torchrun.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("run")
    g.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="how model and optimizer state are spread over ranks (default: ddp "
                        "when started on several ranks, else single)")
    g.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    g.add_argument("--data-dir", default=None,
                   help="where the dataset's files are (default: its usual place)")
    g.add_argument("--model", choices=sorted(MODELS), default="mlp")
    g.add_argument("--seq-len", type=positive_int, default=128,
                   help="characters per example (text datasets)")
    g.add_argument("--epochs", type=positive_int, default=12)
    g.add_argument("--batch-size", type=positive_int, default=32,
                   help="examples per rank per step (global batch = this x ranks)")
    g.add_argument("--eval-batch-size", type=positive_int, default=512)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--subset", type=positive_int, default=None,
                   help="use only the first N training examples (quick runs)")
    g.add_argument("--test-subset", type=positive_int, default=None,
                   help="use only the first N test examples")
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many steps in total (then evaluate)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads per rank (default: 1 on several ranks)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = parser.add_argument_group("checkpoints and metrics")
    c.add_argument("--out", type=Path, default=None,
                   help="run directory for metrics.jsonl and checkpoints (default: none)")
    c.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out (a fresh start if none)")
    c.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="also checkpoint every N steps (0: only at the end of each epoch)")
    c.add_argument("--keep-checkpoints", type=positive_int, default=2,
                   help="complete checkpoints kept in --out")
    c.add_argument("--crash-after-steps", type=positive_int, default=None,
                   help="testing: exit abruptly (code 17) after this many steps in total, as "
                        "if the job were killed")
    d = parser.add_argument_group("distributed backends")
    d.add_argument("--sam-mode", choices=("global", "local"), default=None,
                   help="zero/fsdp/deepspeed: SAM perturbation from the global batch "
                        "(default: global) or per replica")
    d.add_argument("--mesh", type=mesh_shape, default=None, metavar="R,S",
                   help="zero and fsdp2: hybrid sharding over R replicas x S shards (R * S "
                        "ranks; state sharded within each group of S, replicated across R); "
                        "default: 1,<ranks>")
    d.add_argument("--collective-timeout", type=positive_float, default=300, metavar="SECONDS",
                   help="how long a collective waits for its peers before this rank raises "
                        "(default: 300)")
    d.add_argument("--bucket-cap-mb", type=float, default=25,
                   help="zero: gradient bucket size for the overlapped reduce-scatter")
    d.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="deepspeed: ZeRO stage (default: the config's, else 2)")
    d.add_argument("--deepspeed-config", type=Path, default=None,
                   help="deepspeed: a JSON config (batch size and the optimizer flags given "
                        "here override its values)")
    # The deepspeed launcher passes --local_rank; the rank also comes from the environment.
    d.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    add_optimizer_args(parser)
    return parser


# ------------------------------------------------------------------ distributed set-up

def init_distributed(args: argparse.Namespace) -> None:
    """Join torchrun's process group; a distributed strategy without torchrun gets a group of
    one process."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.strategy is None:
        args.strategy = "ddp" if launched and int(os.environ["WORLD_SIZE"]) > 1 else "single"
    if args.strategy == "single":
        if launched and int(os.environ["WORLD_SIZE"]) > 1:
            raise SystemExit("error: --strategy single runs one process, but "
                             f"{os.environ['WORLD_SIZE']} were started; use ddp, zero, fsdp2, "
                             "fsdp1 or deepspeed")
        return
    if not launched:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    backend = "nccl" if _use_cuda(args) else "gloo"
    # A rank stuck in a collective makes its peers raise after this long, not gloo's 30 min.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.collective_timeout))
    if args.mesh is not None:
        if args.strategy not in ("zero", "fsdp2"):
            raise SystemExit(f"error: --mesh applies to --strategy zero and fsdp2, not "
                             f"{args.strategy}")
        if args.mesh[0] * args.mesh[1] != dist.get_world_size():
            raise SystemExit(f"error: --mesh {args.mesh[0]},{args.mesh[1]} needs "
                             f"{args.mesh[0] * args.mesh[1]} ranks, {dist.get_world_size()} "
                             f"were started")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _use_cuda(args: argparse.Namespace) -> bool:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA device is available")
    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def pick_device(args: argparse.Namespace) -> torch.device:
    if not _use_cuda(args):
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------ training pieces

def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over examples (and, for text, over positions)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def evaluate(strategy, test, batch_size: int, device: torch.device) -> tuple[float, float]:
    """(mean test loss, accuracy) over the whole test set. Every rank takes an equal-sized,
    padded slice so sharded models run the same number of forwards on every rank."""
    rank, world = strategy.rank, strategy.world_size
    n = len(test)
    per_rank = math.ceil(n / world)
    index = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    valid = index < n
    index = torch.where(valid, index, torch.zeros_like(index))
    loss_sum = correct = count = 0.0
    for start in range(0, per_rank, batch_size):
        idx, ok = index[start: start + batch_size], valid[start: start + batch_size]
        x, y = test.inputs[idx].to(device), test.targets[idx].to(device)
        logits = strategy.eval_forward(x).float()
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 reduction="none").view(y.shape)
        weight = ok.to(device).view(-1, *[1] * (y.dim() - 1)).expand_as(y)
        loss_sum += losses[weight].double().sum().item()
        correct += (logits.argmax(-1) == y)[weight].sum().item()
        count += weight.sum().item()
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], device)
    return loss_sum / count, correct / count


def run_config(args: argparse.Namespace, world: int) -> dict:
    config = {key: getattr(args, key, None) for key in RESUME_KEYS if key != "world_size"}
    config["world_size"] = world
    return config


def check_resume_config(saved: dict, current: dict, directory: Path) -> None:
    changed = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
    if changed:
        details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise SystemExit(f"error: cannot resume {directory}: the run was started with other "
                         f"settings ({details}); resume with the original ones")


def truncate_metrics(path: Path, completed_epochs: int) -> None:
    """Drop lines of epochs the resumed run will redo (written after the last checkpoint)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["epoch"] <= completed_epochs]
    path.write_text("".join(line + "\n" for line in kept))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------ the run

def train(args: argparse.Namespace) -> float:
    rank, world = rank_and_world()
    device = pick_device(args)
    if args.threads or world > 1:
        torch.set_num_threads(args.threads or 1)
    if args.resume and args.out is None:
        raise SystemExit("error: --resume needs --out (the run directory to resume)")

    options = {"seq_len": args.seq_len} if args.dataset == "shakespeare" else {}
    train_set, test_set = load_dataset(args.dataset, args.data_dir, **options)
    if args.subset:
        train_set = train_set.subset(min(args.subset, len(train_set)))
    if args.test_subset:
        test_set = test_set.subset(min(args.test_subset, len(test_set)))
    steps = steps_per_epoch(len(train_set), args.batch_size * world)

    seed_everything(args.seed)  # same initial weights on every rank
    model = build_model(args.model, train_set.info)
    strategy = make_strategy(args, device)
    strategy.setup(model)

    start_epoch, start_step, global_step, loss_sum = 0, 0, 0, 0.0
    config = run_config(args, world)
    metrics_path = args.out / "metrics.jsonl" if args.out else None
    if args.out and rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
    latest = ckpt.latest_checkpoint(args.out) if args.out else None
    if latest is not None and not args.resume:
        raise SystemExit(f"error: {args.out} already holds a run ({latest.name}); pass --resume "
                         f"to continue it or choose another --out")
    if latest is not None:
        meta = ckpt.read_meta(latest)
        check_resume_config(meta["config"], config, latest)
        strategy.load(latest)
        state = ckpt.load_trainer_state(latest, rank)
        ckpt.set_rng_state(state["rng"])
        ckpt.restore_local_buffers(strategy.module, state["buffers"])
        start_epoch, start_step = state["epoch"], state["step"]
        global_step, loss_sum = state["global_step"], state["loss_sum"]
        if rank == 0:
            truncate_metrics(metrics_path, start_epoch)
            print(f"resumed from {latest} (epoch {start_epoch + 1}, step {start_step})",
                  flush=True)
    elif metrics_path is not None and rank == 0 and metrics_path.exists():
        metrics_path.unlink()  # a run that died before its first checkpoint

    def save(epoch: int, step: int) -> None:
        if args.out is None:
            return
        state = {"epoch": epoch, "step": step, "global_step": global_step,
                 "loss_sum": loss_sum, "rng": ckpt.rng_state(),
                 "buffers": ckpt.local_buffers(strategy.module)}
        meta = {"epoch": epoch, "step": step, "global_step": global_step, "config": config}
        ckpt.save_checkpoint(args.out, strategy, state, meta, args.keep_checkpoints)

    if rank == 0:
        print(f"{args.dataset} ({len(train_set)} train, {len(test_set)} test) | {args.model} | "
              f"{args.optimizer} | strategy {args.strategy} on {world} rank(s) | "
              f"{steps} steps/epoch", flush=True)
    accuracy = float("nan")
    started = time.time()
    for epoch in range(start_epoch, args.epochs):
        if args.max_steps and global_step >= args.max_steps:
            break
        epoch_start = time.time()
        bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=rank != 0 or args.no_progress, leave=False, dynamic_ncols=True)
        step = start_step
        for idx in epoch_batches(len(train_set), args.batch_size, rank, world, args.seed,
                                 epoch, start_step):
            x, y = train_set.inputs[idx].to(device), train_set.targets[idx].to(device)
            loss = strategy.train_step(x, y, loss_fn)
            loss_sum += loss.double().item()
            step += 1
            global_step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            last = step == steps or (args.max_steps and global_step >= args.max_steps)
            if args.checkpoint_every and global_step % args.checkpoint_every == 0 and not last:
                save(epoch, step)
            if args.crash_after_steps and global_step >= args.crash_after_steps:
                bar.close()
                sys.stdout.flush()
                os._exit(CRASH_EXIT_CODE)
            if last:
                break
        bar.close()
        total, = all_reduce_sum([loss_sum], device)
        train_loss = total / (step * world)
        with strategy.evaluation_weights():
            test_loss, accuracy = evaluate(strategy, test_set, args.eval_batch_size, device)
        record = {"epoch": epoch + 1, "global_step": global_step, "steps": step,
                  "train_loss": train_loss, "test_loss": test_loss,
                  "test_accuracy": accuracy, "time_s": round(time.time() - epoch_start, 3)}
        if rank == 0:
            print(f"epoch {epoch + 1:3d}  train loss {train_loss:.4f}  test loss "
                  f"{test_loss:.4f}  test acc {accuracy:.4f}  ({record['time_s']:.1f} s)",
                  flush=True)
            if metrics_path is not None:
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
        loss_sum, start_step = 0.0, 0
        save(epoch + 1, 0)
    if math.isnan(accuracy):  # nothing left to train (resumed a finished run, or --max-steps)
        with strategy.evaluation_weights():
            _, accuracy = evaluate(strategy, test_set, args.eval_batch_size, device)
    if rank == 0:
        print(f"final test accuracy: {accuracy:.4f} ({100 * accuracy:.2f} %) | "
              f"{args.dataset} {args.model} {args.optimizer} {args.strategy} x{world} | "
              f"{time.time() - started:.1f} s", flush=True)
    return accuracy


def shutdown_distributed(*, completed: bool) -> None:
    """Tear the process group down while the interpreter is still whole.

    DDP's reducer, FSDP's state and the sharded optimizer's buckets hold gloo work and tensors
    and sit in reference cycles, so plain reference counting does not free them when
    ``train`` returns. Left to the interpreter's final collection, after the group is gone,
    their destructors run in a finalizing interpreter and the process aborts ("terminate called
    without an active exception") after its work is done. So: collect them now, let every rank
    arrive (after a clean run only: a failed peer would never come), then destroy the group.
    """
    if not dist.is_initialized():
        return
    gc.collect()
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    init_distributed(args)
    completed = False
    try:
        train(args)
        completed = True
    finally:
        shutdown_distributed(completed=completed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
