"""The sync-free step: no host read in a steady-state fused step, tensor learning rates read as
data (no recompilation), step counters in torch's scalar dtype on the parameters' device.

Host reads are counted by patching every Tensor method that turns a value into a Python object
(``item``, ``tolist``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``); on a GPU each
of them waits for the device. On the CPU, where a read is a plain load, the step decides the
skip on the host (``neurooptima.host_reads``); the ``accelerator_path`` fixture turns that off,
so the accelerator's path (the skip as a predicate inside the kernel) runs and is counted here
on any device.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from neurooptima import UPDATE_RULES, NeuroOptima, host_reads

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_host_reads():
    """Counts calls of the value-reading Tensor methods inside the block, by name."""
    counts = dict.fromkeys(READS, 0)
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return counted

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture
def accelerator_path(monkeypatch):
    """The step keeps every decision on the device, as on a GPU, whatever the device."""
    monkeypatch.setattr(host_reads, "reads_are_free", lambda device: False)


def _model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).to(device)


def _batch(k, device):
    gen = torch.Generator().manual_seed(k)
    return (torch.randn(32, 6, generator=gen, dtype=torch.float32).to(device),
            torch.randn(32, 3, generator=gen, dtype=torch.float32).to(device))


def _loss(model, k, device):
    x, y = _batch(k, device)
    return torch.nn.functional.mse_loss(model(x), y)


def _plain_steps(model, opt, ks, device, set_to_none=False):
    for k in ks:
        opt.zero_grad(set_to_none=set_to_none)
        _loss(model, k, device).backward()
        opt.step()


def _sam_steps(model, opt, ks, device):
    for k in ks:  # first_step/second_step keep the gradients in their flat layout
        opt.zero_grad(set_to_none=False)
        _loss(model, k, device).backward()
        opt.first_step()
        opt.zero_grad(set_to_none=False)
        _loss(model, k, device).backward()
        opt.second_step()


def reads_per_step(device, *, sam: bool, set_to_none: bool = False, steps: int = 4,
                   **options) -> dict[str, float]:
    """Host reads per step after three warm-up steps, by method name."""
    model = _model(device)
    opt = NeuroOptima(model.parameters(), **{
        **dict(lr=1e-2, weight_decay=0.01, sam_rho=0.05 if sam else 0.0, lookahead_k=2,
               max_grad_norm=1.0), **options})
    run = _sam_steps if sam else _plain_steps
    kwargs = {} if sam else dict(set_to_none=set_to_none)
    run(model, opt, range(3), device, **kwargs)
    with count_host_reads() as counts:
        run(model, opt, range(3, 3 + steps), device, **kwargs)
    return {name: n / steps for name, n in counts.items() if n}


@pytest.mark.parametrize("sam", [False, True], ids=["plain", "sam"])
@pytest.mark.parametrize("update", UPDATE_RULES)
def test_steady_fused_step_reads_nothing_on_the_host(device, update, sam, accelerator_path):
    assert reads_per_step(device, sam=sam, update=update, fused=True) == {}


def test_fused_step_with_fresh_gradients_reads_nothing_on_the_host(device, accelerator_path):
    # zero_grad(set_to_none=True): the gradients are copied into the flat layout every step.
    assert reads_per_step(device, sam=False, set_to_none=True, fused=True) == {}


@pytest.mark.parametrize("sam", [False, True], ids=["plain", "sam"])
def test_cpu_fused_step_reads_only_its_skip_decision(sam):
    """On the CPU the fused step reads the packed norm statistics once: the skip decision."""
    cpu = torch.device("cpu")
    assert reads_per_step(cpu, sam=sam, fused=True) == {"tolist": 1}
    assert reads_per_step(cpu, sam=sam, fused=True, max_grad_norm=None) == {"tolist": 1}


def test_eager_steps_read_the_skip_decision_and_counts(device):
    """The foreach and for-loop kernels take numbers: one read of the norm statistics, and
    the counts per parameter (as torch's non-capturable optimizers read theirs)."""
    for options in (dict(foreach=True), dict(foreach=False)):
        reads = reads_per_step(device, sam=False, **options)
        assert reads.get("tolist") == 1  # the skip decision and the clipping norm
        assert 0 < reads.get("item", 0) <= 2 * 4  # counts: update and Lookahead, 4 tensors


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("on_device", [True, False], ids=["device_predicate", "host_decision"])
def test_fused_skip_moves_nothing_and_is_counted(device, bad, on_device, monkeypatch):
    if on_device:
        monkeypatch.setattr(host_reads, "reads_are_free", lambda device: False)
    model = _model(device)
    opt = NeuroOptima(model.parameters(), lr=1e-2, sam_rho=0.0, lookahead_k=2,
                      max_grad_norm=1.0, fused=True)
    _plain_steps(model, opt, range(3), device)
    before = ([p.detach().clone() for p in model.parameters()],
              [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()])
    opt.zero_grad(set_to_none=False)
    _loss(model, 3, device).backward()
    next(model.parameters()).grad[0, 0] = bad
    with pytest.warns(Warning, match="skipped a step") if device.type == "cpu" \
            else contextlib.nullcontext():
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before[0]))
    assert all(torch.equal(opt.state[p][k], v) for p, s in zip(model.parameters(), before[1])
               for k, v in s.items())
    count = opt.param_groups[0]["skipped_steps"]
    if on_device or device.type != "cpu":  # counted on the device
        assert isinstance(count, torch.Tensor) and count.device.type == device.type
    assert int(count) == 1
    assert opt.state_dict()["param_groups"][0]["skipped_steps"] == 1  # saved as a number


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_tensor_lr_equals_float_lr(device, fused):
    runs = []
    for lr in (1e-2, torch.tensor(1e-2), torch.tensor(1e-2, device=device)):
        model = _model(device)
        opt = NeuroOptima(model.parameters(), lr=lr, sam_rho=0.0, lookahead_k=0,
                          fused=fused)
        _plain_steps(model, opt, range(3), device)
        runs.append([p.detach().clone() for p in model.parameters()])
    for other in runs[1:]:
        assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(runs[0], other))


def test_multi_element_tensor_lr_is_refused():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        NeuroOptima([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor([1e-3, 2e-3]))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        NeuroOptima([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor(-1.0))


def test_changing_a_tensor_lr_does_not_recompile(device):
    model = _model(device)
    lr = torch.tensor(1e-2, device=device)
    opt = NeuroOptima(model.parameters(), lr=lr, sam_rho=0.0, lookahead_k=0, fused=True)
    _plain_steps(model, opt, range(2), device)
    before = [p.detach().clone() for p in model.parameters()]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k, value in enumerate((5e-3, 1e-3, 0.0)):
            lr.fill_(value)  # a schedule writing into the tensor
            _plain_steps(model, opt, [2 + k], device)
    # lr = 0 in the last step: only the two steps before it moved the weights.
    after = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    with torch._dynamo.config.patch(error_on_recompile=True):
        before = after
        _plain_steps(model, opt, [9], device)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_changing_a_float_lr_does_not_recompile(device):
    model = _model(device)
    opt = NeuroOptima(model.parameters(), lr=1e-2, sam_rho=0.0, lookahead_k=0, fused=True)
    _plain_steps(model, opt, range(2), device)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k, value in enumerate((5e-3, 1e-3)):
            opt.param_groups[0]["lr"] = value
            _plain_steps(model, opt, [2 + k], device)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_step_counters_follow_torch_scalar_dtype_and_live_on_the_device(device, fused):
    default = torch.get_default_dtype()
    for dtype, expected in ((torch.float32, torch.float32), (torch.float64, torch.float64)):
        torch.set_default_dtype(dtype)
        try:
            model = _model(device).float()
            opt = NeuroOptima(model.parameters(), sam_rho=0.0, fused=fused)
            _plain_steps(model, opt, range(2), device)
            reference = torch.optim.Adam(model.parameters())
            _plain_steps(model, reference, range(1), device)
        finally:
            torch.set_default_dtype(default)
        for p in model.parameters():
            step = opt.state[p]["step"]
            assert step.dtype == expected == reference.state[p]["step"].dtype
            assert step.device.type == device.type and float(step) == 2


@pytest.mark.parametrize("max_grad_norm", [None, 0.5], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("update", UPDATE_RULES)
def test_host_decision_and_device_predicate_train_alike(device, update, max_grad_norm,
                                                        monkeypatch):
    """The CPU's host-decided step and the accelerator's predicated one: the same kernel math,
    so the same weights and state, bit for bit, including across a skipped step (and Adan's
    first previous gradient, set when the state is made on the host path and in the kernel on
    the device path)."""
    runs = []
    for on_device in (True, False):
        monkeypatch.setattr(host_reads, "reads_are_free",
                            (lambda d: False) if on_device else (lambda d: d.type == "cpu"))
        model = _model(device)
        opt = NeuroOptima(model.parameters(), lr=1e-2, weight_decay=0.01, sam_rho=0.0,
                          lookahead_k=2, max_grad_norm=max_grad_norm, update=update,
                          fused=True)
        for k in range(6):
            opt.zero_grad(set_to_none=False)
            _loss(model, k, device).backward()
            if k == 3:
                next(model.parameters()).grad[0, 0] = math.nan
            with pytest.warns(Warning) if k == 3 and device.type == "cpu" \
                    else contextlib.nullcontext():
                opt.step()
        runs.append(([p.detach().clone() for p in model.parameters()],
                     [{k: v.clone() for k, v in opt.state[p].items()}
                      for p in model.parameters()]))
    (weights_a, states_a), (weights_b, states_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(states_a, states_b) for k in a)
