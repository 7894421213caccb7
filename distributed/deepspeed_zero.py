"""What the DeepSpeed adapter needs to know about a ZeRO optimizer's fp32 master partitions.

ZeRO 1/2/3 keep, per (sub-)group, one flat fp32 master partition per rank and step the client
optimizer once per partition: stages 1/2 show it one param group at a time
(``param_groups = [group i]``), stage 3 puts the sub-group's partition into its group's
``params`` for the call and empties it afterwards. After each call the partition is copied to
the low-precision partition the forward pass gathers from; after the last, the model's weights
are published (stages 1/2: all-gather; stage 3: re-gather of the persistent parameters).

``ZeroPartitions`` names those partitions in stepping order, shows them to the client
optimizer all at once, and copies and publishes them again when the client moved them outside
DeepSpeed's own loop (one deferred step over every group; eval/train of momentum ascent).

deepspeed itself is never imported here: everything is read from the ZeRO optimizer object.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import all_gather_flat, wait

__all__ = ["ZeroPartitions"]


class ZeroPartitions:
    """The fp32 master partitions of a ZeRO stage 1-3 optimizer (``engine.optimizer``)."""

    def __init__(self, zero: Any, stage: int) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeroPartitions takes ZeRO stage 1, 2 or 3, got {stage}")
        self.zero = zero
        self.stage = stage
        if stage == 3:
            self.flats: list[Tensor] = list(zero.fp32_partitioned_groups_flat)
            self.group_index = [zero.sub_group_to_group_id[i] for i in range(len(self.flats))]
        else:
            self.flats = list(zero.single_partition_of_fp32_groups)
            self.group_index = list(range(len(self.flats)))

    @property
    def calls_per_step(self) -> int:
        """How many times DeepSpeed steps the client optimizer in one engine step."""
        return len(self.flats)

    @contextlib.contextmanager
    def shown(self, groups: list[dict[str, Any]]) -> Iterator[None]:
        """Every one of the client's ``groups`` (its full list) holds its master partitions in
        ``params`` (stage 3 empties them between steps); their own lists come back after."""
        saved = [(group, group["params"]) for group in groups]
        for index, group in enumerate(groups):
            group["params"] = [flat for flat, owner in zip(self.flats, self.group_index)
                               if owner == index]
        try:
            yield
        finally:
            for group, params in saved:
                group["params"] = params

    @torch.no_grad()
    def copy_to_model(self, indices: list[int] | None = None) -> None:
        """Copy master partitions (all, or ``indices``) into the low-precision partitions the
        forward pass gathers from; ``publish`` makes them visible."""
        zero = self.zero
        for i in range(len(self.flats)) if indices is None else indices:
            if self.stage == 3:
                zero.fp16_partitioned_groups_flat[i].data.copy_(self.flats[i].data)
                zero._unflatten_partitioned_parameters(i)  # as DeepSpeed's own copy does
            else:
                rank = dist.get_rank(group=zero.real_dp_process_group[i])
                zero.parallel_partitioned_bit16_groups[i][rank].data.copy_(self.flats[i].data)

    @torch.no_grad()
    def publish(self) -> None:
        """Make every rank's forward pass read the partitions owners just wrote."""
        zero = self.zero
        if self.stage == 3:
            # As DeepSpeed's step does: drop every gathered copy (the forward re-gathers from
            # the partitions), then re-gather the persistent (small) parameters.
            zero.parameter_offload.partition_all_parameters()
            if zero.persistent_parameters:
                zero.persistent_parameters[0].all_gather(zero.persistent_parameters)
            return
        for i, flat in enumerate(zero.bit16_groups_flat):
            group = zero.real_dp_process_group[i]
            own = zero.parallel_partitioned_bit16_groups[i][dist.get_rank(group=group)]
            wait(all_gather_flat(flat, own.clone(), group=group), None,
                 "all-gather of the published weights")
