"""Global gradient statistics: the sum of squares and a non-finite count in one packed tensor.

SAM, ASAM and gradient clipping all need a norm over every parameter that has a gradient. Each
holder of tensors (one process, or each rank holding its shard) computes ``local_norm_stats``;
distributed backends add the packed pair across ranks with one all-reduce, then read the result
with ``norm_from_stats`` (one host read) or keep it on the device with ``device_norm``. The non-finite count travels in the same tensor, so one collective
decides both "how large" and "is it safe".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def local_norm_stats(tensors: list[Tensor], device: torch.device | None = None, *,
                     norm: bool = True) -> Tensor:
    """Packed float64 ``[sum of squares, number of tensors holding inf or nan]``, on ``device``.

    Computed with device ops only (no value is read on the host). Norms accumulate in float64,
    so finite low-precision input cannot overflow them; an inf or nan element makes its
    tensor's norm non-finite, which is what gets counted. With ``norm=False`` only the count
    is computed (the sum of squares is 0), from each tensor's largest magnitude in its own
    dtype: finite exactly when every element is (a maximum cannot overflow), with no float64
    copy.
    """
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    tensors = [t for t in tensors if t.numel()]  # empty pieces (FSDP1, size-0) add nothing
    if not tensors:
        return torch.zeros(2, dtype=torch.float64, device=device)
    if not norm:
        peaks = torch.stack([n.to(device) for n in torch._foreach_norm(tensors, math.inf)])
        count = (~torch.isfinite(peaks)).sum().to(torch.float64)
        return torch.stack([torch.zeros_like(count), count])
    norms = torch.stack([n.to(device) for n in
                         torch._foreach_norm(tensors, 2.0, dtype=torch.float64)])
    finite = torch.isfinite(norms)
    return torch.stack([torch.where(finite, norms, 0.0).square().sum(),
                        (~finite).sum().to(torch.float64)])


def norm_from_stats(stats: Tensor) -> tuple[float, bool]:
    """(global L2 norm, all finite) from packed, already reduced statistics, read on the host
    (one read). ``device_norm`` keeps both on the device."""
    sum_sq, nonfinite = stats.tolist()
    return sum_sq**0.5, nonfinite == 0


def device_norm(stats: Tensor) -> tuple[Tensor, Tensor]:
    """(global L2 norm, all finite) as 0-d tensors on the statistics' device: nothing is read
    on the host, so a step can branch on them with ``torch.where`` instead of ``if``."""
    return stats[0].sqrt(), stats[1] == 0
