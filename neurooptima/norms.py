"""Global gradient statistics: the sum of squares and a non-finite count in one packed tensor.

SAM, ASAM and gradient clipping all need a norm over every parameter that has a gradient. Each
holder of tensors (one process, or each rank holding its shard) computes ``local_norm_stats``;
distributed backends add the packed pair across ranks with one all-reduce, then read the result
with ``norm_from_stats``. The non-finite count travels in the same tensor, so one collective
decides both "how large" and "is it safe".
"""

from __future__ import annotations

import torch
from torch import Tensor


def local_norm_stats(tensors: list[Tensor], device: torch.device | None = None, *,
                     norm: bool = True) -> Tensor:
    """Packed float64 ``[sum of squares, number of tensors holding inf or nan]``.

    Norms accumulate in float64, so finite low-precision input cannot overflow them; an inf or
    nan element makes its tensor's norm non-finite, which is what gets counted. With
    ``norm=False`` only the count is computed (the sum of squares is 0): each tensor's norm in
    its own dtype, with no float64 copy, and an exact float64 recount of the tensors where that
    came out non-finite (a finite tensor's square can overflow its own dtype).
    """
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    if not tensors:
        return stats
    if not norm:
        quick = torch.stack([n.to(device) for n in torch._foreach_norm(tensors, 2.0)])
        suspects = [t for t, ok in zip(tensors, torch.isfinite(quick).tolist()) if not ok]
        if suspects:
            stats[1] = local_norm_stats(suspects, device)[1]
        return stats
    norms = torch.stack([n.to(device) for n in
                         torch._foreach_norm(tensors, 2.0, dtype=torch.float64)])
    finite = torch.isfinite(norms)
    stats[0] = torch.where(finite, norms, 0.0).square().sum()
    stats[1] = (~finite).sum()
    return stats


def norm_from_stats(stats: Tensor) -> tuple[float, bool]:
    """(global L2 norm, all finite) from packed, already reduced statistics."""
    sum_sq, nonfinite = stats.tolist()
    return sum_sq**0.5, nonfinite == 0
