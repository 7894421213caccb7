"""The report's optimizer-state precision section: NeuroOptima's bf16-state candidate stores its
rule buffers in bfloat16, and the section states what the suite's records say."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import state_precision  # noqa: E402
import suite_analysis  # noqa: E402
import suite_candidates  # noqa: E402
import suite_protocol  # noqa: E402

W = "digits-mlp"  # the quick profile's workload: the bf16 candidate runs on it
BUDGET = 100
GRADS = (25, 50, 75, 100)
SEEDS = 3


def _record(cand: str, lr: float, seed: int, curve: list[float], test_acc: float) -> dict:
    """A run record as suite.run_one writes it, with a chosen validation curve and final test
    accuracy (one step per gradient evaluation)."""
    return dict(workload=W, candidate=cand, lr=lr, rho=None, seed=seed,
                phase="search" if seed == suite_protocol.SELECTION_SEED else "seed", budget=BUDGET,
                steps=BUDGET, grad_evals=BUDGET, steps_per_epoch=50, diverged=False,
                cpu_s=1.0, curve=[[g, g, g / 100, v] for g, v in zip(GRADS, curve)],
                tests=[[BUDGET, BUDGET, 1.0, test_acc, 1 - test_acc]],
                test_final=dict(acc=test_acc, loss=1 - test_acc),
                train_final=dict(acc=1.0, loss=0.0), train_loss_tail_var=0.01)


def _rows(cand: str, lr: float, curve: list[float], accs: list[float]) -> list[dict]:
    """Three LRs searched (``lr`` best and interior), then the seeds at ``lr``."""
    out = [_record(cand, x, suite_protocol.SELECTION_SEED, [v - 0.1 for v in curve], 0.5)
           for x in (lr / 3.16, lr * 3.16)]
    out.append(_record(cand, lr, suite_protocol.SELECTION_SEED, curve, 0.5))
    return out + [_record(cand, lr, s, curve, a) for s, a in enumerate(accs)]


def _result(with_bf16: bool = True) -> dict:
    # AdamW's validation accuracy nearest 85 % of the budget (75 evaluations) is 0.80: the target.
    records = _rows("AdamW", 1e-3, [0.5, 0.7, 0.8, 0.9], [0.90, 0.91, 0.92])
    records += _rows(state_precision.FULL, 3.16e-3, [0.6, 0.85, 0.9, 0.95],
                     [0.93, 0.94, 0.95])
    if with_bf16:
        records += _rows(state_precision.REDUCED, 1e-2, [0.6, 0.7, 0.82, 0.9],
                         [0.89, 0.90, 0.92])
    return suite_analysis.analyse(records, {"profile": "quick", "seeds": SEEDS})


def test_section_states_the_difference_the_records_hold():
    text = state_precision.section(_result())
    row = next(line for line in text.splitlines() if line.startswith(f"| {W} |"))
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    full, reduced = [0.93, 0.94, 0.95], [0.89, 0.90, 0.92]
    # bf16 minus default, two standard errors of the difference of the seed means.
    delta = statistics.fmean(reduced) - statistics.fmean(full)
    band = 2 * math.sqrt(statistics.variance(full) / SEEDS + statistics.variance(reduced) / SEEDS)
    assert delta < -band  # the synthetic records are built to differ beyond noise
    assert cells[2] == "0.00316 / 0.01"
    assert cells[3] == (f"{100 * statistics.fmean(full):.1f} ± {100 * statistics.stdev(full):.1f}"
                        f" / {100 * statistics.fmean(reduced):.1f} ± "
                        f"{100 * statistics.stdev(reduced):.1f}")
    assert cells[4] == f"{100 * delta:+.1f} ± {100 * band:.1f}: worse"
    # Target 0.80: the default first reaches it at 50 gradient evaluations, bf16 at 75.
    assert cells[5] == "50 / 75"
    n = len(state_precision.rule_state(state_precision.FULL)["buffers"])
    assert f"{2 * n} instead of {4 * n} bytes of rule state per parameter" in text
    assert "bf16 state against the default, of 1 workload(s): worse on 1." in text


def test_section_says_when_no_workload_has_both_rows():
    text = state_precision.section(_result(with_bf16=False))
    assert "No workload has complete" in text and "|" not in text


def test_bf16_state_candidate_stores_its_rule_buffers_in_bfloat16():
    cand = suite_candidates.CANDIDATES[suite_candidates.STATE_BF16]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = cand.build(model.parameters(), 1e-3, None, cand.plan(10))
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    rule = opt.param_groups[0]["update"]
    buffers = {k: v for k, v in opt.state[model.weight].items() if k.startswith(rule + ".")}
    assert buffers and all(v.dtype == torch.bfloat16 for v in buffers.values()), \
        {k: v.dtype for k, v in buffers.items()}
    assert model.weight.dtype == torch.float32
    # What the section reports: 2 bytes per buffer element against the default's 4.
    reduced = state_precision.rule_state(suite_candidates.STATE_BF16)
    full = state_precision.rule_state(state_precision.FULL)
    assert (reduced["dtype"], full["dtype"]) == ("bfloat16", "float32")
    assert reduced["bytes_per_param"] == 2 * len(buffers)
    assert full["bytes_per_param"] == 4 * len(buffers)
