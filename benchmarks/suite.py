"""Time-to-target suite: workloads that train to real accuracy, candidates tuned until their best
learning rate is interior, one stored record per run.

    python benchmarks/suite.py                          # run (or resume) the full suite
    python benchmarks/suite.py --budget-minutes 30      # start no new run after 30 minutes
    python benchmarks/suite.py --only fashion-cnn AdamW # only these workloads / candidates
    python benchmarks/suite.py --profile quick          # CI: tiny budgets, a temporary folder

Protocol (the same for every candidate; AlgoPerf-style, sized for two CPU cores):

1. Learning rate: runs with the selection seed (1000) over the whole step budget on a ladder
   of half-decade points (..., 1e-3, 3.16e-3, 1e-2, ...). It starts with three points around the
   candidate's usual value and widens by one point beyond whichever edge holds the best final
   validation metric, until the best is interior or ``MAX_LR_TRIALS`` points have run (a
   diverged run scores worst). Candidates whose rho is tuned (SAM(AdamW)) then try the other
   values of ``RHO_GRID`` at the chosen learning rate. Tuning budget, the same for everyone: at
   most ``MAX_LR_TRIALS`` learning rates (+ ``len(RHO_GRID) - 1`` rho values where rho is tuned).
2. Evaluation: seeds 0..``seeds - 1`` at the chosen setting, the whole budget; the validation
   metric every ``eval_every`` steps (with the CPU seconds of training so far), the test metric
   at half the steps and at the end. Constant learning rate, so a run's first half is a complete
   shorter run: a SAM row (two gradient evaluations per step) read at half its steps has spent
   the gradient evaluations of a plain run.

Every run is one JSON line in ``<out>/<workload>.jsonl`` (default ``benchmarks/results/suite``),
keyed by (workload, candidate, lr, rho, seed); a run whose record exists is never repeated, so
the suite is built in several sittings and any part can be re-run by deleting its lines.
Targets, times to target, verdicts and plots are computed from the records by
``suite_report.py`` (and ``report.py``), never stored.

CPU seconds are the process's CPU time spent in training steps (``time.process_time``, one
thread), which a loaded shared machine disturbs far less than wall time.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as nnf
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make launch/ importable
    sys.path.insert(0, str(ROOT))

from launch.data import epoch_permutation, load_dataset, steps_per_epoch  # noqa: E402
from launch.models import build_model  # noqa: E402
from neurooptima import NeuroOptima  # noqa: E402
from neurooptima.validation import DEFAULT_LR as RULE_LR  # noqa: E402
from convergence import _train_step  # noqa: E402  (one SAM-aware training step for both)

RESULTS = ROOT / "benchmarks" / "results" / "suite"
SELECTION_SEED = 1000          # learning-rate and rho search; never an evaluation seed
MAX_LR_TRIALS = 7
RHO_GRID = (0.02, 0.05, 0.1, 0.2)
RHO_START = 0.05
WEIGHT_DECAY = 0.01            # decoupled decay of every baseline that has one
EVAL_BATCH = 2000
NOISE_SEED = 12345             # which training labels a noisy workload flips (fixed)
# Half-decade learning-rate ladder: 1e-5, 3.16e-5, ..., 1, 3.16.
LADDER = tuple(float(f"{10 ** (k / 2):.3g}") for k in range(-10, 2))


# ------------------------------------------------------------------ workloads

@dataclass(frozen=True)
class Workload:
    name: str
    dataset: str
    model: str
    batch_size: int
    epochs: int                    # step budget = epochs x steps per epoch, the same for all
    evals_per_epoch: int
    n_train: int | None            # None: all training examples but the validation tail
    n_val: int
    n_test: int | None = None
    metric: str = "accuracy"       # validation metric of the target: "accuracy" or "loss"
    label_noise: float = 0.0       # fraction of training labels flipped to another class
    model_options: dict = field(default_factory=dict)
    data_options: dict = field(default_factory=dict)
    about: str = ""

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"


def _workloads(quick: bool) -> dict[str, Workload]:
    if quick:  # CI: the same code path on tiny budgets, embedded data only
        return {"digits-mlp": Workload(
            "digits-mlp", "digits", "mlp", batch_size=64, epochs=3, evals_per_epoch=2,
            n_train=None, n_val=287, model_options=dict(hidden=(32,)),
            about="CI profile: tiny MLP, three epochs")}
    return {w.name: w for w in (
        Workload("digits-mlp", "digits", "mlp", batch_size=32, epochs=30, evals_per_epoch=1,
                 n_train=None, n_val=287, model_options=dict(hidden=(128, 64)),
                 about="MLP (128, 64) on scikit-learn's 8x8 digits"),
        Workload("fashion-cnn", "fashion-mnist", "cnn", batch_size=128, epochs=5,
                 evals_per_epoch=2, n_train=20000, n_val=2000,
                 model_options=dict(width=16, spatial=7),
                 about="small CNN (two conv stages, width 16) on 20k Fashion-MNIST images"),
        Workload("fashion-noisy", "fashion-mnist", "cnn", batch_size=128, epochs=5,
                 evals_per_epoch=2, n_train=20000, n_val=2000, label_noise=0.3,
                 model_options=dict(width=16, spatial=7),
                 about="the fashion-cnn workload with 30 % of the training labels flipped to "
                       "another class (validation and test labels clean)"),
        Workload("shakespeare-char", "shakespeare", "transformer", batch_size=32, epochs=1,
                 evals_per_epoch=16, n_train=51200, n_val=400, n_test=2000, metric="loss",
                 model_options=dict(d_model=32, n_heads=2, n_layers=2),
                 data_options=dict(seq_len=64),
                 about="2-layer causal transformer (d_model 32) on 64-character windows of "
                       "Shakespeare, next-character cross-entropy"),
    )}


def load_workload_data(w: Workload) -> dict:
    """Train / validation / test tensors (no randomness except the fixed label flips)."""
    train, test = load_dataset(w.dataset, **w.data_options)
    n_all = len(train)
    n_train = w.n_train if w.n_train is not None else n_all - w.n_val
    if n_train + w.n_val > n_all:
        raise ValueError(f"{w.name}: n_train + n_val exceeds the {n_all} training examples")
    x, y = train.inputs[:n_train].clone(), train.targets[:n_train].clone()
    if w.label_noise:
        g = torch.Generator().manual_seed(NOISE_SEED)
        flip = torch.rand(n_train, generator=g) < w.label_noise
        shift = torch.randint(1, train.info.num_classes, (n_train,), generator=g)
        y = torch.where(flip, (y + shift) % train.info.num_classes, y)
    n_test = w.n_test if w.n_test is not None else len(test)
    return dict(info=train.info, train=(x, y),
                val=(train.inputs[n_all - w.n_val:].clone(), train.targets[n_all - w.n_val:].clone()),
                test=(test.inputs[:n_test].clone(), test.targets[:n_test].clone()))


def workload_sizes(w: Workload, data: dict) -> dict:
    n = int(data["train"][0].shape[0])
    per_epoch = steps_per_epoch(n, w.batch_size)
    sizes = dict(train=n, val=int(data["val"][0].shape[0]), test=int(data["test"][0].shape[0]),
                 steps_per_epoch=per_epoch, steps=per_epoch * w.epochs,
                 eval_every=max(1, per_epoch // w.evals_per_epoch))
    if data["info"].kind == "text":
        sizes["chars_per_example"] = int(data["train"][0].shape[1])
    return sizes


# ------------------------------------------------------------------ candidates

@dataclass(frozen=True)
class Candidate:
    name: str
    build: Callable[[Iterable[torch.Tensor], float, float], torch.optim.Optimizer]
    lr_start: float                # centre of the first three ladder points
    sam: bool = False              # two gradient evaluations per step
    tune_rho: bool = False
    settings: dict = field(default_factory=dict)

    @property
    def grad_evals_per_step(self) -> int:
        return 2 if self.sam else 1


def _pt(name: str):
    import pytorch_optimizer
    return getattr(pytorch_optimizer, name)


# The NeuroOptima configurations compared: the constructor defaults (Adan, decay 0.01, SAM and
# Lookahead off: the configuration these runs found fastest, see suite_report.recommendation),
# SAM and Lookahead switched on (the defaults before that choice) and Lookahead alone.
SAM_LOOKAHEAD = dict(sam_rho=0.05, lookahead_k=5, weight_decay=0.0)
LOOKAHEAD = dict(sam_rho=0.0, lookahead_k=5, weight_decay=0.0)
NEURO_CONFIGS = {"NeuroOptima default": {}, "NeuroOptima Lookahead": LOOKAHEAD,
                 "NeuroOptima SAM+Lookahead": SAM_LOOKAHEAD}


def constructor_defaults() -> dict[str, object]:
    """NeuroOptima's defaults for the settings the configurations above vary."""
    params = inspect.signature(NeuroOptima).parameters
    defaults = {name: params[name].default for name in ("lr", *SAM_LOOKAHEAD)}
    if defaults["lr"] is None:  # the default rule's own rate
        defaults["lr"] = RULE_LR[params["update"].default]
    return defaults


def _neuro(name: str, settings: dict) -> Candidate:
    return Candidate(name, lambda p, lr, rho: NeuroOptima(p, lr=lr, **settings), 1e-3,
                     sam=settings.get("sam_rho", constructor_defaults()["sam_rho"]) > 0,
                     settings=dict(settings) or dict(note="constructor defaults, LR tuned"))


def _candidates() -> dict[str, Candidate]:
    cands = [
        Candidate("AdamW", lambda p, lr, rho: torch.optim.AdamW(p, lr=lr,
                                                                 weight_decay=WEIGHT_DECAY),
                  1e-3, settings=dict(weight_decay=WEIGHT_DECAY, source="torch")),
        *(_neuro(name, settings) for name, settings in NEURO_CONFIGS.items()),
        Candidate("SAM(AdamW)", lambda p, lr, rho: _pt("SAM")(p, torch.optim.AdamW, rho=rho,
                                                              lr=lr, weight_decay=WEIGHT_DECAY),
                  1e-3, sam=True, tune_rho=True,
                  settings=dict(weight_decay=WEIGHT_DECAY, source="pytorch_optimizer")),
        Candidate("Adan", lambda p, lr, rho: _pt("Adan")(p, lr=lr, weight_decay=WEIGHT_DECAY),
                  3.16e-3, settings=dict(weight_decay=WEIGHT_DECAY, source="pytorch_optimizer")),
        Candidate("Lion", lambda p, lr, rho: _pt("Lion")(p, lr=lr, weight_decay=WEIGHT_DECAY),
                  3.16e-4, settings=dict(weight_decay=WEIGHT_DECAY, source="pytorch_optimizer")),
        Candidate("SGD+momentum", lambda p, lr, rho: torch.optim.SGD(p, lr=lr, momentum=0.9),
                  0.1, settings=dict(momentum=0.9, weight_decay=0.0, source="torch")),
    ]
    return {c.name: c for c in cands}


CANDIDATES = _candidates()
# Order of the work: the most decision-relevant rows first.
PRIORITY = tuple(CANDIDATES)


# ------------------------------------------------------------------ one run

@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """Accuracy and mean cross-entropy; for text over every next-character position."""
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for lo in range(0, inputs.shape[0], EVAL_BATCH):
        logits = model(inputs[lo:lo + EVAL_BATCH])
        flat = logits.reshape(-1, logits.shape[-1])
        y = targets[lo:lo + EVAL_BATCH].reshape(-1)
        loss_sum += float(nnf.cross_entropy(flat, y, reduction="sum"))
        correct += int((flat.argmax(-1) == y).sum())
        total += y.numel()
    model.train()
    loss = loss_sum / total
    return dict(acc=correct / total, loss=loss if math.isfinite(loss) else None)


def _metric(w: Workload, ev: dict) -> float | None:
    return ev["acc"] if w.metric == "accuracy" else ev["loss"]


def run_key(workload: str, candidate: str, lr: float, rho: float | None, seed: int) -> str:
    return f"{workload}|{candidate}|lr={lr:g}|rho={'-' if rho is None else f'{rho:g}'}|seed={seed}"


def run_one(w: Workload, cand: Candidate, lr: float, rho: float | None, seed: int,
            data: dict) -> dict:
    torch.manual_seed(seed)
    model = build_model(w.model, data["info"], **w.model_options)
    opt = cand.build(model.parameters(), lr, rho if rho is not None else RHO_START)
    x_all, y_all = data["train"]
    sizes = workload_sizes(w, data)
    n, per_epoch, budget, every = (sizes["train"], sizes["steps_per_epoch"], sizes["steps"],
                                   sizes["eval_every"])
    half = budget // 2
    losses: list[float] = []
    curve: list[list] = []          # [step, cpu seconds of training, validation metric]
    test_half = test_final = None
    cpu, step, diverged = 0.0, 0, False
    wall0 = time.perf_counter()
    for epoch in range(w.epochs):
        perm = epoch_permutation(n, seed, epoch)
        for b in range(per_epoch):
            idx = perm[b * w.batch_size:(b + 1) * w.batch_size]
            t0 = time.process_time()
            loss = _train_step(model, opt, cand, x_all[idx], y_all[idx])
            cpu += time.process_time() - t0
            step += 1
            losses.append(loss)
            diverged = not math.isfinite(loss)
            if step % every == 0 or step == budget or diverged:
                value = None if diverged else _metric(w, evaluate(model, *data["val"]))
                curve.append([step, round(cpu, 3), value])
            if step == half and not diverged:
                test_half = evaluate(model, *data["test"])
            if diverged:
                break
        if diverged:
            break
    if not diverged:
        test_final = evaluate(model, *data["test"])
    tail = [v for v in losses[-max(2, budget // 10):] if math.isfinite(v)]
    return dict(
        key=run_key(w.name, cand.name, lr, rho if cand.tune_rho else None, seed),
        workload=w.name, candidate=cand.name, lr=lr, rho=rho if cand.tune_rho else None,
        seed=seed, phase="search" if seed == SELECTION_SEED else "seed",
        steps=step, budget_steps=budget, steps_per_epoch=per_epoch,
        grad_evals_per_step=cand.grad_evals_per_step, diverged=diverged,
        cpu_s=round(cpu, 3), wall_s=round(time.perf_counter() - wall0, 3), curve=curve,
        test_half=test_half, test_final=test_final,
        train_loss_tail_mean=statistics.fmean(tail) if tail and not diverged else None,
        train_loss_tail_var=statistics.pvariance(tail) if len(tail) > 1 and not diverged
        else None)


# ------------------------------------------------------------------ store

class Store:
    """One JSON line per run in ``<folder>/<workload>.jsonl``; later lines win on equal keys."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.records: dict[str, dict] = {}
        for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            text = path.read_text()
            lines = text.split("\n")
            # The last piece is "" after a complete record, or a line still being written.
            for line in lines[:-1]:
                if line.strip():
                    rec = json.loads(line)
                    self.records[rec["key"]] = rec

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, rec: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{rec['workload']}.jsonl", "a") as f:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[rec["key"]] = rec


def load_records(folder: Path = RESULTS) -> list[dict]:
    return list(Store(folder).records.values())


# ------------------------------------------------------------------ protocol

def score(w: Workload, rec: dict) -> float:
    """Final validation metric, higher better (loss negated); diverged: -inf."""
    value = rec["curve"][-1][2] if rec["curve"] else None
    if rec["diverged"] or value is None:
        return -math.inf
    return value if w.higher_is_better else -value


def ladder_index(lr: float) -> int:
    return min(range(len(LADDER)), key=lambda i: abs(math.log(LADDER[i] / lr)))


def choose_lr(w: Workload, search: dict[float, dict]) -> tuple[float, bool]:
    """(best LR among the tried ones, whether it sits at an edge of the tried range)."""
    best = max(sorted(search), key=lambda lr: score(w, search[lr]))
    return best, best in (min(search), max(search))


class OutOfTime(Exception):
    pass


class Suite:
    def __init__(self, workloads: dict[str, Workload], store: Store, seeds: int,
                 deadline: float | None, bar: tqdm | None = None, profile: str = "full") -> None:
        self.workloads, self.store, self.seeds, self.profile = workloads, store, seeds, profile
        self.deadline, self.bar = deadline, bar
        self._data: tuple[str, dict] | None = None
        self.ran = 0

    def data(self, w: Workload) -> dict:
        if self._data is None or self._data[0] != w.name:
            self._data = (w.name, load_workload_data(w))
        return self._data[1]

    def run(self, w: Workload, cand: Candidate, lr: float, rho: float | None, seed: int) -> dict:
        key = run_key(w.name, cand.name, lr, rho if cand.tune_rho else None, seed)
        rec = self.store.get(key)
        if rec is not None:
            return rec
        if self.deadline is not None and time.time() > self.deadline:
            raise OutOfTime
        if self.bar is not None:
            self.bar.set_postfix_str(f"{w.name} {cand.name} lr={lr:g} seed={seed}")
        rec = run_one(w, cand, lr, rho, seed, self.data(w))
        rec["profile"] = self.profile
        rec["environment"] = dict(torch=torch.__version__, python=platform.python_version(),
                                  threads=torch.get_num_threads())
        self.store.add(rec)
        self.ran += 1
        if self.bar is not None:
            self.bar.update()
        return rec

    def tune(self, w: Workload, cand: Candidate) -> tuple[float, float | None]:
        rho = RHO_START if cand.tune_rho else None
        centre = ladder_index(cand.lr_start)
        todo = [centre - 1, centre, centre + 1]
        search: dict[float, dict] = {}
        while todo:
            for i in todo:
                if 0 <= i < len(LADDER):
                    search[LADDER[i]] = self.run(w, cand, LADDER[i], rho, SELECTION_SEED)
            best, edge = choose_lr(w, search)
            i = ladder_index(best)
            todo = []
            if edge and len(search) < MAX_LR_TRIALS:
                nxt = i - 1 if best == min(search) else i + 1
                if 0 <= nxt < len(LADDER) and LADDER[nxt] not in search:
                    todo = [nxt]
        lr = choose_lr(w, search)[0]
        if cand.tune_rho:
            by_rho = {r: self.run(w, cand, lr, r, SELECTION_SEED) for r in RHO_GRID}
            rho = max(RHO_GRID, key=lambda r: score(w, by_rho[r]))
        return lr, rho

    def evaluate(self, w: Workload, cand: Candidate) -> None:
        lr, rho = self.tune(w, cand)
        for seed in range(self.seeds):
            self.run(w, cand, lr, rho, seed)


def plan(workloads: dict[str, Workload], candidates: list[str]) -> list[tuple[str, str]]:
    """(workload, candidate) in the order of the work: every candidate on the cheapest workload
    first, then candidate by candidate (priority order) over the remaining workloads."""
    names = list(workloads)
    order = [(names[0], c) for c in candidates]
    order += [(wl, c) for c in candidates for wl in names[1:]]
    return order


def estimate_runs(n_pairs: int, seeds: int) -> int:
    return n_pairs * (3 + 1 + seeds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["full", "quick"], default="full")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"record folder (full: default {RESULTS.relative_to(ROOT)}; "
                             f"quick: default a new temporary folder)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="workload and/or candidate names to run (others are skipped)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="start no new run after this many minutes")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    quick = args.profile == "quick"
    workloads = _workloads(quick)
    seeds = args.seeds or (2 if quick else 5)
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="neurooptima-suite-")) if quick else RESULTS
    if quick and out.resolve() == RESULTS.resolve():
        parser.error("--profile quick must not write into the committed results")
    only = set(args.only or [])
    unknown = only - set(workloads) - set(CANDIDATES)
    if unknown:
        parser.error(f"--only: unknown names {sorted(unknown)}; workloads {list(workloads)}, "
                     f"candidates {list(CANDIDATES)}")
    wl_filter = {n for n in only if n in workloads} or set(workloads)
    cand_filter = {n for n in only if n in CANDIDATES} or set(CANDIDATES)
    pairs = [(wl, c) for wl, c in plan(workloads, list(PRIORITY))
             if wl in wl_filter and c in cand_filter]
    torch.set_num_threads(args.threads)
    store = Store(out)
    deadline = time.time() + 60 * args.budget_minutes if args.budget_minutes else None
    total = estimate_runs(len(pairs), seeds)
    # Records of the selected (workload, candidate) pairs only, so that a run restricted with
    # --only starts its bar where that part of the suite stands.
    selected = set(pairs)
    done_before = sum((r["workload"], r["candidate"]) in selected for r in store.records.values())
    with tqdm(total=total, initial=min(done_before, total), desc=f"suite ({args.profile})",
              unit="run", dynamic_ncols=True, mininterval=5) as bar:
        suite = Suite(workloads, store, seeds, deadline, bar, args.profile)
        try:
            for wl, c in pairs:
                suite.evaluate(workloads[wl], CANDIDATES[c])
        except OutOfTime:
            print(f"\n[suite] --budget-minutes reached after {suite.ran} new runs; "
                  f"rerun the same command to continue", flush=True)
    print(f"[suite] {suite.ran} new runs, {len(store.records)} records in {out}", flush=True)
    meta = dict(profile=args.profile, seeds=seeds, workloads={
        name: asdict(w) for name, w in workloads.items()})
    (out / "suite_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
