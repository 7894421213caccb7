"""Parity: each component alone, and all of them together, against independent references.

First reference: ``references.py``, written from the published equations (DESIGN.md section 2).
Second reference: ``pytorch_optimizer``, where its conventions coincide with ours (each test says
which). 50 steps on a small MLP with three param groups of different hyperparameters; float32
within 1e-6 and float64 within 1e-12, relative to each tensor's largest magnitude.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import pytorch_optimizer as po

import references as ref
from neurooptima import NeuroOptima
from neurooptima.lookahead import lookahead_sync_
from neurooptima.norms import local_norm_stats, norm_from_stats
from neurooptima.sam import norm_terms, perturb_
from problems import REL_TOL, assert_rel_close, leaf_copies, make_closure, mlp_problem, split_groups

STEPS = 50
DTYPES = [torch.float32, torch.float64]

# Three groups with different lr, weight decay and betas (code order per rule).
GROUP_OPTIONS = {
    "adan": [dict(lr=0.02, weight_decay=0.05, betas=(0.98, 0.92, 0.99)),
             dict(lr=0.005, weight_decay=0.0, betas=(0.9, 0.8, 0.999), eps=1e-6),
             dict(lr=0.03, weight_decay=0.2, betas=(0.95, 0.9, 0.98))],
    "lion": [dict(lr=0.003, weight_decay=0.1, betas=(0.9, 0.99)),
             dict(lr=0.001, weight_decay=0.0, betas=(0.95, 0.98)),
             dict(lr=0.005, weight_decay=0.3, betas=(0.8, 0.999))],
    "lion_adan": [dict(lr=0.003, weight_decay=0.1, betas=(0.98, 0.92)),
                  dict(lr=0.001, weight_decay=0.0, betas=(0.9, 0.8)),
                  dict(lr=0.005, weight_decay=0.3, betas=(0.95, 0.99))],
}
SAM_OPTIONS = [dict(sam_rho=0.05), dict(sam_rho=0.1, sam_eta=0.05), dict(sam_rho=0.02)]
LOOKAHEAD_OPTIONS = [dict(lookahead_k=5, lookahead_alpha=0.5),
                     dict(lookahead_k=3, lookahead_alpha=0.8),
                     dict(lookahead_k=1, lookahead_alpha=0.3)]
SGD_LRS = [0.1, 0.03, 0.2]


def merged(*option_lists: list[dict]) -> list[dict]:
    return [{k: v for opts in per_group for k, v in opts.items()}
            for per_group in zip(*option_lists)]


def run_pair(dtype, options: list[dict], **shared) -> None:
    """NeuroOptima and the composed reference, 50 steps each from the same start."""
    init, loss_fn = mlp_problem(dtype)
    ours, theirs = leaf_copies(init), leaf_copies(init)
    opt = NeuroOptima(split_groups(ours, options), **shared)
    reference = ref.ReferenceOptimizer(split_groups(theirs, options), **shared)
    for _ in range(STEPS):
        opt.step(make_closure(ours, loss_fn))
        reference.step(make_closure(theirs, loss_fn))
    assert_rel_close(ours, theirs, REL_TOL[dtype])
    assert all(g["skipped_steps"] == 0 for g in opt.param_groups)
    # The trajectory really moved (a frozen optimizer would trivially match a frozen reference).
    assert all(not torch.equal(p, q) for p, q in zip(ours, init))


def test_reference_defaults_are_neurooptimas():
    """A missing option means the same in both, so a run_pair case cannot drift with a default."""
    signature = inspect.signature(NeuroOptima.__init__).parameters
    assert ref.ReferenceOptimizer.DEFAULTS == {name: signature[name].default
                                               for name in ref.ReferenceOptimizer.DEFAULTS}


# ------------------------------------------------------------------------- each rule alone

RULE_CASES = [("adan", False), ("adan", True), ("lion", False), ("lion_adan", False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("update,no_prox", RULE_CASES)
def test_rule_alone_matches_reference(update, no_prox, dtype):
    run_pair(dtype, GROUP_OPTIONS[update], update=update, no_prox=no_prox, sam_rho=0.0,
             lookahead_k=0)


def test_adan_pair_betas_mean_first_and_second_moment():
    # The README's betas=(0.9, 0.999): first and second moment, difference decay beta_diff.
    options = [dict(lr=0.01, betas=(0.9, 0.999)), dict(lr=0.01, betas=(0.9, 0.999),
                                                         beta_diff=0.7), dict(lr=0.02)]
    run_pair(torch.float64, options, sam_rho=0.0, lookahead_k=0, weight_decay=0.01)


# ------------------------------------------------------------------------- SAM / ASAM over SGD


def sam_sgd_library(params, closure, sgd, rhos, adaptive, etas) -> None:
    """One SAM step built from neurooptima.sam / neurooptima.norms around a plain SGD step."""
    closure()
    with torch.no_grad():
        groups = [[p for p in g["params"] if p.grad is not None] for g in sgd.param_groups]
        terms = []
        for ps, a, eta in zip(groups, adaptive, etas):
            terms += norm_terms(ps, [p.grad for p in ps], adaptive=a, eta=eta)
        norm, finite = norm_from_stats(local_norm_stats(terms))
        assert finite
        saved = [p.clone() for p in params]
        for ps, rho, a, eta in zip(groups, rhos, adaptive, etas):
            perturb_(ps, [p.grad for p in ps], rho=rho, norm=norm, adaptive=a, eta=eta)
    closure()
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
    sgd.step()


def sam_sgd_reference(params, closure, lrs, rhos, adaptive, etas) -> None:
    """w <- w - lr * grad(w + e), e from the SAM / ASAM equations."""
    closure()
    sizes = [1, 2, 1]
    per_tensor = lambda values: [v for v, n in zip(values, sizes) for _ in range(n)]  # noqa: E731
    with torch.no_grad():
        e = ref.sam_perturbations(params, [p.grad for p in params], per_tensor(rhos),
                                  adaptive=per_tensor(adaptive), etas=per_tensor(etas))
        saved = [p.clone() for p in params]
        for p, ei in zip(params, e):
            p.copy_(p + ei)
    closure()
    with torch.no_grad():
        for p, w, lr in zip(params, saved, per_tensor(lrs)):
            p.copy_(w - lr * p.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_sam_over_sgd_matches_reference(adaptive, dtype):
    init, loss_fn = mlp_problem(dtype)
    ours, theirs = leaf_copies(init), leaf_copies(init)
    rhos, etas, flags = [0.05, 0.1, 0.02], [0.01, 0.05, 0.01], [adaptive] * 3
    sgd = torch.optim.SGD(split_groups(ours, [dict(lr=lr) for lr in SGD_LRS]))
    for _ in range(STEPS):
        sam_sgd_library(ours, make_closure(ours, loss_fn), sgd, rhos, flags, etas)
        sam_sgd_reference(theirs, make_closure(theirs, loss_fn), SGD_LRS, rhos, flags, etas)
    assert_rel_close(ours, theirs, REL_TOL[dtype])


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_sam_differs_from_plain_sgd(adaptive):
    # Guard for the test above: the perturbation changes the trajectory measurably.
    init, loss_fn = mlp_problem(torch.float64)
    sam_params, sgd_params = leaf_copies(init), leaf_copies(init)
    sgd = torch.optim.SGD(split_groups(sam_params, [dict(lr=lr) for lr in SGD_LRS]))
    plain = torch.optim.SGD(split_groups(sgd_params, [dict(lr=lr) for lr in SGD_LRS]))
    for _ in range(5):
        sam_sgd_library(sam_params, make_closure(sam_params, loss_fn), sgd, [0.05] * 3,
                        [adaptive] * 3, [0.01] * 3)
        make_closure(sgd_params, loss_fn)()
        plain.step()
    assert (sam_params[0] - sgd_params[0]).abs().max() > 1e-4


# ------------------------------------------------------------------------- Lookahead


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lookahead_over_sgd_matches_reference(dtype):
    init, loss_fn = mlp_problem(dtype)
    ours, theirs = leaf_copies(init), leaf_copies(init)
    sgd = torch.optim.SGD(split_groups(ours, [dict(lr=lr) for lr in SGD_LRS]))
    slow = [p.detach().clone() for p in ours]
    k, alpha = 4, 0.6
    ref_slow = [p.detach().clone() for p in theirs]
    for step in range(1, STEPS + 1):
        make_closure(ours, loss_fn)()
        sgd.step()
        if step % k == 0:
            with torch.no_grad():
                lookahead_sync_(ours, slow, alpha=alpha)
        make_closure(theirs, loss_fn)()
        with torch.no_grad():
            for i, (p, lr) in enumerate(zip(theirs, [0.1, 0.03, 0.03, 0.2])):
                p.copy_(p - lr * p.grad)
                if step % k == 0:
                    ref_slow[i] = ref.lookahead_sync(p, ref_slow[i], alpha)
                    p.copy_(ref_slow[i])
    assert_rel_close(ours, theirs, REL_TOL[dtype])
    assert_rel_close(slow, ref_slow, REL_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("update", ["adan", "lion", "lion_adan"])
def test_neurooptima_lookahead_alone_matches_reference(update, dtype):
    run_pair(dtype, merged(GROUP_OPTIONS[update], LOOKAHEAD_OPTIONS), update=update,
             sam_rho=0.0)


# ------------------------------------------------------------------------- everything on

FULL_CASES = [("adan", False, False, None), ("adan", True, True, None),
              ("adan", False, True, 0.05), ("lion", False, False, None),
              ("lion", True, False, 0.05), ("lion_adan", False, False, None),
              ("lion_adan", True, False, None)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("update,adaptive,no_prox,max_grad_norm", FULL_CASES)
def test_everything_on_matches_composed_reference(update, adaptive, no_prox, max_grad_norm,
                                                  dtype):
    """SAM (or ASAM) + Lookahead + the rule, optionally with clipping, vs the composition."""
    options = merged(GROUP_OPTIONS[update], SAM_OPTIONS, LOOKAHEAD_OPTIONS)
    run_pair(dtype, options, update=update, sam_adaptive=adaptive, no_prox=no_prox,
             max_grad_norm=max_grad_norm)


def test_clipping_is_active_in_the_clipped_case():
    # Guard: with max_grad_norm=0.05 the clipped run differs from the unclipped one.
    init, loss_fn = mlp_problem(torch.float64)
    a, b = leaf_copies(init), leaf_copies(init)
    opt_a = NeuroOptima(a, lr=0.01, max_grad_norm=0.05)
    opt_b = NeuroOptima(b, lr=0.01)
    for _ in range(3):
        opt_a.step(make_closure(a, loss_fn))
        opt_b.step(make_closure(b, loss_fn))
    assert not torch.equal(a[0], b[0])


# ------------------------------------------------------------------------- pytorch_optimizer


def po_groups(params, update):
    return split_groups(params, GROUP_OPTIONS[update])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("no_prox", [False, True], ids=["proximal", "no_prox"])
def test_adan_matches_pytorch_optimizer(no_prox, dtype):
    # pytorch_optimizer.Adan: betas in sail-sg code order; weight_decouple=False divides by
    # (1 + lr wd) after the step (our proximal default), weight_decouple=True multiplies by
    # (1 - lr wd) first (our no_prox=True); max_grad_norm=0 means no clipping, and then its
    # first gradient difference is 0 like ours. Its step counter is per group, equal to our
    # per-parameter counter because every parameter gets a gradient every step.
    init, loss_fn = mlp_problem(dtype)
    ours, theirs = leaf_copies(init), leaf_copies(init)
    opt = NeuroOptima(po_groups(ours, "adan"), sam_rho=0.0, lookahead_k=0, no_prox=no_prox)
    other = po.Adan(po_groups(theirs, "adan"), weight_decouple=no_prox, foreach=False)
    for _ in range(STEPS):
        opt.step(make_closure(ours, loss_fn))
        other.step(make_closure(theirs, loss_fn))
    assert_rel_close(ours, theirs, REL_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lion_matches_pytorch_optimizer(dtype):
    # pytorch_optimizer.Lion with weight_decouple=True, fixed_decay=False: w *= 1 - lr wd,
    # then the sign step; same (b1, b2) meaning as google/automl.
    init, loss_fn = mlp_problem(dtype)
    ours, theirs = leaf_copies(init), leaf_copies(init)
    opt = NeuroOptima(po_groups(ours, "lion"), update="lion", sam_rho=0.0, lookahead_k=0)
    other = po.Lion(po_groups(theirs, "lion"), weight_decouple=True, foreach=False)
    for _ in range(STEPS):
        opt.step(make_closure(ours, loss_fn))
        other.step(make_closure(theirs, loss_fn))
    assert_rel_close(ours, theirs, REL_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lookahead_matches_pytorch_optimizer(dtype):
    # pytorch_optimizer.Lookahead (pullback_momentum='none'): slow weights copied at
    # construction, one k and alpha for all groups, sync after every k-th step of the inner
    # optimizer via fast.lerp_(slow, 1 - alpha); slow = fast. Same algorithm as ours.
    k, alpha = 4, 0.6
    init, loss_fn = mlp_problem(dtype)
    # (a) neurooptima.lookahead's sync around torch.optim.SGD.
    ours, theirs = leaf_copies(init), leaf_copies(init)
    sgd = torch.optim.SGD(split_groups(ours, [dict(lr=lr) for lr in SGD_LRS]))
    slow = [p.detach().clone() for p in ours]
    other = po.Lookahead(torch.optim.SGD(split_groups(theirs, [dict(lr=lr) for lr in SGD_LRS])),
                         k=k, alpha=alpha)
    for step in range(1, STEPS + 1):
        make_closure(ours, loss_fn)()
        sgd.step()
        if step % k == 0:
            with torch.no_grad():
                lookahead_sync_(ours, slow, alpha=alpha)
        other.step(make_closure(theirs, loss_fn))
    assert_rel_close(ours, theirs, REL_TOL[dtype])
    # (b) NeuroOptima with Lookahead on vs pytorch_optimizer's Lookahead around NeuroOptima
    # with Lookahead off.
    ours, theirs = leaf_copies(init), leaf_copies(init)
    opt = NeuroOptima(po_groups(ours, "adan"), sam_rho=0.0, lookahead_k=k, lookahead_alpha=alpha)
    inner = NeuroOptima(po_groups(theirs, "adan"), sam_rho=0.0, lookahead_k=0)
    other = po.Lookahead(inner, k=k, alpha=alpha)
    for _ in range(STEPS):
        opt.step(make_closure(ours, loss_fn))
        other.step(make_closure(theirs, loss_fn))
    assert_rel_close(ours, theirs, REL_TOL[dtype])


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM_eta0"])
def test_sam_matches_pytorch_optimizer(adaptive):
    # pytorch_optimizer.SAM: e = rho g / (||g|| + 1e-12); with adaptive=True it scales by |w|
    # (no eta), which is ASAM with eta = 0. Its norm is accumulated in float32, so the
    # comparison is float32 only. Usage: gradients at w first, then step(closure).
    dtype = torch.float32
    init, loss_fn = mlp_problem(dtype)
    ours, theirs = leaf_copies(init), leaf_copies(init)
    rhos = [0.05, 0.1, 0.02]
    sgd = torch.optim.SGD(split_groups(ours, [dict(lr=lr) for lr in SGD_LRS]))
    other = po.SAM(split_groups(theirs, [dict(lr=lr, rho=rho) for lr, rho in zip(SGD_LRS, rhos)]),
                   torch.optim.SGD, adaptive=adaptive, lr=0.1)
    for _ in range(STEPS):
        sam_sgd_library(ours, make_closure(ours, loss_fn), sgd, rhos, [adaptive] * 3, [0.0] * 3)
        closure = make_closure(theirs, loss_fn)
        closure()
        other.step(closure)
    assert_rel_close(ours, theirs, REL_TOL[dtype])
