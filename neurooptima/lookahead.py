"""Lookahead (Zhang et al., NeurIPS 2019) as a pure function.

Every k-th update of the fast weights: ``slow += alpha * (fast - slow); fast = slow``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lookahead_sync_(fast: list[Tensor], slow: list[Tensor], *, alpha: float,
                    foreach: bool = False) -> None:
    """Pull the slow weights toward the fast ones, then reset the fast weights to them."""
    if foreach:
        diff = torch._foreach_sub(fast, slow)
        torch._foreach_add_(slow, diff, alpha=alpha)
        torch._foreach_copy_(fast, slow)
        return
    for f, s in zip(fast, slow):
        s.add_(f - s, alpha=alpha)
        f.copy_(s)
