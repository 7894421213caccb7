"""Count the bytes each collective moves, per collective type, for tests and benchmarks.

Every collective issued through ``neurooptima.distributed.collectives`` reports itself here.
Inside ``with count_communication() as counter:`` those reports add up in ``counter``.

Bytes are counted as the per-rank traffic of a bandwidth-optimal (ring) algorithm, the
convention of nccl-tests' "bus bandwidth", so figures compare across backends and world sizes:

    reduce-scatter of an S-byte input    S (N-1)/N
    all-gather into an S-byte output     S (N-1)/N
    all-reduce of S bytes                2 S (N-1)/N
    broadcast of S bytes                 S

A plain sharded step (reduce-scatter of the gradients, all-gather of the weights) therefore
moves 2 x model bytes x (N-1)/N, the same as one all-reduce of the gradients under DDP.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["CommCounter", "count_communication", "record", "ring_bytes"]

_RING_FACTOR = {
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "broadcast": lambda n: 1.0 if n > 1 else 0.0,
}

COLLECTIVES = tuple(_RING_FACTOR)


def ring_bytes(kind: str, payload_bytes: int, world_size: int) -> float:
    """Per-rank bytes a ring algorithm moves for one collective on ``payload_bytes``.

    ``payload_bytes`` is the full (unsharded) buffer: the reduce-scatter input, the all-gather
    output, the all-reduced or broadcast tensor.
    """
    if kind not in _RING_FACTOR:
        raise ValueError(f"kind must be one of {', '.join(COLLECTIVES)}, got {kind!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    return payload_bytes * _RING_FACTOR[kind](world_size)


@dataclass
class CommCounter:
    """Bytes moved, payload bytes and number of calls, per collective type."""

    bytes: Counter = field(default_factory=Counter)
    payload: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    def add(self, kind: str, payload_bytes: int, world_size: int) -> None:
        self.bytes[kind] += ring_bytes(kind, payload_bytes, world_size)
        self.payload[kind] += payload_bytes
        self.calls[kind] += 1

    def total(self) -> float:
        return float(sum(self.bytes.values()))

    def reset(self) -> None:
        self.bytes.clear()
        self.payload.clear()
        self.calls.clear()

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {kind: {"bytes": float(self.bytes[kind]), "payload": int(self.payload[kind]),
                       "calls": int(self.calls[kind])} for kind in sorted(self.calls)}


# Counters currently listening; a list, not thread-local: autograd hooks may run on another
# thread than the one that opened the context.
_active: list[CommCounter] = []


def record(kind: str, payload_bytes: int, world_size: int) -> None:
    """Report one collective to every open ``count_communication`` context."""
    for counter in _active:
        counter.add(kind, payload_bytes, world_size)


@contextlib.contextmanager
def count_communication(counter: CommCounter | None = None) -> Iterator[CommCounter]:
    """Context manager: count the collectives issued inside it (nesting is allowed)."""
    counter = CommCounter() if counter is None else counter
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.remove(counter)
