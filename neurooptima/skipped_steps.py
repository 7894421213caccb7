"""Steps skipped for non-finite gradients: their count and the warning that reports them.

A skip decided on the host (one read of the gradient statistics) is counted on the host; one
decided on the device (the sync-free fused step's predicate) is counted on the device and read
back without waiting for it (``_DeviceCount``). ``SkipLog`` keeps both and warns at the 1st,
2nd, 4th, 8th ... skipped step, naming the user's line that called the optimizer.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["SkippedStepWarning", "SkipLog"]


class SkippedStepWarning(RuntimeWarning):
    """A step was skipped because a gradient held inf or nan (see ``skipped_steps``)."""


class _DeviceCount:
    """Counts skipped steps on the device and reads the count without waiting for it.

    Each call adds the step's ``skipped`` flag on the device and starts a non-blocking copy of
    the count into host memory (pinned on a GPU); the host value is read once that copy has
    completed (on the CPU at once; on a GPU at a later step, when its event has completed, so
    a warning may come a step or two late). Nothing waits for the device. While a CUDA graph
    is being captured no copy is started.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        cuda = device.type == "cuda"
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.host = torch.zeros((), dtype=torch.int64, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.pending = False

    def add(self, skipped: Tensor) -> int | None:
        """Add ``skipped`` (0-d bool); returns the count last copied to the host, if new."""
        self.count.add_(skipped)
        if self.event is not None:
            if torch.cuda.is_current_stream_capturing():
                return None
            seen = self._read() if self.pending and self.event.query() else None
            if not self.pending or seen is not None:
                self.host.copy_(self.count, non_blocking=True)
                self.event.record()
                self.pending = True
            return seen
        self.host.copy_(self.count)
        return self._read()

    def _read(self) -> int:
        self.pending = False
        return int(self.host.numpy())  # host memory a completed copy wrote: no device wait


_PACKAGE_DIRS = (os.path.dirname(os.path.abspath(__file__)),
                 os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "distributed"))


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package (and torch's wrappers), so
    a warning names the user's line that called the optimizer."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not (path.startswith(_PACKAGE_DIRS) or f"{os.sep}torch{os.sep}" in path):
            return level
        frame, level = frame.f_back, level + 1
    return 1


class SkipLog:
    """The optimizer's skipped steps: each param group's ``skipped_steps`` and the warning."""

    def __init__(self) -> None:
        self.on_host_total = 0  # skips decided on the host
        self.next_warning = 1
        self.device: _DeviceCount | None = None
        self.device_seen = 0  # skips decided on the device, as last read back

    def host_skip(self, groups: list[dict[str, Any]]) -> None:
        """Count a whole skipped step decided on the host."""
        for group in groups:
            group["skipped_steps"] += 1
        self.on_host_total += 1
        self.warn(self.on_host_total + self.device_seen)

    # Host-side bookkeeping, run eagerly under torch.compile: dynamo does not carry this
    # method's attribute writes (the count created on the first step) into its reads.
    @torch._disable_dynamo
    def device_skip(self, groups: list[dict[str, Any]], finite: Tensor) -> None:
        """Count ``~finite`` (0-d bool on the device) without reading it."""
        skipped = ~finite
        for group in groups:
            count = group["skipped_steps"]
            if not isinstance(count, Tensor) or count.device != finite.device:
                # From here on a device tensor (int64, 0-d), added to in place: a captured
                # step keeps counting on replay. ``state_dict()`` saves it as a number.
                count = group["skipped_steps"] = (
                    torch.full((), count, dtype=torch.int64, device=finite.device)
                    if not isinstance(count, Tensor) else count.to(finite.device, torch.int64))
            count.add_(skipped)
        if self.device is None or self.device.device != finite.device:
            self.device = _DeviceCount(finite.device)
        seen = self.device.add(skipped)
        if seen is not None:
            self.device_seen = seen
            self.warn(self.on_host_total + seen)

    def warn(self, n: int) -> None:
        """Warn at the 1st, 2nd, 4th, 8th ... skipped step: once, then ever more rarely.

        ``n`` is the number of steps skipped so far (on the device path, as last copied to
        the host, so a warning may come a step late on a GPU)."""
        if n < self.next_warning:
            return
        self.next_warning = 1 << n.bit_length()
        warnings.warn(f"NeuroOptima skipped a step: a gradient holds inf or nan, so no "
                      f"weight, buffer or counter moved ({n} step{'s' * (n > 1)} skipped "
                      f"so far; param_groups[i]['skipped_steps'] counts them). Next "
                      f"warning at {self.next_warning} skipped steps.", SkippedStepWarning,
                      stacklevel=_caller_level())
