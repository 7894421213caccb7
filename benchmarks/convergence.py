"""Convergence benchmark: every optimizer in ``convergence_optimizers`` on three real tasks.

Tasks (data from ``launch.data``, models from ``launch.models``):

* ``digits-mlp``      -- MLP on scikit-learn's 8x8 digits
* ``fashion-cnn``     -- small CNN on a Fashion-MNIST subset
* ``shakespeare-lm``  -- character-level causal transformer on a slice of Shakespeare's works

Protocol, the same for every optimizer:

1. Learning rate: the optimizer's three-point grid, one selection seed, half the task's step
   the LR with the best final *validation* accuracy (a split carved from the training data,
   never the test set) wins.
2. Evaluation: ``seeds`` fresh runs at that LR; test accuracy every ``eval_every`` steps, at half
   the budget and at the end. A constant learning rate (no schedule), so the half-budget point of
   a SAM run is a complete run with the gradient evaluations of a plain run.

Per run it records the final test accuracy and loss, the first evaluation at which test accuracy
reaches the task's target (epochs, steps, gradient evaluations, training wall time), and the
variance of the per-step training loss over the last epoch (stability). ``summarize`` reduces the
runs to mean and standard deviation per (task, optimizer), at equal epochs (end of the budget) and
at equal gradient evaluations (SAM optimizers at half their steps).

Command line: ``python benchmarks/convergence.py --profile quick|full|smoke [--out FILE]
[--tasks TASK ...] [--optimizers NAME ...]``; ``--merge A.json B.json --out C.json`` combines
runs of one profile over different tasks or different optimizers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
import multiprocessing as mp

import torch
import torch.nn.functional as nnf
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make launch/ importable
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from launch.data import epoch_permutation, load_dataset, steps_per_epoch  # noqa: E402
from launch.models import build_model  # noqa: E402

from convergence_optimizers import OPTIMIZERS, OptimizerSpec  # noqa: E402
from training_step import train_step  # noqa: E402  (the suite's step, shared)

SELECTION_SEED = 1000  # never one of the evaluation seeds 0..seeds-1
EVAL_BATCH = 1000


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str
    model: str
    batch_size: int
    steps: int                      # step budget of every run (equal epochs for everyone);
                                    # learning-rate selection runs get half of it
    eval_every: int                 # test/validation evaluation period in steps
    target: float                   # test accuracy that counts as "reached"
    n_train: int | None = None      # None: the whole training split minus validation
    n_val: int = 0
    n_test: int | None = None
    model_options: dict = field(default_factory=dict)
    data_options: dict = field(default_factory=dict)
    metric: str = "accuracy"        # "accuracy" or "next-character accuracy"


@dataclass(frozen=True)
class Profile:
    name: str
    tasks: tuple[TaskSpec, ...]
    seeds: int
    optimizers: tuple[str, ...]


ALL = tuple(OPTIMIZERS)

# Sized for two CPU cores that were shared with other work at a load of about 15 runnable
# processes while the committed full run was made: small models, data subsets and short budgets
# (the image and text tasks see two short epochs). The JSON records every size.
def _tasks(scale: int) -> tuple[TaskSpec, ...]:
    """The three tasks; ``scale`` divides the step budgets (1: full, 3: quick)."""
    return (
        TaskSpec("digits-mlp", "digits", "mlp", batch_size=32, steps=350 // scale,
                 eval_every=35 // scale, target=0.93, n_val=287,
                 model_options=dict(hidden=(128, 64))),
        TaskSpec("fashion-cnn", "fashion-mnist", "cnn", batch_size=64, steps=40 // scale,
                 eval_every=10 // scale, target=0.6, n_train=1280, n_val=512, n_test=1000,
                 model_options=dict(width=8)),
        TaskSpec("shakespeare-lm", "shakespeare", "transformer", batch_size=16,
                 steps=40 // scale, eval_every=10 // scale, target=0.2, n_train=320,
                 n_val=128, n_test=256,
                 model_options=dict(d_model=32, n_heads=2, n_layers=2),
                 data_options=dict(seq_len=32), metric="next-character accuracy"),
    )


FULL = Profile("full", _tasks(1), seeds=5, optimizers=ALL)
QUICK = Profile("quick", _tasks(3), seeds=2, optimizers=ALL)

# CI: seconds, embedded data only, one baseline and one NeuroOptima configuration with SAM.
SMOKE = Profile("smoke", (
    TaskSpec("digits-mlp", "digits", "mlp", batch_size=32, steps=40, eval_every=10,
             target=0.5, n_val=287, model_options=dict(hidden=(32,))),
), seeds=2, optimizers=("AdamW", "NeuroOptima[adan]"))

PROFILES = {p.name: p for p in (SMOKE, QUICK, FULL)}


# ------------------------------------------------------------------ data

def load_task_data(task: TaskSpec) -> dict:
    """Train / validation / test tensors of a task, sliced to its sizes (no randomness)."""
    train, test = load_dataset(task.dataset, **task.data_options)
    n_all = len(train)
    n_train = task.n_train if task.n_train is not None else n_all - task.n_val
    if n_train + task.n_val > n_all:
        raise ValueError(f"{task.name}: n_train + n_val = {n_train + task.n_val} exceeds the "
                         f"{n_all} training examples")
    # The validation split is the tail of the training split; training uses the head.
    val_lo = n_all - task.n_val
    n_test = task.n_test if task.n_test is not None else len(test)
    return dict(
        info=train.info,
        train=(train.inputs[:n_train].clone(), train.targets[:n_train].clone()),
        val=(train.inputs[val_lo:].clone(), train.targets[val_lo:].clone()),
        test=(test.inputs[:n_test].clone(), test.targets[:n_test].clone()),
    )


def data_sizes(task: TaskSpec, data: dict) -> dict:
    sizes = {split: int(data[split][0].shape[0]) for split in ("train", "val", "test")}
    if data["info"].kind == "text":
        seq = int(data["train"][0].shape[1])
        sizes.update({f"{split}_chars": sizes[split] * seq for split in ("train", "val", "test")})
    return sizes


# ------------------------------------------------------------------ one run

@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
             ) -> tuple[float, float]:
    """(accuracy, mean cross-entropy); for text, over every next-character position."""
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for lo in range(0, inputs.shape[0], EVAL_BATCH):
        logits = model(inputs[lo:lo + EVAL_BATCH])
        y = targets[lo:lo + EVAL_BATCH]
        flat = logits.reshape(-1, logits.shape[-1])
        loss_sum += float(nnf.cross_entropy(flat, y.reshape(-1), reduction="sum"))
        correct += int((flat.argmax(-1) == y.reshape(-1)).sum())
        total += y.numel()
    model.train()
    return correct / total, loss_sum / total


def eval_points(task: TaskSpec) -> list[int]:
    points = set(range(task.eval_every, task.steps + 1, task.eval_every))
    points.update({task.steps // 2, task.steps})
    return sorted(points)


def run_one(task: TaskSpec, spec: OptimizerSpec, lr: float, seed: int, data: dict,
            split: str) -> dict:
    """Train one model; evaluate on ``split``.

    ``split="val"`` is a learning-rate selection run: half the step budget, one evaluation at
    its end. ``split="test"`` runs the whole budget and evaluates at ``eval_points(task)``.
    """
    budget = task.steps if split == "test" else max(1, task.steps // 2)
    points = set(eval_points(task)) if split == "test" else {budget}
    torch.manual_seed(seed)
    model = build_model(task.model, data["info"], **task.model_options)
    opt = spec.build(model.parameters(), lr)
    x_all, y_all = data["train"]
    x_eval, y_eval = data[split]
    n = x_all.shape[0]
    per_epoch = steps_per_epoch(n, task.batch_size)
    losses: list[float] = []
    curve: list[dict] = []
    train_s, step, diverged = 0.0, 0, False
    reached = None
    epoch = 0
    while step < budget and not diverged:
        perm = epoch_permutation(n, seed, epoch)
        for b in range(per_epoch):
            if step >= budget:
                break
            idx = perm[b * task.batch_size:(b + 1) * task.batch_size]
            t0 = time.perf_counter()
            loss, _ = train_step(model, opt, x_all[idx], y_all[idx], two_pass=spec.sam)
            train_s += time.perf_counter() - t0
            step += 1
            losses.append(loss)
            if not math.isfinite(loss):
                diverged = True
            if step in points or diverged:
                acc, eval_loss = evaluate(model, x_eval, y_eval)
                point = dict(steps=step, grad_evals=step * spec.grad_evals_per_step,
                             epochs=step / per_epoch, wall_s=train_s, acc=acc,
                             loss=eval_loss if math.isfinite(eval_loss) else None)
                curve.append(point)
                if reached is None and acc >= task.target:
                    reached = {k: point[k] for k in ("epochs", "steps", "grad_evals", "wall_s")}
            if diverged:
                break
        epoch += 1
    last_epoch = [v for v in losses[-per_epoch:] if math.isfinite(v)]
    final = curve[-1]
    return dict(
        task=task.name, optimizer=spec.name, lr=lr, seed=seed, split=split,
        final_acc=final["acc"], final_loss=final["loss"], steps=step,
        grad_evals=step * spec.grad_evals_per_step, epochs=step / per_epoch,
        train_wall_s=train_s, diverged=diverged, to_target=reached,
        train_loss_last_epoch_mean=statistics.fmean(last_epoch) if last_epoch else None,
        train_loss_last_epoch_var=(statistics.pvariance(last_epoch)
                                   if len(last_epoch) > 1 and not diverged else None),
        curve=curve)


# ------------------------------------------------------------------ worker pool

# Each worker loads a task's tensors once (from the file the parent wrote) and keeps them.
_DATA: dict[str, dict] = {}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _job(args: tuple) -> dict:
    task, opt_name, lr, seed, split, data_file = args
    if data_file not in _DATA:
        _DATA.clear()
        _DATA[data_file] = torch.load(data_file, weights_only=False)
    return run_one(task, OPTIMIZERS[opt_name], lr, seed, _DATA[data_file], split)


class Runner:
    """Runs jobs in this process (``workers=1``) or in one pool kept for the whole benchmark
    (starting a worker costs seconds to a minute on a loaded machine)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        # One thread per run: these models are too small to gain from more, and on a shared
        # machine extra threads only spin.
        self.threads = 1
        self.pool = None
        if workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                            initializer=_init_worker,
                                            initargs=(self.threads,))

    def map(self, jobs: list[tuple], desc: str) -> list[dict]:
        results = []
        with tqdm(total=len(jobs), desc=desc, unit="run", dynamic_ncols=True) as bar:
            if self.pool is None:
                _init_worker(self.threads)
                outputs = map(_job, jobs)
            else:
                outputs = self.pool.map(_job, jobs)
            for result in outputs:
                results.append(result)
                bar.update()
        return results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# ------------------------------------------------------------------ protocol

def select_lr(selection: list[dict]) -> float:
    """The grid LR with the best final validation accuracy (ties: lower final loss)."""
    def key(r):
        loss = r["final_loss"] if r["final_loss"] is not None else math.inf
        return (-r["final_acc"], loss, r["lr"])
    return min(selection, key=key)["lr"]


def run_task(task: TaskSpec, profile: Profile, runner: Runner, scratch: Path) -> dict:
    t0 = time.perf_counter()
    data = load_task_data(task)
    data_file = str(scratch / f"{task.name}.pt")
    torch.save(data, data_file)
    _DATA.clear()
    _DATA[data_file] = data
    jobs = [(task, name, lr, SELECTION_SEED, "val", data_file)
            for name in profile.optimizers for lr in OPTIMIZERS[name].lr_grid]
    selection = runner.map(jobs, f"{task.name}: LR grid")
    chosen = {name: select_lr([r for r in selection if r["optimizer"] == name])
              for name in profile.optimizers}
    jobs = [(task, name, chosen[name], seed, "test", data_file)
            for name in profile.optimizers for seed in range(profile.seeds)]
    runs = runner.map(jobs, f"{task.name}: {profile.seeds} seeds")
    for r in selection:
        del r["curve"]  # only the final validation numbers matter for selection
    return dict(task=asdict(task), sizes=data_sizes(task, data),
                steps_per_epoch=steps_per_epoch(data["train"][0].shape[0], task.batch_size),
                eval_points=eval_points(task), chosen_lr=chosen, selection=selection,
                runs=runs, wall_s=time.perf_counter() - t0)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _acc_at_grad_evals(run: dict, grad_evals: int) -> float:
    """Test accuracy at the last evaluation with at most ``grad_evals`` gradient evaluations."""
    points = [p for p in run["curve"] if p["grad_evals"] <= grad_evals]
    return points[-1]["acc"] if points else math.nan


def summarize(task_result: dict) -> list[dict]:
    """One record per optimizer: the numbers the report tables show."""
    task = task_result["task"]
    budget = task["steps"]  # gradient evaluations of a plain run = its steps
    rows = []
    by_opt: dict[str, list[dict]] = {}
    for r in task_result["runs"]:
        by_opt.setdefault(r["optimizer"], []).append(r)
    for name, runs in by_opt.items():
        spec = OPTIMIZERS[name]
        grid = [r for r in task_result["selection"] if r["optimizer"] == name]
        lr = task_result["chosen_lr"][name]
        acc_mean, acc_std = _mean_std([r["final_acc"] for r in runs])
        eq_mean, eq_std = _mean_std([_acc_at_grad_evals(r, budget) for r in runs])
        reached = [r["to_target"] for r in runs if r["to_target"] is not None]
        variances = [r["train_loss_last_epoch_var"] for r in runs
                     if r["train_loss_last_epoch_var"] is not None]
        row = dict(
            task=task["name"], optimizer=name, family=spec.family, sam=spec.sam,
            lr=lr, lr_grid=list(spec.lr_grid),
            lr_at_grid_edge=lr in (min(spec.lr_grid), max(spec.lr_grid)),
            val_acc_by_lr={str(r["lr"]): r["final_acc"] for r in sorted(grid,
                                                                        key=lambda r: r["lr"])},
            seeds=len(runs), diverged=sum(r["diverged"] for r in runs),
            acc_mean=acc_mean, acc_std=acc_std,
            acc_equal_grad_evals_mean=eq_mean, acc_equal_grad_evals_std=eq_std,
            test_loss_mean=_mean_std([r["final_loss"] for r in runs
                                      if r["final_loss"] is not None])[0],
            loss_var_mean=_mean_std(variances)[0],
            train_wall_s_mean=_mean_std([r["train_wall_s"] for r in runs])[0],
            reached=len(reached),
            target=task["target"],
            epochs_to_target=_mean_std([t["epochs"] for t in reached])[0],
            steps_to_target=_mean_std([t["steps"] for t in reached])[0],
            grad_evals_to_target=_mean_std([t["grad_evals"] for t in reached])[0],
            wall_s_to_target=_mean_std([t["wall_s"] for t in reached])[0],
        )
        rows.append(row)
    return rows


def environment() -> dict:
    return dict(python=platform.python_version(), torch=torch.__version__,
                cpu_count=os.cpu_count(), machine=platform.machine())


def run(profile: Profile, out: Path, workers: int, command: str,
        tasks: list[str] | None = None, optimizers: list[str] | None = None) -> dict:
    if optimizers is not None:
        unknown = [name for name in optimizers if name not in profile.optimizers]
        if unknown or len(set(optimizers)) != len(optimizers):
            raise ValueError(f"--optimizers must be distinct names among "
                             f"{list(profile.optimizers)}, got {optimizers}")
        # Same tasks, seeds and protocol; only fewer rows (merge them with --merge).
        profile = replace(profile, optimizers=tuple(sorted(optimizers, key=_zoo_order)))
    selected = [t for t in profile.tasks if tasks is None or t.name in tasks]
    if tasks is not None and len(selected) != len(tasks):
        known = [t.name for t in profile.tasks]
        raise ValueError(f"--tasks must be among {known}, got {tasks}")
    result = dict(benchmark="convergence", profile=profile.name, command=command,
                  seeds=profile.seeds, selection_seed=SELECTION_SEED, workers=workers,
                  environment=environment(), optimizers={
                      name: dict(family=OPTIMIZERS[name].family, sam=OPTIMIZERS[name].sam,
                                 lr_grid=list(OPTIMIZERS[name].lr_grid),
                                 settings=OPTIMIZERS[name].settings)
                      for name in profile.optimizers},
                  tasks=[], summary=[])
    t0 = time.perf_counter()
    runner = Runner(workers)
    try:
        with tempfile.TemporaryDirectory(prefix="neurooptima-convergence-") as scratch:
            for task in selected:
                task_result = run_task(task, profile, runner, Path(scratch))
                result["tasks"].append(task_result)
                result["summary"] += summarize(task_result)
                result["wall_s"] = time.perf_counter() - t0
                write_json(result, out)  # after every task: a stopped run keeps what it did
    finally:
        runner.close()
    return result


def write_json(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False, default=_no_nan) + "\n")
    tmp.replace(out)


def _no_nan(value):
    raise TypeError(f"not JSON serializable: {value!r}")


def _zoo_order(name: str) -> tuple[int, str]:
    """Sort key: the order of ``OPTIMIZERS`` (names it does not know last)."""
    order = list(OPTIMIZERS)
    return (order.index(name) if name in order else len(order), name)


def _merge_task(a: dict, b: dict) -> dict:
    """One task's results from two runs over different optimizers (same task, same sizes)."""
    name = a["task"]["name"]
    for key in ("task", "sizes", "steps_per_epoch", "eval_points"):
        if a[key] != b[key]:
            raise ValueError(f"--merge: task {name} differs between the files in {key!r}; "
                             f"only runs of the same task definition can be combined")
    both = set(a["chosen_lr"]) & set(b["chosen_lr"])
    if both:
        raise ValueError(f"--merge: task {name} has optimizers in two files: {sorted(both)}")
    chosen = {**a["chosen_lr"], **b["chosen_lr"]}
    by_zoo = lambda r: _zoo_order(r["optimizer"])  # noqa: E731 (stable: seeds keep their order)
    return dict(a, chosen_lr={k: chosen[k] for k in sorted(chosen, key=_zoo_order)},
                selection=sorted(a["selection"] + b["selection"], key=by_zoo),
                runs=sorted(a["runs"] + b["runs"], key=by_zoo),
                wall_s=a["wall_s"] + b["wall_s"])


def merge(paths: list[Path], out: Path) -> dict:
    """One result from runs of the same profile: over different tasks (run side by side), or
    over different optimizers on the same task (rows added later)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    for key in ("profile", "seeds", "selection_seed"):
        if len({p[key] for p in parts}) != 1:
            raise ValueError(f"--merge needs results with one {key}, got "
                             f"{[p[key] for p in parts]}")
    merged = dict(parts[0])
    merged["command"] = "; ".join(p["command"] for p in parts) + " (merged with --merge)"
    merged["workers"] = sum(p["workers"] for p in parts)
    merged["wall_s"] = sum(p.get("wall_s", 0.0) for p in parts)  # process time, not elapsed
    optimizers = {k: v for p in parts for k, v in p["optimizers"].items()}
    merged["optimizers"] = {k: optimizers[k] for k in sorted(optimizers, key=_zoo_order)}
    tasks: dict[str, dict] = {}
    for p in parts:
        for t in p["tasks"]:
            name = t["task"]["name"]
            tasks[name] = _merge_task(tasks[name], t) if name in tasks else t
    merged["tasks"] = list(tasks.values())
    # Re-reduced from the merged runs, so a row is the same whichever file it came from.
    merged["summary"] = [r for t in merged["tasks"] for r in summarize(t)]
    write_json(merged, out)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/convergence.json")
    parser.add_argument("--workers", type=int, default=1,
                        help="parallel runs, one thread each")
    parser.add_argument("--tasks", nargs="+", default=None, help="subset of the profile's tasks")
    parser.add_argument("--optimizers", nargs="+", default=None, metavar="NAME",
                        help="subset of the profile's optimizers (names as in "
                             "convergence_optimizers.OPTIMIZERS)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                        help="combine results of the same profile (different tasks, or different "
                             "optimizers on the same tasks) into --out")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        print(f"wrote {args.out}")
        return 0
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    command = "python benchmarks/convergence.py " + shlex.join(argv if argv is not None
                                                                else sys.argv[1:])
    profile = PROFILES[args.profile]
    if args.optimizers is not None and not set(args.optimizers) <= set(profile.optimizers):
        parser.error(f"--optimizers must be among {list(profile.optimizers)} (profile "
                     f"{profile.name}), got {args.optimizers}")
    run(profile, args.out, args.workers, command.strip(), args.tasks, args.optimizers)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
