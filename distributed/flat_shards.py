"""Flat, padded chunks of parameters and the buckets that carry them through collectives.

Each parameter of ``n`` elements is flattened (row-major) and split into N chunks of
``c = ceil(n / N)`` elements, the last ones padded with zeros, as FSDP2 does: rank r owns
elements ``[r c, (r + 1) c)``. The split is ``torch.chunk``'s, so a DTensor sharded on dim 0 of
the flat parameter has exactly these local pieces (without the padding).

A bucket packs several parameters so one collective serves them all. Its flat buffer of
``N x S`` elements is laid out rank-major, ``[rank 0's chunks | rank 1's chunks | ...]``, with
each section ``S`` the sum of the chunk sizes; a reduce-scatter of it leaves on each rank its
own chunks, contiguous, and an all-gather of the sections rebuilds the whole buffer.

Precision: the weights a bucket all-gathers are in the parameters' dtype; this rank's chunks
(``owned``, the inner optimizer's parameters) may be wider, ``master_dtype`` (fp32 master weights
for bf16 / fp16 parameters, as Megatron's distributed optimizer and DeepSpeed keep them), and the
gradient reduce-scatter runs in ``reduce_dtype``; the reduced chunks are handed over in the
master dtype.

The gradient reduce-scatter carries one more element per parameter after every section: 1 where
this rank has a gradient for it, else 0. Every rank's row holds the same flags, so each rank
receives, summed, how many ranks produced each gradient, with no collective of its own (DDP
all-reduces a bitmap of used parameters for the same purpose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["ShardSlot", "Bucket", "build_buckets"]


@dataclass(eq=False)
class ShardSlot:
    """Where one parameter's chunks sit: in the parameter, in its bucket, on this rank."""

    param: Tensor
    index: int  # position in the optimizer's parameter order (the state-dict key)
    numel: int
    chunk: int  # c = ceil(n / N)
    offset: int  # start of this parameter's chunk inside a bucket section
    valid: int  # real (unpadded) elements in this rank's chunk
    start: int  # first flat element this rank owns: rank * c
    # The parameter's version counter when this rank last wrote it (or laid it out): a later
    # one means it was replaced or edited from outside (load_state_dict, a rollback).
    written_version: int = field(default=-1)
    master_loaded: bool = False  # a checkpoint's master arrived since the last step


    def __post_init__(self) -> None:
        self.written_version = self.param._version

    def pad_flat(self, full: Tensor, world_size: int) -> Tensor:
        """``full`` (shaped like the parameter) flattened and zero-padded to ``N c``."""
        flat = torch.zeros(world_size * self.chunk, dtype=full.dtype, device=full.device)
        flat[:self.numel].copy_(full.reshape(-1))
        return flat

    def own_chunk(self, full: Tensor, world_size: int) -> Tensor:
        """This rank's padded chunk of a parameter-shaped tensor (a new tensor)."""
        return self.pad_flat(full, world_size)[self.start:self.start + self.chunk].clone()

    def unpad(self, gathered: Tensor) -> Tensor:
        """A parameter-shaped tensor from the N padded chunks concatenated in rank order."""
        return gathered[:self.numel].view(self.param.shape)


def _rows_from_flat(rows: Tensor, flat: Tensor, n: int, c: int) -> None:
    """Copy ``flat`` (n elements) into the (N, c) view ``rows`` row by row; pad with zeros."""
    if c == 0:
        return
    full = n // c
    rows[:full].copy_(flat[:full * c].view(full, c))
    rem = n - full * c
    if rem:
        rows[full, :rem].copy_(flat[full * c:])
        rows[full, rem:].zero_()
        full += 1
    rows[full:].zero_()


def _flat_from_rows(flat: Tensor, rows: Tensor, n: int, c: int) -> None:
    """Inverse of ``_rows_from_flat``: the first n elements of the (N, c) view into ``flat``."""
    if c == 0:
        return
    full = n // c
    flat[:full * c].view(full, c).copy_(rows[:full])
    rem = n - full * c
    if rem:
        flat[full * c:].copy_(rows[full, :rem])


@dataclass(eq=False)
class Bucket:
    """Parameters that share one reduce-scatter and one all-gather per step."""

    slots: list[ShardSlot]
    section: int
    world_size: int
    rank: int
    dtype: torch.dtype  # the parameters' (and the weight all-gather's)
    device: torch.device
    master_dtype: torch.dtype | None = None  # this rank's chunks; None: the parameters'
    reduce_dtype: torch.dtype | None = None  # the gradient reduce-scatter; None: the parameters'
    owned: Tensor = field(init=False)  # this rank's weight chunks; the inner params view it
    received: Tensor = field(init=False)  # reduce-scatter output: gradient chunks, use counts
    ready: set = field(default_factory=set)
    work: object = None  # the reduce-scatter in flight
    send: Tensor | None = None  # its input buffer, kept alive until it completes
    had_grad: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.master_dtype = self.master_dtype or self.dtype
        self.reduce_dtype = self.reduce_dtype or self.dtype
        self.owned = torch.zeros(self.section, dtype=self.master_dtype, device=self.device)
        self.received = torch.zeros(self.row, dtype=self.reduce_dtype, device=self.device)
        # The reduced gradient in the chunks' dtype, when the reduce-scatter's differs.
        self._grad = (None if self.reduce_dtype == self.master_dtype else
                      torch.zeros(self.section, dtype=self.master_dtype, device=self.device))

    @property
    def has_master(self) -> bool:
        return self.master_dtype != self.dtype

    @property
    def row(self) -> int:
        """Elements per rank in the gradient reduce-scatter: the section and the use flags."""
        return self.section + len(self.slots)

    @property
    def grad(self) -> Tensor:
        """This rank's reduced gradient chunks (in the chunks' dtype, after ``average``)."""
        return self.received[:self.section] if self._grad is None else self._grad

    @torch.no_grad()
    def average(self, world_size: int) -> None:
        """Turn the received sum into the mean over ranks, in the chunks' dtype."""
        if self._grad is None:
            self.received[:self.section].div_(world_size)
        else:
            self._grad.copy_(self.received[:self.section]).div_(world_size)

    @torch.no_grad()
    def owned_for_gather(self) -> Tensor:
        """This rank's chunks in the parameters' dtype, as the all-gather sends them."""
        return self.owned if not self.has_master else self.owned.to(self.dtype)

    @property
    def use_counts(self) -> Tensor:
        """How many ranks produced each slot's gradient (valid after the reduce-scatter)."""
        return self.received[self.section:]

    def trainable(self) -> bool:
        return any(s.param.requires_grad for s in self.slots)

    def expected(self) -> int:
        """Parameters whose gradient hook fires in a backward that uses all of them."""
        return sum(1 for s in self.slots if s.param.requires_grad)

    def chunk_view(self, buffer: Tensor, slot: ShardSlot) -> Tensor:
        return buffer[slot.offset:slot.offset + slot.chunk]

    def full_numel(self) -> int:
        return self.world_size * self.section

    @torch.no_grad()
    def pack_grads(self) -> Tensor:
        """The local gradients laid out rank-major (missing gradients as zeros), each row
        followed by the use flags."""
        send = torch.empty(self.world_size * self.row, dtype=self.reduce_dtype,
                           device=self.device)
        rows = send.view(self.world_size, self.row)
        self.had_grad = []
        for slot in self.slots:
            g = slot.param.grad
            self.had_grad.append(g is not None)
            view = rows[:, slot.offset:slot.offset + slot.chunk]
            if g is None:
                view.zero_()
            else:
                _rows_from_flat(view, g.detach().reshape(-1), slot.numel, slot.chunk)
        flags = torch.tensor(self.had_grad, dtype=self.reduce_dtype, device=self.device)
        rows[:, self.section:].copy_(flags.expand(self.world_size, -1))
        return send

    @torch.no_grad()
    def pull_owned(self) -> None:
        """Refresh this rank's weight chunks from the (full) module parameters.

        With master weights, a parameter written since this rank last wrote it (its version
        counter moved: ``model.load_state_dict``, a rollback, an in-place edit) replaces its
        whole master chunk, unless a checkpoint's master was loaded since the last step and
        the parameter is that master rounded (a resume, whichever of the two was loaded
        first). Otherwise only elements whose value differs from the master rounded to the
        parameters' dtype are taken (an edit through ``p.data``, which no counter sees), and
        the others keep the master's extra precision.
        """
        for slot in self.slots:
            chunk = self.chunk_view(self.owned, slot)[:slot.valid]
            piece = slot.param.detach().reshape(-1)[slot.start:slot.start + slot.valid]
            moved = slot.param._version != slot.written_version
            if not self.has_master or (moved and not (
                    slot.master_loaded and torch.equal(chunk.to(self.dtype), piece))):
                chunk.copy_(piece)
            else:
                chunk.copy_(torch.where(chunk.to(self.dtype) == piece, chunk, piece.to(chunk)))
            slot.written_version = slot.param._version
            slot.master_loaded = False
            self.chunk_view(self.owned, slot)[slot.valid:].zero_()

    @torch.no_grad()
    def load_master(self, slot: ShardSlot, value: Tensor) -> None:
        """A checkpoint's master chunk (see ``pull_owned``)."""
        self.chunk_view(self.owned, slot).copy_(value)
        slot.master_loaded = True

    @torch.no_grad()
    def write_params(self, gathered: Tensor) -> None:
        """Write an all-gathered (rank-major) weight buffer into the module parameters."""
        rows = gathered.view(self.world_size, self.section)
        for slot in self.slots:
            view = rows[:, slot.offset:slot.offset + slot.chunk]
            p = slot.param.detach()
            if p.is_contiguous():
                _flat_from_rows(p.view(-1), view, slot.numel, slot.chunk)
            else:
                flat = torch.empty(slot.numel, dtype=self.dtype, device=self.device)
                _flat_from_rows(flat, view, slot.numel, slot.chunk)
                p.copy_(flat.view(p.shape))
            slot.written_version = slot.param._version

    @torch.no_grad()
    def pack_params(self) -> Tensor:
        """The full module parameters laid out rank-major (for the initial broadcast)."""
        full = torch.empty(self.full_numel(), dtype=self.dtype, device=self.device)
        rows = full.view(self.world_size, self.section)
        for slot in self.slots:
            view = rows[:, slot.offset:slot.offset + slot.chunk]
            _rows_from_flat(view, slot.param.detach().reshape(-1), slot.numel, slot.chunk)
        return full


def build_buckets(params: list[Tensor], *, world_size: int, rank: int,
                  bucket_cap_bytes: int, master_dtype: torch.dtype | None = None,
                  reduce_dtype: torch.dtype | None = None,
                  order: list[int] | None = None) -> list[Bucket]:
    """Group parameters into buckets of at most ``bucket_cap_bytes`` (full, padded buffer).

    Parameters are taken in ``order`` (indices into ``params``), by default the reverse order,
    as DDP does at first: backward produces the last layers' gradients first, so the first
    buckets fill (and start their reduce-scatter) early. After the first backward the
    optimizer rebuilds its buckets in the order the gradients actually became ready.
    """
    buckets: list[Bucket] = []
    open_: dict[tuple, list[ShardSlot]] = {}
    sizes: dict[tuple, int] = {}

    def close(key: tuple) -> None:
        slots = open_.pop(key, None)
        if slots:
            dtype = key[0]
            low = dtype in (torch.bfloat16, torch.float16)
            buckets.append(Bucket(slots, sizes.pop(key), world_size, rank, dtype, key[1],
                                  master_dtype if low else None, reduce_dtype))

    for index in (reversed(range(len(params))) if order is None else order):
        p = params[index]
        key = (p.dtype, p.device)
        n = p.numel()
        c = math.ceil(n / world_size)
        bytes_ = world_size * c * p.element_size()
        if key in open_ and (sizes[key] * world_size * p.element_size() + bytes_
                             > bucket_cap_bytes):
            close(key)
        offset = sizes.get(key, 0)
        start = rank * c
        valid = max(0, min(c, n - start))
        open_.setdefault(key, []).append(ShardSlot(p, index, n, c, offset, valid, start))
        sizes[key] = offset + c
    for key in list(open_):
        close(key)
    return buckets
