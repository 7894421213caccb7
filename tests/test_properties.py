"""Property tests over shapes, dtypes and hyperparameters.

- finite input never yields non-finite weights (nor non-finite state);
- the multi-tensor (foreach) path equals the for-loop path bitwise.

The objective is a quadratic with a random, finite linear term, so every gradient is finite and
the closure (called twice with SAM on) is deterministic. ``eps`` is kept > 0: with eps = 0 and a
gradient that is exactly zero, Adan's 0 / 0 is NaN by definition of its update.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neurooptima import NeuroOptima

# A longer search on demand: NEUROOPTIMA_PROPERTY_EXAMPLES=500 pytest tests/test_properties.py
SETTINGS = settings(max_examples=int(os.environ.get("NEUROOPTIMA_PROPERTY_EXAMPLES", 25)),
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.bfloat16]

shapes = st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
                  min_size=1, max_size=4)
magnitudes = st.sampled_from([1e-6, 1e-2, 1.0, 1e2, 1e4])


@st.composite
def hyperparameters(draw):
    update = draw(st.sampled_from(["adan", "lion", "lion_adan"]))
    n_betas = 3 if update == "adan" and draw(st.booleans()) else 2
    beta = st.floats(0.0, 0.999)
    return dict(
        update=update,
        lr=draw(st.floats(0.0, 1.0)),
        weight_decay=draw(st.floats(0.0, 0.5)),
        betas=tuple(draw(beta) for _ in range(n_betas)),
        eps=draw(st.floats(1e-12, 1e-3)),
        sam_rho=draw(st.sampled_from([0.0, 0.05, 0.5])),
        sam_adaptive=draw(st.booleans()),
        lookahead_k=draw(st.sampled_from([0, 1, 3])),
        lookahead_alpha=draw(st.floats(0.01, 1.0)),
        no_prox=draw(st.booleans()),
        max_grad_norm=draw(st.sampled_from([None, 0.1, 10.0])),
        maximize=draw(st.booleans()),
    )


def run(shape_list, dtype, options, scale, seed, foreach, steps=4):
    gen = torch.Generator().manual_seed(seed)
    params = [(torch.randn(s, generator=gen) * scale).to(dtype).requires_grad_(True)
              for s in shape_list]
    linear = [(torch.randn(s, generator=gen) * scale).to(dtype) for s in shape_list]
    optimizer = NeuroOptima(params, foreach=foreach, **options)

    def closure():
        optimizer.zero_grad()
        # Sign flipped for maximize, so both directions minimise a bounded-below quadratic.
        sign = -1.0 if options["maximize"] else 1.0
        loss = sum(sign * (0.5 * p.float() ** 2 + (b.float() * p.float())).sum()
                   for p, b in zip(params, linear))
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    return params, optimizer


@SETTINGS
@given(shape_list=shapes, dtype=st.sampled_from(DTYPES), options=hyperparameters(),
       scale=magnitudes, seed=st.integers(0, 2**16))
def test_finite_input_gives_finite_weights(shape_list, dtype, options, scale, seed):
    params, optimizer = run(shape_list, dtype, options, scale, seed, foreach=False)
    for p in params:
        assert p.dtype == dtype and torch.isfinite(p).all()
        for value in optimizer.state[p].values():
            assert torch.isfinite(value).all()
    assert all(g["skipped_steps"] == 0 for g in optimizer.param_groups)


@SETTINGS
@given(shape_list=shapes, dtype=st.sampled_from(DTYPES), options=hyperparameters(),
       scale=magnitudes, seed=st.integers(0, 2**16))
def test_foreach_equals_for_loop(shape_list, dtype, options, scale, seed):
    loop, loop_opt = run(shape_list, dtype, options, scale, seed, foreach=False)
    multi, multi_opt = run(shape_list, dtype, options, scale, seed, foreach=True)
    for p, q in zip(loop, multi):
        assert torch.equal(p, q)
        state_p, state_q = loop_opt.state[p], multi_opt.state[q]
        assert state_p.keys() == state_q.keys()
        assert all(torch.equal(state_p[k], state_q[k]) for k in state_p)
