"""The steady state of a fused group: the recorded layout is used only while it is intact.

Gradients zeroed in place (``zero_grad(set_to_none=False)``) keep the flat layout from one step
to the next, so the step skips finding it again (``neurooptima.fused_layout``). These tests run
that path against the foreach kernels, and change what a layout depends on (a parameter's
storage, a gradient tensor, the state, the rule) in the middle of a run.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from neurooptima import UPDATE_RULES, NeuroOptima
from neurooptima.fused_layout import FusedLayout

from test_fused import _compare, _loss, _params


def _layout(opt):
    """The layout of the first group if the last step found it intact, else None."""
    return opt._stored_layout(opt.param_groups[0])


def _run(opt, params, steps, start=0, before_step=None):
    """Train with gradients zeroed in place; SAM through first_step() and second_step(), since
    step(closure) sets the gradients to None between its passes."""
    for k in range(start, start + steps):
        if before_step is not None:
            before_step(k)
        for phase in ([opt.first_step] if opt.sam_enabled else []) + [opt.step]:
            opt.zero_grad(set_to_none=False)
            _loss(params, k).backward()
            phase()


def _pair(**kwargs):
    """Two identical models, one with a foreach optimizer and one with a fused one."""
    ref, fused = _params(), _params()
    return (ref, NeuroOptima(ref, foreach=True, **kwargs),
            fused, NeuroOptima(fused, fused=True, **kwargs))


def _assert_same_run(ref, ref_opt, fused, fused_opt):
    _compare((ref, ref_opt), (fused, fused_opt), rel=1e-6)


@pytest.mark.parametrize("rule", UPDATE_RULES)
def test_steady_state_equals_foreach_with_sam_and_lookahead(rule):
    ref, ref_opt, fused, fused_opt = _pair(lr=1e-2, weight_decay=0.01, sam_rho=0.05,
                                           lookahead_k=2, update=rule)
    _run(ref_opt, ref, 6)
    _run(fused_opt, fused, 6)
    layout = _layout(fused_opt)
    assert layout is not None and layout.intact(fused_opt.state, fused)
    assert layout.count == 6 and fused_opt.state[fused[0]]["step"].item() == 6
    _assert_same_run(ref, ref_opt, fused, fused_opt)


@pytest.mark.parametrize("options", [dict(maximize=True), dict(max_grad_norm=0.5)],
                         ids=["maximize", "clipping"])
def test_negated_or_clipped_gradients_take_the_general_path(options):
    ref, ref_opt, fused, fused_opt = _pair(lr=1e-2, sam_rho=0.0, lookahead_k=3, **options)
    _run(ref_opt, ref, 5)
    _run(fused_opt, fused, 5)
    _assert_same_run(ref, ref_opt, fused, fused_opt)


@pytest.mark.parametrize("change", ["new_storage", "new_grad", "new_rule", "load_state"])
def test_a_changed_layout_is_noticed(change):
    ref, ref_opt, fused, fused_opt = _pair(lr=1e-2, weight_decay=0.01, sam_rho=0.05,
                                           lookahead_k=2)

    def make_change(params, opt):
        def before_step(k):
            if k != 3:
                return
            if change == "new_storage":  # what model.to() does: same Parameter, new storage
                params[1].data = params[1].data.clone()
            elif change == "new_grad":
                params[2].grad = params[2].grad.clone()
            elif change == "new_rule":
                opt.param_groups[0].update(update="lion", betas=(0.9, 0.99))
            else:
                opt.load_state_dict(opt.state_dict())
        return before_step

    for params, opt in ((ref, ref_opt), (fused, fused_opt)):
        _run(opt, params, 3)
        if opt is fused_opt:
            assert _layout(opt) is not None
        _run(opt, params, 4, start=3, before_step=make_change(params, opt))
    _assert_same_run(ref, ref_opt, fused, fused_opt)
    layout = _layout(fused_opt)
    if change == "new_storage":
        # One parameter left the flat buffer, and parameters that do not own their storage
        # are never moved: the group stays on the general path, in three runs.
        assert layout is None
    else:  # the layout was found again after the change, over the new tensors
        assert layout is not None and layout.intact(fused_opt.state, fused)


def test_fresh_gradients_build_no_layout():
    params = _params()
    opt = NeuroOptima(params, lr=1e-2, sam_rho=0.0, lookahead_k=0, fused=True)
    for k in range(3):
        opt.zero_grad()  # set_to_none=True: backward makes new gradient tensors
        _loss(params, k).backward()
        opt.step()
    assert _layout(opt) is None


def test_layout_of_a_group_that_is_not_one_run():
    params = _params()
    state = {}
    assert FusedLayout.of(state, params, ["adan.exp_avg"]) is None  # no gradients, no state


def test_a_layout_keeps_no_gradient_alive_between_steps():
    params = _params()
    opt = NeuroOptima(params, lr=1e-2, sam_rho=0.0, lookahead_k=0, fused=True)
    _run(opt, params, 3)
    layout = _layout(opt)
    assert layout is not None and layout.grads is None and layout.flat_grad is None
    grad_storage = weakref.ref(params[0].grad)
    opt.zero_grad()  # set_to_none=True: the gradients must be freed now, not at the next step
    gc.collect()
    assert grad_storage() is None
    ref, ref_opt, fused, fused_opt = _pair(lr=1e-2, sam_rho=0.0, lookahead_k=0)
    for params_, opt_ in ((ref, ref_opt), (fused, fused_opt)):
        _run(opt_, params_, 3)
        opt_.zero_grad()
        _run(opt_, params_, 3, start=3)  # the run goes on after the gradients were dropped
    _assert_same_run(ref, ref_opt, fused, fused_opt)


@pytest.mark.parametrize("rule", UPDATE_RULES)
def test_a_parameter_that_sits_out_steps_keeps_its_own_count(rule):
    # Steady-state steps note their parameters as moved together instead of writing one token
    # each; a parameter that then sits out a step must still be grouped by its own count.
    ref, ref_opt, fused, fused_opt = _pair(lr=1e-2, weight_decay=0.01, sam_rho=0.0,
                                           lookahead_k=0, update=rule)

    def sit_out(params):
        def before_step(k):
            if k in (3, 4):
                params[1].requires_grad_(False)
                params[1].grad = None
            elif k == 5:
                params[1].requires_grad_(True)
        return before_step

    for params, opt in ((ref, ref_opt), (fused, fused_opt)):
        _run(opt, params, 8, before_step=sit_out(params))
    counts = [int(fused_opt.state[p]["step"].item()) for p in fused]
    assert counts[1] == 6 and counts[0] == counts[2] == 8
    _assert_same_run(ref, ref_opt, fused, fused_opt)
