"""fused=True and state_dtype: the fused step equals the foreach step; narrow state stays lean.

Compiling a kernel costs seconds, so these tests reuse few (rule, dtype) combinations and keep
the tensors tiny; ``torch.compile`` compiles each combination once per session.
"""

from __future__ import annotations

import io

import pytest
import torch

from neurooptima import RULE_BUFFERS, UPDATE_RULES, NeuroOptima
from neurooptima.fused import flat_view, fused_norm_stats, fused_rule_
from neurooptima.norms import local_norm_stats, norm_from_stats
from neurooptima.rules import run_rule

SHAPES = [(7, 3), (5,), (4, 4), (13,)]
STEPS = 5


def _params(dtype=torch.float32, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
            for s in shapes]


def _loss(params, step):
    # A smooth non-quadratic loss: its gradient changes with the weights, so SAM's second
    # pass sees a different gradient and the trajectories depend on every detail of a step.
    gen = torch.Generator().manual_seed(1000 + step)
    total = 0.0
    for p in params:
        x = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        total = total + (torch.sin(p * x) + 0.1 * p * p).sum()
    return total


def _train(groups, steps=STEPS, start=0, opt=None, **kwargs):
    params = [p for g in groups for p in g["params"]]
    opt = opt or NeuroOptima(groups, **kwargs)
    for k in range(start, start + steps):
        def closure(k=k):
            opt.zero_grad()
            loss = _loss(params, k)
            loss.backward()
            return loss
        opt.step(closure)
    return params, opt


def _assert_rel_close(actual, expected, rel, what):
    """Relative error in the L2 norm: ||actual - expected|| <= rel * ||expected||."""
    scale = expected.detach().double().norm().clamp_min(1e-30)
    err = (actual.detach().double() - expected.detach().double()).norm()
    assert err <= rel * scale, f"{what}: error {err:.3e} > {rel} x {scale:.3e}"


def _compare(run_a, run_b, rel):
    (pa, oa), (pb, ob) = run_a, run_b
    for i, (a, b) in enumerate(zip(pa, pb)):
        _assert_rel_close(b, a, rel, f"param {i}")
        for key, value in oa.state[a].items():
            _assert_rel_close(ob.state[b][key], value, rel, f"param {i} {key}")


@pytest.mark.parametrize("rule", UPDATE_RULES)
def test_fused_equals_foreach_with_sam_and_lookahead(rule):
    def groups():
        ps = _params()
        return [dict(params=ps[:2]), dict(params=ps[2:], lr=3e-3, weight_decay=0.05)]

    common = dict(lr=1e-2, weight_decay=0.01, sam_rho=0.05, lookahead_k=2, update=rule)
    foreach = _train(groups(), foreach=True, **common)
    fused = _train(groups(), fused=True, **common)
    _compare(foreach, fused, rel=1e-6)
    # The step ran on the flat layout: parameters and buffers are views of one tensor.
    params, opt = fused
    assert flat_view(params[:2]) is not None
    name = f"{rule}.{RULE_BUFFERS[rule][0]}"
    assert flat_view([opt.state[p][name] for p in params[2:]]) is not None


def test_fused_mixed_dtypes_groups_and_fallbacks():
    # float32 and float64 groups, ASAM, proximal and non-proximal decay, clipping, and a
    # non-contiguous parameter: the fused path leaves float64 and non-contiguous parameters to
    # the foreach kernels, in the same step.
    def groups():
        ps32 = _params(torch.float32, seed=1)
        ps64 = _params(torch.float64, seed=2, shapes=[(6,), (3, 5)])
        gen = torch.Generator().manual_seed(3)
        odd = torch.nn.Parameter(torch.randn(5, 4, generator=gen).t())
        return [dict(params=ps32 + [odd]), dict(params=ps64, no_prox=True, lr=5e-3)]

    common = dict(lr=1e-2, weight_decay=0.02, sam_rho=0.1, sam_adaptive=True, lookahead_k=3,
                  max_grad_norm=5.0, update="adan")
    _compare(_train(groups(), foreach=True, **common),
             _train(groups(), fused=True, **common), rel=1e-6)


def test_fused_rule_on_a_chunk_touches_only_the_chunk():
    # What a sharded backend does: hand the kernel a slice of larger flat tensors.
    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(64, generator=gen) for _ in range(6)]
    full[4] = full[4].abs()  # a second moment is not negative
    full[5] = full[1].clone()  # prev_grad = g at k = 1
    eager = [t.clone() for t in full]
    chunk = slice(5, 37)
    kw = dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.1, no_prox=False)
    fused_rule_("adan", full[0][chunk], full[1][chunk], [t[chunk] for t in full[2:]], 1, **kw)
    run_rule("adan", [eager[0][chunk]], [eager[1][chunk]], [[t[chunk]] for t in eager[2:]],
             [1], foreach=True, **kw)
    for f, e in zip(full, eager):
        _assert_rel_close(f, e, 1e-6, "chunk")
        assert torch.equal(f[:5], e[:5]) and torch.equal(f[37:], e[37:])


@pytest.mark.parametrize("rule", UPDATE_RULES)
def test_bf16_state_sanity(rule):
    common = dict(lr=1e-2, weight_decay=0.01, sam_rho=0.05, lookahead_k=2, update=rule,
                  foreach=True)
    full, _ = _train([dict(params=_params())], **common)
    lean, opt = _train([dict(params=_params())], state_dtype=torch.bfloat16, **common)
    for p_full, p_lean in zip(full, lean):
        state = opt.state[p_lean]
        for name in RULE_BUFFERS[rule]:
            assert state[f"{rule}.{name}"].dtype == torch.bfloat16
        assert state["lookahead.slow"].dtype == torch.float32  # slow weights stay weights
        assert p_lean.dtype == torch.float32 and torch.isfinite(p_lean).all()
        # Same trajectory up to bfloat16 rounding of the state (not a different algorithm).
        _assert_rel_close(p_lean, p_full, 2e-2, rule)


def test_bf16_state_fused_equals_foreach():
    common = dict(lr=1e-2, weight_decay=0.01, sam_rho=0.05, lookahead_k=2,
                  state_dtype=torch.bfloat16)
    foreach = _train([dict(params=_params())], foreach=True, **common)
    fused = _train([dict(params=_params())], fused=True, **common)
    # The state is rounded to bfloat16 after float32 math that may contract differently.
    _compare(foreach, fused, rel=1e-2)
    for a, b in zip(foreach[0], fused[0]):
        _assert_rel_close(b, a, 1e-4, "param")


def _state_bytes(opt):
    """Bytes of every tensor in optimizer.state, storages shared by views counted once."""
    storages, steps = {}, {}
    for state in opt.state.values():
        for key, value in state.items():
            storage = value.untyped_storage()
            (steps if key == "step" else storages)[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()), sum(steps.values())


@pytest.mark.parametrize("state_dtype,budget", [(None, 24), (torch.bfloat16, 14)])
@pytest.mark.parametrize("fused", [False, True])
def test_bytes_per_param_adan_lookahead_sam(state_dtype, budget, fused):
    params = _params()
    numel = sum(p.numel() for p in params)
    opt = NeuroOptima(params, lr=1e-2, sam_rho=0.05, lookahead_k=2, state_dtype=state_dtype,
                      fused=fused)
    for k in range(2):
        opt.zero_grad()
        _loss(params, k).backward()
        opt.first_step()
        peak, steps = _state_bytes(opt)  # between the passes SAM's buffer is alive too
        opt.zero_grad()
        _loss(params, k).backward()
        opt.second_step()
    assert peak / numel <= budget, (peak / numel, budget)
    assert steps == 4 * len(params)  # plus one float32 step counter per tensor
    assert _state_bytes(opt)[0] / numel <= budget - (2 if state_dtype else 4)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_sam_restore(state_dtype):
    params = _params()
    opt = NeuroOptima(params, lr=1e-2, sam_rho=0.5, lookahead_k=0, state_dtype=state_dtype)
    _loss(params, 0).backward()
    before = [p.detach().clone() for p in params]
    opt.first_step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    perturbed = [p.detach().clone() for p in params]
    opt._restore()
    for p, b, w in zip(params, before, perturbed):
        if state_dtype is None:
            assert torch.equal(p, b)  # full copy: bitwise
        else:
            # e kept in bfloat16: exact up to one rounding of w + e_q
            half_ulp = torch.finfo(torch.float32).eps * torch.maximum(w.abs(), b.abs()) / 2
            assert ((p - b).abs() <= half_ulp).all()


def test_resume_fused_bf16_state():
    common = dict(lr=1e-2, weight_decay=0.01, sam_rho=0.05, lookahead_k=2, fused=True,
                  state_dtype=torch.bfloat16)
    straight, _ = _train([dict(params=_params())], steps=6, **common)
    first, opt = _train([dict(params=_params())], steps=3, **common)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only: the dtype in the param groups must load
    resumed = _params(seed=9)  # different values, overwritten by the checkpoint
    with torch.no_grad():
        for p, s in zip(resumed, saved["params"]):
            p.copy_(s)
    opt2 = NeuroOptima(resumed, **common)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[0]]["adan.exp_avg"].dtype == torch.bfloat16
    after, _ = _train([dict(params=resumed)], steps=3, start=3, opt=opt2)
    for a, b in zip(straight, after):
        assert torch.equal(a, b)


def test_bad_options():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        NeuroOptima(p, fused=True, foreach=True)
    with pytest.raises(ValueError, match="fused must be"):
        NeuroOptima(p, fused="yes")
    with pytest.raises(ValueError, match="state_dtype"):
        NeuroOptima(p, state_dtype=torch.int8)


def test_norm_stats_over_flat_runs_equal_the_eager_ones_and_finiteness_is_exact():
    flat = torch.randn(1000, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    run = list(flat.split([100, 250, 650]))
    apart = [torch.randn(7), torch.randn(3, 2, dtype=torch.float64)]
    tensors = run[:2] + apart + run[2:]  # runs broken by tensors of other storages
    fused_norm, fused_finite = norm_from_stats(fused_norm_stats(tensors))
    eager_norm, eager_finite = norm_from_stats(local_norm_stats(tensors))
    assert fused_finite and eager_finite
    assert abs(fused_norm - eager_norm) <= 1e-12 * eager_norm
    # Finite values whose squares (or sums) overflow float32 are finite; inf and nan are not.
    # norm=False decides finiteness alone, eagerly and over flat runs.
    half = [torch.full((4,), 6e4, dtype=torch.float16), torch.ones(3, dtype=torch.float16)]
    flat[5] = flat[6] = 3e38
    for stats_of in (fused_norm_stats, local_norm_stats):
        assert norm_from_stats(stats_of(run))[0] >= 3e38
        for norm in (True, False):
            assert norm_from_stats(stats_of(run, norm=norm))[1]
            assert norm_from_stats(stats_of(half, norm=norm))[1]
    for bad in (float("inf"), float("-inf"), float("nan")):
        flat[600] = bad
        half[1][2] = bad
        for stats_of in (fused_norm_stats, local_norm_stats):
            for norm in (True, False):
                assert not norm_from_stats(stats_of(run, norm=norm))[1]
                assert not norm_from_stats(stats_of(half, norm=norm))[1]


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_fused_nonfinite_gradient_skips_the_whole_step(bad):
    params = _params()
    opt = NeuroOptima(params, lr=1e-2, weight_decay=0.1, sam_rho=0.0, lookahead_k=0,
                      update="adan", fused=True)
    for k in range(2):  # the second step finds gradients and weights in one flat layout
        opt.zero_grad(set_to_none=False)
        _loss(params, k).backward()
        opt.step()
    assert flat_view([p.grad for p in params]) is not None
    before = ([p.detach().clone() for p in params],
              [{k: v.clone() for k, v in opt.state[p].items()} for p in params])
    opt.zero_grad(set_to_none=False)
    _loss(params, 2).backward()
    params[2].grad[1, 1] = bad
    opt.step()
    assert opt.param_groups[0]["skipped_steps"] == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before[0]))
    assert all(torch.equal(opt.state[p][k], v) for p, s in zip(params, before[1])
               for k, v in s.items())


def test_flat_view_remembers_runs_by_address_and_size():
    buf = torch.zeros(10)
    assert flat_view([buf[:6], buf[6:]]).numel() == 10
    assert flat_view([buf[:6], buf[6:]]).numel() == 10  # a known run
    # The same start addresses with other sizes are a different list, checked in full.
    assert flat_view([buf[:6], buf[6:9]]).numel() == 9
    assert flat_view([buf[:3]]).numel() == 3
    assert flat_view([buf[:6], buf[7:]]) is None  # a gap
    assert flat_view([buf[:6], buf[6:8]]).numel() == 8
    # Same addresses and sizes as that known run, but not contiguous.
    assert flat_view([buf[:6], buf[6:].view(2, 2)[:, :1]]) is None
    assert flat_view([torch.zeros(3), torch.zeros(3)]) is None  # separate allocations
