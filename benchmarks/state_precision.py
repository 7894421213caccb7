"""The report's optimizer-state precision section: the Adan rule alone (no SAM, no Lookahead) with
bfloat16 rule state against the same in float32, from the time-to-target suite's analysis
(``suite_analysis.analyse``). Both rows are ordinary suite candidates (own LR search, same seeds,
same gradient budget), so this module only reads and compares them; the bytes of state are
measured on the optimizers the suite builds, not typed in.
"""

from __future__ import annotations

import torch

import suite_analysis as A
import suite_report as R
import suite_verdicts as V
from suite_candidates import CANDIDATES, PLAIN, STATE_BF16
from suite_workloads import Workload

FULL, REDUCED = PLAIN, STATE_BF16


def rule_state(name: str) -> dict:
    """The update rule's buffers in candidate ``name``'s optimizer after one step on a float32
    layer: rule, buffer names, their dtype and the bytes they take per parameter element."""
    cand = CANDIDATES[name]
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    opt = cand.build(layer.parameters(), 1e-3, None, cand.plan(1))
    layer(torch.ones(2, 4)).square().sum().backward()
    opt.step()
    rule = opt.param_groups[0]["update"]
    bufs = {k: v for k, v in opt.state[layer.weight].items() if k.startswith(rule + ".")}
    dtypes = {v.dtype for v in bufs.values()}
    return dict(rule=rule, buffers=[k[len(rule) + 1:] for k in bufs],
                dtype=str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "mixed",
                bytes_per_param=sum(v.numel() * v.element_size() for v in bufs.values())
                / layer.weight.numel())


def pairs(result: dict) -> list[tuple[str, Workload, dict, dict]]:
    """(workload, spec, default row, bf16-state row) where both rows are complete."""
    out = []
    for name, wl in result["workloads"].items():
        a, b = wl["rows"].get(FULL), wl["rows"].get(REDUCED)
        if a and b and a["complete"] and b["complete"]:
            out.append((name, wl["workload"], a, b))
    return out


def section(result: dict) -> str:
    """Markdown: per workload with both rows complete, the LR each chose, the test metric at
    equal gradient evaluations (bf16 minus default, ± 2 standard errors) and the gradient
    evaluations to target; one line when no workload has both."""
    head = ["### Optimizer state precision", ""]
    found = pairs(result)
    if not found:
        return "\n".join(head + [f"No workload has complete `{FULL}` and `{REDUCED}` rows yet "
                                 f"(it runs on {', '.join(CANDIDATES[REDUCED].only_on)}).",
                                 ""])
    full, reduced = rule_state(FULL), rule_state(REDUCED)
    n = len(reduced["buffers"])
    text = (f"`{REDUCED}` is `{FULL}` with `state_dtype=torch.bfloat16`: the {n} buffers of "
            f"its update rule ({reduced['rule']}: {', '.join(reduced['buffers'])}) are stored "
            f"in {reduced['dtype']}, {reduced['bytes_per_param'] / n:g} bytes per element "
            f"instead of {full['bytes_per_param'] / n:g} ({full['dtype']}), so "
            f"{reduced['bytes_per_param']:g} instead of {full['bytes_per_param']:g} bytes of "
            "rule state per parameter; the step's arithmetic runs in float32. Both rows went "
            "through the suite's protocol above (own LR search, the same seeds and gradient "
            "budget). Difference: bf16 state minus default at equal gradient evaluations, ± two "
            "standard errors (accuracy points, or loss with the sign turned: positive = "
            "better).")
    body, says = [], []
    for name, w, a, b in found:
        key = A._final_key(w, "g")
        d = A.difference(w, b, a, key)
        says.append(A._says(d))
        value = (lambda r: R._pm(r[key])) if w.higher_is_better else \
            (lambda r: R._pm(r[key], 1, 3))
        body.append([name, "accuracy %" if w.higher_is_better else "loss",
                     f"{a['lr']:g} / {b['lr']:g}", f"{value(a)} / {value(b)}",
                     f"{V._pm_diff(w, d)}: {says[-1]}",
                     f"{V._fmt(a['grad_evals_to_target'])} / "
                     f"{V._fmt(b['grad_evals_to_target'])}"])
    table = V._table(["workload", "test metric", "LR default / bf16",
                      "test metric, equal grad. evals, default / bf16 (mean ± std)",
                      "difference ± 2 SE", "grad. evals to target (median), default / bf16"],
                     body)
    tally = "; ".join(f"{word} on {says.count(word)}" for word in
                      ("better", "worse", "no difference beyond noise") if word in says)
    return "\n".join(head + [text, "", table, "",
                             f"bf16 state against the default, of {len(found)} workload(s): "
                             f"{tally}.", ""])
