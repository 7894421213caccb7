"""Time-to-target suite: workloads that train to real accuracy, every candidate trained the way
people train (linear warm-up, cosine decay) on the same budget of gradient evaluations, tuned
until its best learning rate (and rho) is interior, one stored record per run.

    python benchmarks/suite.py                          # run (or resume) the full suite
    python benchmarks/suite.py --budget-minutes 30      # start no new run after 30 minutes
    python benchmarks/suite.py --only fashion-2k AdamW  # only these workloads / candidates
    python benchmarks/suite.py --profile quick          # CI: tiny budgets, a temporary folder

Protocol (the same for every candidate; AlgoPerf-style, sized for two CPU cores):

1. Budget: a workload's budget is ``epochs x steps per epoch`` gradient evaluations, the same
   for every candidate. A candidate that evaluates more than one gradient on some steps gets
   fewer steps (SAM on every step: half; SAM on every k-th step: k/(k+1); SAM from a fraction f
   of its steps on: 1/(2-f)), the most whose gradient evaluations fit the budget. Its learning
   rate follows its own schedule over its own steps: linear warm-up over the first 5 %, then
   cosine decay to 0 at its last step (tuning runs too). Gradient evaluations are counted
   (``training_step.train_step``), never assumed.
2. Learning rate: runs with the selection seed (1000) over the whole budget on a ladder of
   half-decade points (..., 1e-3, 3.16e-3, 1e-2, ...). It starts with three points around the
   candidate's usual value and widens by one point beyond whichever edge holds the best final
   validation metric, until the best is interior or ``MAX_LR_TRIALS`` points have run (a
   diverged run scores worst). Candidates with a rho then search ``RHO_LADDER`` the same way at
   the chosen learning rate (three points around their usual rho, widened until interior, at
   most ``MAX_RHO_TRIALS``). The tuning budget is the same for every candidate with a rho.
   Ties go to the smallest tied value inside the tried range, else to the smaller edge; a
   resumed search chooses from every recorded point.
3. Evaluation: seeds 0..``seeds - 1`` at the chosen setting, the whole budget; the validation
   metric at ``evals`` evenly spaced points of the gradient budget (with the gradient
   evaluations and CPU seconds of training so far), the test metric at the fractions
   ``test_at`` of the budget and at the end, the training metric at the end (the
   generalization gap). Candidates that hold an ascent point between steps (momentum ascent,
   MSAM) are evaluated at w: ``optimizer.eval()`` before, ``optimizer.train()`` after.
4. Candidates: every one on every workload, except the sharpness-aware forms with Lookahead,
   which run only where Lookahead pays (``lookahead_pays``), and the bfloat16-state
   comparison, which runs on the workloads its candidate names (``Candidate.only_on``).

Every run is one JSON line in ``<out>/<workload>.jsonl`` (default
``benchmarks/results/suite_cosine``), keyed by (workload, candidate, lr, rho, seed); a run
whose record exists is never repeated, so the suite is built in several sittings and any part
can be re-run by deleting its lines. Targets, times to target, verdicts and plots are computed
from the records (``suite_analysis.py``, ``suite_verdicts.py``, ``suite_charts.py``; written
out by ``report.py``), never stored. A candidate whose
NeuroOptima arguments the installed NeuroOptima does not accept is skipped with a line saying
which.

The parts it runs have their own modules: the workloads and their data in
``suite_workloads.py``, the candidates and their step plans in ``suite_candidates.py``, the
tuning rules (ladders, ``score``, ``choose``, ``widen``, ``lookahead_pays``) in
``suite_protocol.py``; this file runs them and stores the records.

CPU seconds are the process's CPU time spent in training steps (``time.process_time``, one
thread), which a loaded shared machine disturbs far less than wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):  # run as a script: launch/ and siblings importable
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from launch.data import epoch_permutation  # noqa: E402
from launch.models import build_model  # noqa: E402
from suite_candidates import CANDIDATES, LOOKAHEAD, PLAIN, PRIORITY, Candidate  # noqa: E402
from suite_protocol import (LADDER, MAX_LR_TRIALS, MAX_RHO_TRIALS, RHO_LADDER,  # noqa: E402
                            SELECTION_SEED, choose, lookahead_pays, widen)
from suite_workloads import (Workload, load_workload_data, workload_sizes,  # noqa: E402
                             workloads_for)
from training_step import augment, loss_fn, train_step, warmup_cosine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "suite_cosine"
EVAL_BATCH = 2000
TRAIN_EVAL = 5000              # training examples the final training metric is measured on
AUGMENT_SEED = 4242            # augmentation draws: a function of the run's seed only


# ------------------------------------------------------------------ one run

@contextmanager
def at_w(opt: torch.optim.Optimizer, cand: Candidate) -> Iterator[None]:
    """The model at w while inside (an optimizer that holds an ascent point moves it)."""
    if not cand.moves_weights:
        yield
        return
    opt.eval()
    try:
        yield
    finally:
        opt.train()


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """Accuracy and mean cross-entropy; for text over every next-character position."""
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for lo in range(0, inputs.shape[0], EVAL_BATCH):
        logits = model(inputs[lo:lo + EVAL_BATCH])
        flat = logits.reshape(-1, logits.shape[-1])
        y = targets[lo:lo + EVAL_BATCH].reshape(-1)
        loss_sum += float(loss_fn(flat, y)) * y.numel()
        correct += int((flat.argmax(-1) == y).sum())
        total += y.numel()
    model.train()
    loss = loss_sum / total
    return dict(acc=correct / total, loss=loss if math.isfinite(loss) else None)


def _metric(w: Workload, ev: dict) -> float | None:
    return ev["acc"] if w.metric == "accuracy" else ev["loss"]


def run_key(workload: str, candidate: str, lr: float, rho: float | None, seed: int) -> str:
    return f"{workload}|{candidate}|lr={lr:g}|rho={'-' if rho is None else f'{rho:g}'}|seed={seed}"


def _marks(budget: int, fractions: Iterable[float]) -> list[int]:
    return sorted({max(1, math.ceil(budget * f - 1e-9)) for f in fractions})


def run_one(w: Workload, cand: Candidate, lr: float, rho: float | None, seed: int,
            data: dict) -> dict:
    torch.manual_seed(seed)
    model = build_model(w.model, data["info"], **w.model_options)
    sizes = workload_sizes(w, data)
    n, per_epoch, budget = sizes["train"], sizes["steps_per_epoch"], sizes["budget"]
    plan = cand.plan(budget)
    opt = cand.build(model.parameters(), lr, rho if cand.tune_rho else None, plan)
    x_all, y_all = data["train"]
    gen = torch.Generator().manual_seed(AUGMENT_SEED + seed)
    val_marks = _marks(budget, [i / w.evals for i in range(1, w.evals + 1)])
    test_marks = _marks(budget, [f for f in w.test_at if f < 1])
    losses: list[float] = []
    curve: list[list] = []          # [step, gradient evaluations, CPU s of training, val metric]
    tests: list[list] = []          # [step, gradient evaluations, CPU s, test acc, test loss]
    cpu, step, spent, epoch, diverged = 0.0, 0, 0, 0, False
    wall0 = time.perf_counter()
    while step < plan.steps and not diverged:
        perm = epoch_permutation(n, seed, epoch)
        epoch += 1
        for b in range(per_epoch):
            if step >= plan.steps:
                break
            idx = perm[b * w.batch_size:(b + 1) * w.batch_size]
            x = x_all[idx]
            if w.augment:
                x = augment(x, w.augment.get("pad", 0), w.augment.get("flip", False),
                            data["fill"], gen)
            factor = warmup_cosine(step, plan.steps, plan.warmup)
            for group in opt.param_groups:
                group["lr"] = lr * factor
            t0 = time.process_time()
            loss, used = train_step(model, opt, x, y_all[idx], cand.two_pass)
            cpu += time.process_time() - t0
            step += 1
            spent += used
            losses.append(loss)
            diverged = not math.isfinite(loss)
            last = step == plan.steps
            if diverged or last or (val_marks and spent >= val_marks[0]):
                while val_marks and spent >= val_marks[0]:
                    val_marks.pop(0)
                with at_w(opt, cand):
                    value = None if diverged else _metric(w, evaluate(model, *data["val"]))
                curve.append([step, spent, round(cpu, 3), value])
            if not diverged and not last and test_marks and spent >= test_marks[0]:
                while test_marks and spent >= test_marks[0]:
                    test_marks.pop(0)
                with at_w(opt, cand):
                    ev = evaluate(model, *data["test"])
                tests.append([step, spent, round(cpu, 3), ev["acc"], ev["loss"]])
            if diverged:
                break
    test_final = train_final = None
    if not diverged:
        with at_w(opt, cand):
            test_final = evaluate(model, *data["test"])
            xs, ys = data["train_clean"]
            train_final = evaluate(model, xs[:TRAIN_EVAL], ys[:TRAIN_EVAL])
        tests.append([step, spent, round(cpu, 3), test_final["acc"], test_final["loss"]])
    tail = [v for v in losses[-max(2, plan.steps // 10):] if math.isfinite(v)]
    return dict(
        key=run_key(w.name, cand.name, lr, rho if cand.tune_rho else None, seed),
        workload=w.name, candidate=cand.name, lr=lr, rho=rho if cand.tune_rho else None,
        seed=seed, phase="search" if seed == SELECTION_SEED else "seed",
        protocol="warmup-cosine", budget=budget, steps=step, planned_steps=plan.steps,
        warmup_steps=plan.warmup, sam_start=plan.sam_start, grad_evals=spent,
        steps_per_epoch=per_epoch, diverged=diverged,
        cpu_s=round(cpu, 3), wall_s=round(time.perf_counter() - wall0, 3), curve=curve,
        tests=tests, test_final=test_final, train_final=train_final,
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
            for number, line in enumerate(lines[:-1], 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a run killed while writing: it runs again
                    print(f"[suite] {path}:{number}: not a complete record, ignored", flush=True)
                    continue
                self.records[rec["key"]] = rec

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, rec: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{rec['workload']}.jsonl"
        with open(path, "a") as f:
            # After a record cut short by a kill, start a line of its own.
            cut = f.tell() > 0 and not path.read_bytes().endswith(b"\n")
            f.write(("\n" if cut else "") + json.dumps(rec, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[rec["key"]] = rec


def load_records(folder: Path = RESULTS) -> list[dict]:
    return list(Store(folder).records.values())


# ------------------------------------------------------------------ runner

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
            self.bar.set_postfix_str(f"{w.name} {cand.name} lr={lr:g} rho={rho} seed={seed}")
        rec = run_one(w, cand, lr, rho, seed, self.data(w))
        rec["profile"] = self.profile
        rec["environment"] = dict(torch=torch.__version__, python=platform.python_version(),
                                  threads=torch.get_num_threads())
        self.store.add(rec)
        self.ran += 1
        if self.bar is not None:
            self.bar.update()
        return rec

    def recorded(self, w: Workload, cand: Candidate, **fixed) -> list[dict]:
        """The candidate's search records on this workload with the ``fixed`` lr / rho."""
        return [r for r in self.store.records.values()
                if r["workload"] == w.name and r["candidate"] == cand.name
                and r["phase"] == "search" and all(r[k] == v for k, v in fixed.items())]

    def tune(self, w: Workload, cand: Candidate) -> tuple[float, float | None]:
        rho = cand.rho_start
        search = widen(w, LADDER, cand.lr_start, MAX_LR_TRIALS,
                       lambda lr: self.run(w, cand, lr, rho, SELECTION_SEED),
                       {r["lr"]: r for r in self.recorded(w, cand, rho=rho)})
        lr = choose(w, search)[0]
        if cand.tune_rho:
            by_rho = widen(w, RHO_LADDER, cand.rho_start, MAX_RHO_TRIALS,
                           lambda r: self.run(w, cand, lr, r, SELECTION_SEED),
                           {r["rho"]: r for r in self.recorded(w, cand, lr=lr)})
            rho = choose(w, by_rho)[0]
        return lr, rho

    def evaluate(self, w: Workload, cand: Candidate) -> list[dict]:
        """The candidate's seed runs at its tuned setting (run where not recorded)."""
        lr, rho = self.tune(w, cand)
        return [self.run(w, cand, lr, rho, seed) for seed in range(self.seeds)]

    def due(self, w: Workload, cand: Candidate) -> bool:
        """Whether the candidate runs on this workload at all (a "+ Lookahead" form only
        where Lookahead pays, which needs the two rows it compares first; a row already
        started is finished)."""
        started = any(r["workload"] == w.name and r["candidate"] == cand.name
                      for r in self.store.records.values())
        if not cand.with_lookahead or LOOKAHEAD not in CANDIDATES or started:
            return True
        pays = lookahead_pays(w, self.evaluate(w, CANDIDATES[LOOKAHEAD]),
                              self.evaluate(w, CANDIDATES[PLAIN]))
        if not pays:
            print(f"\n[suite] {w.name}: {cand.name} not run ({LOOKAHEAD} does not end above "
                  f"{PLAIN} on validation)", flush=True)
        return pays


def plan(workloads: dict[str, Workload], candidates: list[str],
         whole: int = 2) -> list[tuple[str, str]]:
    """(workload, candidate) in the order of the work: every candidate on each of the first
    ``whole`` workloads (the cheapest, then the generalization-bound one), then candidate by
    candidate (priority order) over the remaining workloads; a candidate restricted to some
    workloads only on those."""
    names = list(workloads)
    order = [(wl, c) for wl in names[:whole] for c in candidates]
    order += [(wl, c) for c in candidates for wl in names[whole:]]
    return [(wl, c) for wl, c in order
            if not CANDIDATES[c].only_on or wl in CANDIDATES[c].only_on]


def estimate_runs(pairs: list[tuple[str, str]], seeds: int) -> int:
    return sum(3 + 1 + seeds + (4 if CANDIDATES[c].tune_rho else 0) for _, c in pairs)


def available(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(candidates that can run, a line per candidate skipped and why)."""
    ok, skipped = [], []
    for name in names:
        missing = CANDIDATES[name].missing()
        if missing:
            skipped.append(f"[suite] skip {name}: the installed NeuroOptima does not accept "
                           f"{', '.join(missing)}")
        else:
            ok.append(name)
    return ok, skipped


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
    workloads = workloads_for(quick)
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
    runnable, skipped = available(c for c in PRIORITY if c in cand_filter)
    for line in skipped:
        print(line, flush=True)
    pairs = [(wl, c) for wl, c in plan(workloads, runnable) if wl in wl_filter]
    torch.set_num_threads(args.threads)
    store = Store(out)
    deadline = time.time() + 60 * args.budget_minutes if args.budget_minutes else None
    total = estimate_runs(pairs, seeds)
    # Records of the selected (workload, candidate) pairs only, so that a run restricted with
    # --only starts its bar where that part of the suite stands.
    selected = set(pairs)
    done_before = sum((r["workload"], r["candidate"]) in selected for r in store.records.values())
    with tqdm(total=total, initial=min(done_before, total), desc=f"suite ({args.profile})",
              unit="run", dynamic_ncols=True, mininterval=5) as bar:
        suite = Suite(workloads, store, seeds, deadline, bar, args.profile)
        try:
            for wl, c in pairs:
                if suite.due(workloads[wl], CANDIDATES[c]):
                    suite.evaluate(workloads[wl], CANDIDATES[c])
        except OutOfTime:
            print(f"\n[suite] --budget-minutes reached after {suite.ran} new runs; "
                  f"rerun the same command to continue", flush=True)
    print(f"[suite] {suite.ran} new runs, {len(store.records)} records in {out}", flush=True)
    meta = dict(profile=args.profile, seeds=seeds, protocol="warmup-cosine", workloads={
        name: asdict(w) for name, w in workloads.items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
