"""Small deterministic problems and comparison helpers shared by the unit tests."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# The parity tolerances: relative to each tensor's largest magnitude.
REL_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def mlp_problem(dtype: torch.dtype = torch.float64, seed: int = 0
                ) -> tuple[list[Tensor], Callable[[list[Tensor]], Tensor]]:
    """Initial weights of a 5-7-3 tanh MLP and its MSE loss on a fixed random batch.

    Returned as plain tensors and a function of a parameter list, so the library and a
    reference can each train their own copy on exactly the same objective.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    init = [randn(7, 5, scale=0.5), randn(7, scale=0.1), randn(3, 7, scale=0.5),
            randn(3, scale=0.1)]
    x, y = randn(16, 5), randn(16, 3)

    def loss_fn(params: list[Tensor]) -> Tensor:
        w1, b1, w2, b2 = params
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()

    return init, loss_fn


def leaf_copies(init: list[Tensor]) -> list[Tensor]:
    return [t.clone().requires_grad_(True) for t in init]


def make_closure(params: list[Tensor], loss_fn: Callable[[list[Tensor]], Tensor],
                 sign: float = 1.0) -> Callable[[], Tensor]:
    """The README's closure shape: zero the gradients, forward, backward, return the loss."""

    def closure() -> Tensor:
        for p in params:
            p.grad = None
        loss = sign * loss_fn(params)
        loss.backward()
        return loss

    return closure


def split_groups(params: list[Tensor], per_group: list[dict]) -> list[dict]:
    """Param groups: the 4 MLP tensors split as [w1], [b1, w2], [b2] with their options."""
    slices = [params[0:1], params[1:3], params[3:4]]
    return [dict(params=list(ps), **opts) for ps, opts in zip(slices, per_group)]


def assert_rel_close(actual: list[Tensor], expected: list[Tensor], rel: float) -> None:
    """Each tensor within ``rel`` of the expected one, relative to its largest magnitude."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, (i, a.shape, e.shape, a.dtype)
        scale = e.detach().abs().max().item() if e.numel() else 0.0
        err = (a.detach() - e.detach()).abs().max().item() if e.numel() else 0.0
        assert err <= rel * max(scale, 1e-30), f"tensor {i}: error {err:.3e}, scale {scale:.3e}"


def all_equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
