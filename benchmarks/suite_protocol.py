"""The suite's tuning rules: the selection seed, the learning-rate and rho ladders and how far a
search may widen on them, the score a run is judged by, the choice among the tried points, and
whether Lookahead pays on a workload (which decides where the sharpness-aware forms get a
"+ Lookahead" row).

``suite.py`` applies them while it runs; ``suite_analysis`` applies the same rules to the
records, so the report chooses what the runner chose.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

from suite_workloads import Workload

SELECTION_SEED = 1000          # learning-rate and rho search; never an evaluation seed
MAX_LR_TRIALS = 7
MAX_RHO_TRIALS = 9
# Half-decade learning-rate ladder: 1e-5, 3.16e-5, ..., 1, 3.16.
LADDER = tuple(float(f"{10 ** (k / 2):.3g}") for k in range(-10, 2))
# 1-2-5 rho ladder: SAM's usual radii (0.05) and momentum ascent's (1-3) on one scale, down to
# radii small enough that a search which keeps shrinking rho ends inside it.
RHO_LADDER = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


def score(w: Workload, rec: dict) -> float:
    """Final validation metric, higher better (loss negated); diverged: -inf."""
    value = rec["curve"][-1][-1] if rec["curve"] else None
    if rec["diverged"] or value is None:
        return -math.inf
    return value if w.higher_is_better else -value


def ladder_index(value: float, ladder: tuple[float, ...] = LADDER) -> int:
    return min(range(len(ladder)), key=lambda i: abs(math.log(ladder[i] / value)))


def choose(w: Workload, search: dict[float, dict]) -> tuple[float, bool]:
    """(best value among the tried ones, whether it sits at an edge of the tried range); ties
    go to the smallest value inside the tried range, else to the smaller edge (a flat
    stretch that reaches inside the range needs no wider search)."""
    top = max(score(w, r) for r in search.values())
    tied = sorted(v for v, r in search.items() if score(w, r) == top)
    edges = (min(search), max(search))
    best = next((v for v in tied if v not in edges), tied[0])
    return best, best in edges


choose_lr = choose


def widen(w: Workload, ladder: tuple[float, ...], start: float, max_trials: int,
          run: Callable[[float], dict], known: dict[float, dict] | None = None
          ) -> dict[float, dict]:
    """Three ladder points around ``start``, then one more beyond whichever edge holds the
    best, until the best is interior, the ladder ends or ``max_trials`` points have run.
    ``known``: points already recorded, which every choice takes into account (so a resumed
    search chooses from what the report sees)."""
    centre = ladder_index(start, ladder)
    todo = [centre - 1, centre, centre + 1]
    search: dict[float, dict] = dict(known or {})
    while todo:
        for i in todo:
            if 0 <= i < len(ladder) and ladder[i] not in search:
                search[ladder[i]] = run(ladder[i])
        best, edge = choose(w, search)
        i = ladder_index(best, ladder)
        todo = []
        if edge and len(search) < max_trials:
            nxt = i - 1 if best == min(search) else i + 1
            if 0 <= nxt < len(ladder) and ladder[nxt] not in search:
                todo = [nxt]
    return search


def lookahead_pays(w: Workload, with_lookahead: list[dict], without: list[dict]) -> bool:
    """Whether Lookahead is a contender on a workload: NeuroOptima with it ends at a better
    mean final validation metric over the seeds than NeuroOptima without it. Only there do
    the sharpness-aware forms get a "+ Lookahead" row."""
    return (statistics.fmean(score(w, r) for r in with_lookahead)
            > statistics.fmean(score(w, r) for r in without))

