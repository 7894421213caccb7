"""The sharpness-aware forms at one gradient (momentum ascent) and on a fraction of the steps
(scheduled exact SAM), against the test-side reference written from their equations."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch

from neurooptima import NeuroOptima, host_reads
from references import ScheduledReference

RULES = ("adan", "lion", "lion_adan")
KERNELS = (dict(foreach=False), dict(foreach=True), dict(fused=True))


def _problem(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model = model.to(dtype)
    batches = [(torch.randn(12, 5, dtype=dtype), torch.randn(12, 3, dtype=dtype))
               for _ in range(4)]
    return model, batches


def _closure(model, params, x, y):
    def closure():
        for p in params:
            p.grad = None
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss
    return closure


def _run_pair(options, kernel, *, steps=7, dtype=torch.float64, groups=None):
    """NeuroOptima and the reference on two copies of one model; returns both and the models."""
    model, batches = _problem(dtype)
    twin = copy.deepcopy(model)
    params, ref_params = list(model.parameters()), list(twin.parameters())
    if groups is None:
        opt = NeuroOptima(params, **options, **kernel)
        ref = ScheduledReference([{"params": ref_params}], **options)
    else:
        opt = NeuroOptima([{"params": params[:2], **groups[0]}, {"params": params[2:], **groups[1]}],
                          **options, **kernel)
        ref = ScheduledReference([{"params": ref_params[:2], **groups[0]},
                                  {"params": ref_params[2:], **groups[1]}], **options)
    calls = 0
    for t in range(steps):
        x, y = batches[t % len(batches)]
        inner = _closure(model, params, x, y)

        def counted():
            nonlocal calls
            calls += 1
            return inner()
        opt.step(counted)
        ref.step(_closure(twin, ref_params, x, y))
    return opt, ref, model, twin, calls


@pytest.fixture
def accelerator_path(monkeypatch):
    """Every decision stays on the device, as on a GPU (the sync-free predicate path)."""
    monkeypatch.setattr(host_reads, "reads_are_free", lambda device: False)


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float(((x.detach().double() - y.detach().double()) ** 2).sum()) for x, y in zip(a, b))
    den = sum(float((y.detach().double() ** 2).sum()) for y in b)
    return (num / den) ** 0.5


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kernel", KERNELS, ids=("loop", "foreach", "fused"))
@pytest.mark.parametrize("adaptive", (False, True), ids=("sam", "asam"))
def test_momentum_ascent_matches_reference(rule, kernel, adaptive):
    dtype = torch.float32 if kernel.get("fused") else torch.float64
    options = dict(update=rule, sam_ascent="momentum", sam_rho=0.5 if adaptive else 2.0,
                   sam_adaptive=adaptive, sam_warmup=2, lr=1e-2)
    opt, ref, model, twin, calls = _run_pair(options, kernel, dtype=dtype)
    assert calls == 7  # one gradient a step
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    # The model holds w~ ...
    assert _rel(list(model.parameters()), list(twin.parameters())) < tol
    # ... and eval() shows w.
    opt.eval()
    assert _rel(list(model.parameters()), ref.weights()) < tol


@pytest.mark.parametrize("rule", RULES)
def test_momentum_ascent_with_lookahead_and_clipping(rule):
    options = dict(update=rule, sam_ascent="momentum", sam_rho=1.5, lookahead_k=3,
                   max_grad_norm=0.1, lr=1e-2)
    opt, ref, model, twin, _ = _run_pair(options, dict(foreach=True), steps=8)
    assert _rel(list(model.parameters()), list(twin.parameters())) < 1e-12
    # Lookahead's slow weights track w, never w~.
    slow = [opt.state[p]["lookahead.slow"] for p in model.parameters()]
    ref_slow = [ref.state[id(p)]["slow"] for p in twin.parameters()]
    assert _rel(slow, ref_slow) < 1e-12


def test_radius_is_rho_over_every_group():
    options = dict(sam_ascent="momentum", sam_rho=2.5, lr=1e-2)
    groups = ({"lr": 3e-2}, {"weight_decay": 0.0})
    opt, ref, model, twin, _ = _run_pair(options, dict(fused=True), dtype=torch.float32,
                                         groups=groups)
    ascent = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    gap = sum(float(((p.double() - a.double()) ** 2).sum())
              for p, a in zip(model.parameters(), ascent)) ** 0.5
    assert gap == pytest.approx(2.5, rel=1e-6)
    assert _rel(list(model.parameters()), ref.weights()) < 1e-6


@pytest.mark.parametrize("kernel", KERNELS, ids=("loop", "foreach", "fused"))
def test_zero_rho_and_never_due_are_the_base_rule_bitwise(kernel):
    plain, *_ = _run_pair(dict(lr=1e-2, sam_rho=0.0), kernel, dtype=torch.float32)
    base = [p.clone() for p in plain.param_groups[0]["params"]]
    for options in (dict(sam_ascent="momentum", sam_rho=0.0),
                    dict(sam_rho=0.05, sam_interval=1000),
                    dict(sam_rho=0.05, sam_start=1000)):
        opt, _, model, _, calls = _run_pair(dict(lr=1e-2, **options), kernel,
                                            dtype=torch.float32)
        assert calls == 7
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), base)), options


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("schedule", (dict(sam_interval=3), dict(sam_start=5),
                                      dict(sam_interval=2, sam_start=3)),
                         ids=("every-3rd", "late", "every-2nd-late"))
def test_scheduled_sam_matches_reference(rule, schedule):
    options = dict(update=rule, sam_rho=0.1, lr=1e-2, **schedule)
    opt, ref, model, twin, calls = _run_pair(options, dict(foreach=True), steps=8)
    assert calls == ref.closure_calls
    due = sum(1 for t in range(1, 9) if t % schedule.get("sam_interval", 1) == 0
              and t >= schedule.get("sam_start", 1))
    assert calls == 8 + due
    assert _rel(list(model.parameters()), list(twin.parameters())) < 1e-12


def test_two_phase_loop_asks_whether_the_step_needs_a_second_pass():
    model, batches = _problem()
    params = list(model.parameters())
    opt = NeuroOptima(params, sam_rho=0.05, sam_interval=2, lr=1e-2)
    twin = copy.deepcopy(model)
    ref = ScheduledReference([{"params": list(twin.parameters())}], sam_rho=0.05,
                             sam_interval=2, lr=1e-2)
    seen = []
    for t in range(6):
        x, y = batches[t % 4]
        _closure(model, params, x, y)()
        seen.append(opt.sam_due)
        if opt.sam_due:
            opt.first_step(zero_grad=True)
            _closure(model, params, x, y)()
            opt.second_step()
        else:
            opt.step()
        ref.step(_closure(twin, list(twin.parameters()), x, y))
    assert seen == [False, True] * 3
    assert _rel(params, list(twin.parameters())) < 1e-12
    # A due step without its closure is refused with what to do.
    _closure(model, params, *batches[0])()
    opt.step()  # step 7: plain
    _closure(model, params, *batches[1])()
    with pytest.raises(ValueError, match="sam_due"):
        opt.step()


def test_momentum_ascent_runs_without_a_closure():
    model, batches = _problem()
    params = list(model.parameters())
    opt = NeuroOptima(params, sam_ascent="momentum", sam_rho=2.0, lr=1e-2)
    twin = copy.deepcopy(model)
    ref = ScheduledReference([{"params": list(twin.parameters())}], sam_ascent="momentum",
                             sam_rho=2.0, lr=1e-2)
    for t in range(5):
        x, y = batches[t % 4]
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()  # the loop any framework runs
        opt.step()
        ref.step(_closure(twin, list(twin.parameters()), x, y))
    assert _rel(params, list(twin.parameters())) < 1e-12


def test_eval_train_round_trip_is_bitwise_and_eval_refuses_a_step():
    opt, _, model, _, _ = _run_pair(dict(sam_ascent="momentum", sam_rho=2.0), dict(fused=True),
                                    dtype=torch.float32, steps=3)
    ascent = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    opt.eval()  # twice is once
    evaluated = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(ascent, evaluated))
    with pytest.raises(RuntimeError, match="optimizer.train"):
        opt.step()
    opt.train()
    opt.train()
    assert all(torch.equal(a, p) for a, p in zip(ascent, model.parameters()))
    # Without momentum ascent both are no-ops, and a step after eval() is fine.
    plain = NeuroOptima(model.parameters(), sam_rho=0)
    plain.eval()
    assert all(torch.equal(a, p) for a, p in zip(ascent, model.parameters()))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    plain.step()
    plain.train()


def test_skipped_step_leaves_ascent_point_and_scale_unchanged():
    for kernel in KERNELS:
        opt, _, model, _, _ = _run_pair(dict(sam_ascent="momentum", sam_rho=2.0), kernel,
                                        dtype=torch.float32, steps=3)
        before = [p.detach().clone() for p in model.parameters()]
        scale = opt.param_groups[0]["ascent_scale"].clone()
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        with pytest.warns(RuntimeWarning, match="skipped"):
            opt.step()
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), kernel
        assert torch.equal(opt.param_groups[0]["ascent_scale"], scale)


def test_sync_free_predicate_skip_leaves_ascent_point_unchanged(accelerator_path):
    opt, _, model, _, _ = _run_pair(dict(sam_ascent="momentum", sam_rho=2.0), dict(fused=True),
                                    dtype=torch.float32, steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_accelerator_path_matches_reference(accelerator_path):
    options = dict(sam_ascent="momentum", sam_rho=2.0, lr=1e-2, sam_warmup=1)
    opt, ref, model, twin, _ = _run_pair(options, dict(fused=True), dtype=torch.float32)
    assert _rel(list(model.parameters()), list(twin.parameters())) < 1e-6


RESUME = textwrap.dedent("""
    import io, sys, torch
    sys.path.insert(0, {tests!r})
    from test_sam_forms import _problem, _closure
    from neurooptima import NeuroOptima
    model, batches = _problem(torch.float32)
    params = list(model.parameters())
    opt = NeuroOptima(params, sam_ascent="momentum", sam_rho=2.0, foreach=True)
    saved = torch.load({path!r}, weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    opt.train()
    for t in range(3, 6):
        opt.step(_closure(model, params, *batches[t % 4]))
    torch.save([p.detach() for p in params], {out!r})
""")


@pytest.mark.parametrize("mode", ("train", "eval"))
def test_checkpoint_in_either_mode_resumes_exactly_in_a_fresh_process(mode, tmp_path):
    model, batches = _problem(torch.float32)
    params = list(model.parameters())
    opt = NeuroOptima(params, sam_ascent="momentum", sam_rho=2.0, foreach=True)
    for t in range(3):
        opt.step(_closure(model, params, *batches[t % 4]))
    if mode == "eval":
        opt.eval()
    path, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    saved = opt.state_dict()["param_groups"][0]
    assert saved["ascent_eval"] is (mode == "eval")  # what the model state holds
    opt.train()
    for t in range(3, 6):
        opt.step(_closure(model, params, *batches[t % 4]))
    tests = str(__import__("pathlib").Path(__file__).parent)
    subprocess.run([sys.executable, "-c", RESUME.format(tests=tests, path=str(path),
                                                        out=str(out))], check=True)
    resumed = torch.load(out, weights_only=True)
    assert all(torch.equal(a, b.detach()) for a, b in zip(resumed, params))


def test_gradscaler_and_bf16_state():
    options = dict(sam_ascent="momentum", sam_rho=2.0, lr=1e-2)
    ref_opt, _, ref_model, _, _ = _run_pair(options, dict(fused=True), dtype=torch.float32)
    model, batches = _problem(torch.float32)
    params = list(model.parameters())
    opt = NeuroOptima(params, **options, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for t in range(7):
        x, y = batches[t % 4]
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        scaler.step(opt)
        scaler.update()
    assert _rel(params, list(ref_model.parameters())) < 1e-6
    opt, _, model, _, _ = _run_pair(dict(options, state_dtype=torch.bfloat16), dict(fused=True),
                                    dtype=torch.float32)
    ascent = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    gap = sum(float(((p - a) ** 2).sum()) for p, a in zip(model.parameters(), ascent)) ** 0.5
    assert gap == pytest.approx(2.0, rel=1e-5)


def test_compiled_step_matches_eager():
    options = dict(sam_ascent="momentum", sam_rho=2.0, lr=1e-2)
    _, _, eager, _, _ = _run_pair(options, dict(fused=True), dtype=torch.float32, steps=4)
    model, batches = _problem(torch.float32)
    params = list(model.parameters())
    opt = NeuroOptima(params, **options, fused=True)
    step = torch.compile(opt.step)
    for t in range(4):
        _closure(model, params, *batches[t % 4])()
        step()
    assert _rel(params, list(eager.parameters())) < 1e-6


@pytest.mark.parametrize("bad", (dict(sam_ascent="both"), dict(sam_warmup=-1),
                                 dict(sam_interval=0), dict(sam_start=0),
                                 dict(sam_interval=1.5)))
def test_bad_settings_name_the_argument(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        NeuroOptima([torch.zeros(2, requires_grad=True)], **bad)


def test_mixing_the_two_forms_across_groups_is_refused():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = NeuroOptima([{"params": [a], "sam_ascent": "momentum"}, {"params": [b]}],
                      sam_rho=0.5)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    with pytest.raises(ValueError, match="sam_ascent"):
        opt.step()


def test_trainer_convention_train_eval():
    """The Hugging Face Trainer calls optimizer.train()/eval() when the optimizer has them
    (around training and evaluation): evaluation then sees w, training resumes at w~."""
    opt, ref, model, twin, _ = _run_pair(dict(sam_ascent="momentum", sam_rho=2.0),
                                         dict(foreach=True), steps=4)
    x, y = _problem()[1][0]
    for hook in ("eval", "train"):
        assert callable(getattr(opt, hook, None))
    opt.eval()
    with torch.no_grad():
        evaluated = ((model(x) - y) ** 2).mean()
        for p, w in zip(twin.parameters(), ref.weights()):
            p.copy_(w)
        expected = ((twin(x) - y) ** 2).mean()
    assert float(evaluated) == pytest.approx(float(expected), rel=1e-12)
    opt.train()
    averaged = torch.optim.swa_utils.AveragedModel(model)
    assert averaged is not None


@pytest.mark.parametrize("rule", RULES)
def test_kernel_ascent_in_the_steady_fused_layout(rule, monkeypatch):
    """Gradients kept between steps (the fused layout's steady state): the kernel moves to w
    and back itself, and still matches the reference; clipping and Lookahead inside too."""
    from neurooptima import momentum_ascent

    calls = []
    leave = momentum_ascent.leave_
    monkeypatch.setattr(momentum_ascent, "leave_",
                        lambda *a, **k: (calls.append(1), leave(*a, **k))[1])
    options = dict(update=rule, sam_ascent="momentum", sam_rho=2.0, lr=1e-2, lookahead_k=3,
                   max_grad_norm=0.05, sam_warmup=1)
    model, batches = _problem(torch.float32)
    twin = copy.deepcopy(model)
    params = list(model.parameters())
    opt = NeuroOptima(params, **options, fused=True)
    ref = ScheduledReference([{"params": list(twin.parameters())}], **options)
    for t in range(7):
        x, y = batches[t % 4]
        opt.zero_grad(set_to_none=False)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        ref.step(_closure(twin, list(twin.parameters()), x, y))
    assert len(calls) == 1  # the first step only (its moments did not exist yet)
    assert _rel(params, list(twin.parameters())) < 1e-6


def test_huge_finite_gradients_are_stepped_not_skipped():
    """Squares beyond float32's range in the kernel's quick sums: the exact statistics decide,
    and the step matches the eager kernels."""
    results = []
    for kernel in (dict(foreach=True), dict(fused=True)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5000)) for _ in range(3)]
        opt = NeuroOptima(params, sam_ascent="momentum", sam_rho=2.0, **kernel)
        for scale in (1.0, 1e18, 1.0):  # a block of 4096 squares of 1e18 passes float32's max
            for p in params:
                p.grad = torch.full_like(p, scale) * torch.linspace(-1, 1, p.numel())
            opt.step()
        assert opt.param_groups[0]["skipped_steps"] == 0
        results.append([p.detach().clone() for p in params])
    assert _rel(results[1], results[0]) < 1e-6


@pytest.mark.parametrize("kernel", KERNELS, ids=("loop", "foreach", "fused"))
@pytest.mark.parametrize("adaptive", (False, True), ids=("sam", "asam"))
def test_momentum_ascent_with_a_layer_frozen_midway(kernel, adaptive):
    """A layer frozen after some steps keeps its moment but gets no gradient: the ascent's norm
    and offsets still cover it (it has a first moment), its weights w stay where they were."""
    dtype = torch.float32 if kernel.get("fused") else torch.float64
    options = dict(sam_ascent="momentum", sam_rho=0.5 if adaptive else 2.0,
                   sam_adaptive=adaptive, lr=1e-2)
    model, batches = _problem(dtype)
    twin = copy.deepcopy(model)
    params, ref_params = list(model.parameters()), list(twin.parameters())
    opt = NeuroOptima(params, **options, **kernel)
    ref = ScheduledReference([{"params": ref_params}], **options)
    for t in range(8):
        if t == 3:  # freeze the first layer
            for p in (*params[:2], *ref_params[:2]):
                p.requires_grad_(False)
            opt.eval()
            frozen_w = [p.detach().clone() for p in params[:2]]
            opt.train()
        x, y = batches[t % len(batches)]
        opt.step(_closure(model, params, x, y))
        ref.step(_closure(twin, ref_params, x, y))
    tol = 1e-5 if dtype == torch.float32 else 1e-12  # float32: both sides round, 8 steps
    assert _rel(params, ref_params) < tol
    opt.eval()
    assert _rel(params, ref.weights()) < tol
    assert _rel(params[:2], frozen_w) < tol


@pytest.mark.parametrize("given, resolved", [
    (dict(), ("momentum", 0.5)),                       # the defaults: momentum ascent
    (dict(sam_rho=0.05), ("gradient", 0.05)),          # a radius alone is SAM's, as published
    (dict(sam_rho=0), ("gradient", 0.0)),              # off: the plain rule
    (dict(sam_ascent="gradient"), ("gradient", 0.05)),
    (dict(sam_ascent="momentum", sam_rho=2.0), ("momentum", 2.0)),
])
def test_form_and_radius_left_unset_resolve_as_documented(given, resolved):
    group = NeuroOptima([torch.nn.Parameter(torch.randn(3))], **given).param_groups[0]
    assert (group["sam_ascent"], group["sam_rho"]) == resolved


def test_a_group_radius_alone_under_default_momentum_ascent_is_refused_with_the_fix():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="same sam_ascent"):
        NeuroOptima([dict(params=[a]), dict(params=[b], sam_rho=0.05)]).step()


@pytest.mark.parametrize("kernel", KERNELS, ids=("loop", "foreach", "fused"))
def test_momentum_ascent_step_with_no_gradient_anywhere_moves_nothing(kernel):
    p = torch.nn.Parameter(torch.randn(3))
    before = p.detach().clone()
    optimizer = NeuroOptima([p], sam_ascent="momentum", sam_rho=1.0, **kernel)
    optimizer.step()
    assert torch.equal(p, before)
