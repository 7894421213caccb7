"""Where reading a tensor's value on the host costs nothing.

On an accelerator a read (``.item()``, ``bool(t)``) waits for every queued kernel: it stalls
the pipeline and cannot be captured in a CUDA graph, so the fused step keeps its decisions on
the device (the non-finite skip is a predicate applied inside the kernel). CPU tensors live in
host memory and CPU ops run to completion before they return, so there a read is just a load,
and the step decides the skip in Python as torch's CPU fused optimizers do with ``found_inf``:
a skipped step then runs no kernel at all, and a finite one runs a kernel without the
predicate, which costs CPU instructions in every element.
"""

from __future__ import annotations

import torch

__all__ = ["reads_are_free"]


def reads_are_free(device: torch.device) -> bool:
    """Whether the step may read values on ``device`` from the host: True on the CPU only.

    Tests make it return False to run the accelerator path (the device-side predicate, no
    host read) on the CPU.
    """
    return device.type == "cpu"
