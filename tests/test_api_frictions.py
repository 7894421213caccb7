"""What a user coming from torch.optim or the common SAM code expects of the API.

- ``first_step(zero_grad=True)`` / ``second_step(zero_grad=True)``; the two-phase loop with
  ``zero_grad()`` at the top of each iteration equals ``step(closure)`` bitwise over 50 steps;
- a warning when steps are skipped for non-finite gradients (the 1st skip, then the 2nd, 4th,
  8th ...), with the count;
- hyperparameters edited in ``param_groups`` are checked again at the next step;
- Lookahead slow weights only for parameters that train at construction, created at the
  first update for the others;
- a state dict whose ``step`` counters are plain numbers loads as torch.optim's do;
- no import cycle between the launcher's strategy modules.
"""

from __future__ import annotations

import ast
import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from neurooptima import NeuroOptima, SkippedStepWarning

ROOT = Path(__file__).resolve().parents[1]
STEPS = 50
# Both are off by default; the tests of SAM's two passes and of slow weights switch them on.
SAM_AND_LOOKAHEAD = dict(sam_rho=0.05, lookahead_k=5)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen))
            for _ in range(n)]


def _closure_run(**kwargs):
    model = _model()
    optimizer = NeuroOptima(model.parameters(), **kwargs)
    for x, y in _batches(STEPS):
        def closure():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        optimizer.step(closure)
    return model, optimizer


def _two_phase_run(zero_grad_argument: bool, **kwargs):
    model = _model()
    optimizer = NeuroOptima(model.parameters(), **kwargs)
    for x, y in _batches(STEPS):
        optimizer.zero_grad()  # the top of every iteration
        nn.functional.mse_loss(model(x), y).backward()
        if zero_grad_argument:
            optimizer.first_step(zero_grad=True)
        else:
            optimizer.first_step()
            optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.second_step()
    return model, optimizer


@pytest.mark.parametrize("zero_grad_argument", [False, True])
@pytest.mark.parametrize("options", [dict(lr=1e-2), dict(lr=1e-2, update="lion", foreach=True),
                                     dict(lr=1e-2, sam_adaptive=True, max_grad_norm=0.5)])
def test_two_phase_loop_equals_step_closure_bitwise(zero_grad_argument, options):
    expected, expected_opt = _closure_run(**SAM_AND_LOOKAHEAD, **options)
    actual, actual_opt = _two_phase_run(zero_grad_argument, **SAM_AND_LOOKAHEAD, **options)
    for p, q in zip(actual.parameters(), expected.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(actual_opt.state[p]["lookahead.slow"],
                           expected_opt.state[q]["lookahead.slow"])
    assert actual_opt.state[actual[0].weight]["step"].item() == STEPS


def test_zeroing_only_between_the_passes_is_not_the_same_loop():
    """The loop the old recipes showed: the first pass adds onto last step's gradient."""
    expected, _ = _closure_run(lr=1e-2, **SAM_AND_LOOKAHEAD)
    model = _model()
    optimizer = NeuroOptima(model.parameters(), lr=1e-2, **SAM_AND_LOOKAHEAD)
    for x, y in _batches(STEPS):
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.first_step()
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.second_step()
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), expected.parameters()))


def test_second_step_zero_grad_clears_the_gradients():
    model = _model()
    optimizer = NeuroOptima(model.parameters(), sam_rho=0.05)
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    assert all(p.grad is None for p in model.parameters())
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ skipped steps


def test_skipped_steps_warn_once_then_at_powers_of_two():
    model = _model()
    optimizer = NeuroOptima(model.parameters(), sam_rho=0.0)
    x, y = _batches(1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20):
            optimizer.zero_grad()
            (nn.functional.mse_loss(model(x), y) * math.nan).backward()
            optimizer.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedStepWarning)]
    assert len(messages) == 5  # skips 1, 2, 4, 8, 16
    for n, message in zip((1, 2, 4, 8, 16), messages):
        assert f"({n} step" in message
    assert optimizer.param_groups[0]["skipped_steps"] == 20
    assert caught[0].filename == __file__  # points at the caller's line


# ------------------------------------------------------------------ edited param groups


def _one_step(optimizer, model):
    x, y = _batches(1)[0]

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    return optimizer.step(closure)


def test_negative_lr_set_in_param_groups_is_refused_at_the_next_step():
    model = _model()
    optimizer = NeuroOptima(model.parameters(), sam_rho=0.05)
    _one_step(optimizer, model)
    optimizer.param_groups[0]["lr"] = -1
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="lr must be >= 0"):
        _one_step(optimizer, model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        model(torch.zeros(1, 6)).sum().backward()
        optimizer.first_step()


def test_two_tuple_betas_set_into_an_adan_group_is_normalized():
    model = _model()
    optimizer = NeuroOptima(model.parameters(), beta_diff=0.9)
    _one_step(optimizer, model)
    optimizer.param_groups[0]["betas"] = (0.95, 0.995)
    _one_step(optimizer, model)
    assert optimizer.param_groups[0]["betas"] == (0.95, 0.9, 0.995)
    reference = NeuroOptima(_model().parameters(), beta_diff=0.9, betas=(0.95, 0.995))
    assert reference.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]
    optimizer.param_groups[0]["betas"] = (0.9, 0.9, 0.9, 0.9)
    with pytest.raises(ValueError, match="betas"):
        _one_step(optimizer, model)


def test_schedulers_still_work():
    model = _model()
    optimizer = NeuroOptima(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        _one_step(optimizer, model)
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)


# ------------------------------------------------------------------ Lookahead and frozen params


def test_frozen_parameters_get_no_slow_weights_until_they_train():
    model = _model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    initial = frozen.detach().clone()
    optimizer = NeuroOptima(model.parameters(), lr=1e-2, **SAM_AND_LOOKAHEAD)
    assert "lookahead.slow" not in optimizer.state[frozen]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all("lookahead.slow" in optimizer.state[p] for p in trained)
    for _ in range(3):
        _one_step(optimizer, model)
    assert "lookahead.slow" not in optimizer.state[frozen]
    assert torch.equal(frozen, initial)
    frozen.requires_grad_(True)  # unfreeze: slow weights from the weights before the update
    _one_step(optimizer, model)
    assert torch.equal(optimizer.state[frozen]["lookahead.slow"], initial)


def test_unfrozen_parameter_follows_an_optimizer_that_had_it_trainable_from_the_start():
    """A parameter without slow weights at construction behaves as if they were made then."""
    model_a, model_b = _model(), _model()
    model_b[0].weight.requires_grad_(False)
    opt_a = NeuroOptima(model_a.parameters(), lr=1e-2, lookahead_k=3)
    opt_b = NeuroOptima(model_b.parameters(), lr=1e-2, lookahead_k=3)
    model_b[0].weight.requires_grad_(True)
    for _ in range(7):
        _one_step(opt_a, model_a)
        _one_step(opt_b, model_b)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_lookahead_switched_on_later_starts_from_the_current_weights():
    model = _model()
    # sam_rho=0: the model holds w, which the slow weights are taken from.
    optimizer = NeuroOptima(model.parameters(), lookahead_k=0, sam_rho=0)
    _one_step(optimizer, model)
    assert all("lookahead.slow" not in optimizer.state[p] for p in model.parameters())
    optimizer.param_groups[0]["lookahead_k"] = 5  # step 2 is no sync step
    weights = [p.detach().clone() for p in model.parameters()]
    _one_step(optimizer, model)
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(optimizer.state[p]["lookahead.slow"], w)


# ------------------------------------------------------------------ plain-number step counters


@pytest.mark.parametrize("options", [dict(foreach=False), dict(foreach=True),
                                     pytest.param(dict(fused=True), marks=pytest.mark.slow)])
def test_state_dict_with_number_steps_loads_like_torch_optim(options):
    steps_before, steps_after = 4, 3
    model = _model()
    optimizer = NeuroOptima(model.parameters(), lr=1e-2, lookahead_k=3, **options)
    reference_model = copy.deepcopy(model)
    reference = NeuroOptima(reference_model.parameters(), lr=1e-2, lookahead_k=3, **options)
    for _ in range(steps_before):
        _one_step(optimizer, model)
        _one_step(reference, reference_model)
    saved = copy.deepcopy(optimizer.state_dict())
    for entry in saved["state"].values():
        entry["step"] = int(entry["step"].item()) if len(entry) % 2 else float(entry["step"])
    assert any(isinstance(e["step"], (int, float)) for e in saved["state"].values())
    resumed = NeuroOptima(model.parameters(), lr=1e-2, lookahead_k=3, **options)
    resumed.load_state_dict(saved)
    for entry in resumed.state.values():
        assert isinstance(entry["step"], torch.Tensor)
        assert entry["step"].dtype == torch.float32
    for _ in range(steps_after):
        _one_step(resumed, model)
        _one_step(reference, reference_model)
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(resumed.state[p]["step"], reference.state[q]["step"])


# ------------------------------------------------------------------ launcher imports


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
    return names


def test_strategy_modules_do_not_import_each_other():
    strategies = _imports(ROOT / "launch" / "strategies.py")
    deepspeed = _imports(ROOT / "launch" / "deepspeed_strategy.py")
    assert not {".strategies", "launch.strategies"} & deepspeed
    assert {".deepspeed_strategy"} & strategies  # the one direction: make_strategy uses it


# ------------------------------------------------------------------ state bytes (README figures)


def _state_bytes_per_param(optimizer, params, *, keys=None) -> float:
    numel = sum(p.numel() for p in params)
    total = 0
    for p in params:
        for key, value in optimizer.state[p].items():
            if key != "step" and (keys is None or key in keys):
                total += value.numel() * value.element_size()
    return total / numel


@pytest.mark.parametrize("update,buffers", [("adan", 16), ("lion", 4), ("lion_adan", 12)])
def test_state_bytes_per_parameter_as_the_readme_states(update, buffers):
    model = nn.Linear(64, 64)
    params = list(model.parameters())
    x = torch.randn(8, 64)
    for state_dtype, rule_bytes in ((None, buffers), (torch.bfloat16, buffers // 2)):
        optimizer = NeuroOptima(params, update=update, state_dtype=state_dtype,
                                **SAM_AND_LOOKAHEAD)
        model(x).square().mean().backward()
        optimizer.first_step(zero_grad=True)  # between the passes SAM holds its restore data
        sam_bytes = 4 if state_dtype is None else 2
        # before the first update: slow weights and SAM's restore data only
        assert _state_bytes_per_param(optimizer, params) == 4 + sam_bytes
        model(x).square().mean().backward()
        optimizer.second_step(zero_grad=True)
        assert _state_bytes_per_param(optimizer, params) == rule_bytes + 4  # + slow weights
        assert all(optimizer.state[p]["step"].numel() == 1 for p in params)
    optimizer = NeuroOptima(params, update=update)  # the defaults: SAM and Lookahead off
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    assert _state_bytes_per_param(optimizer, params) == buffers  # the rule's buffers alone
    adamw = torch.optim.AdamW(params)
    model(x).square().mean().backward()
    adamw.step()
    assert _state_bytes_per_param(adamw, params) == 8
