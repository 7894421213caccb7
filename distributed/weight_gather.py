"""The all-gather of the updated weights at the end of a step: at once, or prefetched.

At once (default): every bucket's all-gather is started and written into the module's
parameters before ``step()`` returns, with at most ``BUCKETS_IN_FLIGHT`` full-size receive
buffers alive at a time.

Prefetched (``overlap_param_gather=True``, as Megatron's ``overlap_param_gather``): ``step()``
starts every bucket's all-gather, in the order the forward uses them (the reverse of the
gradient buckets), and returns, so the first layers compute while the last layers' weights are
still in flight. No read in a forward can outrun its gather:

- a module's forward pre-hook waits for its own parameters; a torch layer that reads its
  children's weights itself (``nn.MultiheadAttention`` reads ``out_proj.weight`` without
  calling ``out_proj``, ``nn.TransformerEncoderLayer``'s fast path reads every weight) waits for
  its whole subtree, as an FSDP unit does;
- while a module's forward runs with weights in flight, a torch function mode (``ReadGuard``)
  sees every torch operation and waits for the bucket of any parameter passed to it: custom
  modules that read a child's weight (a tied head's ``x @ self.wte.weight.T``) and
  ``torch.func.functional_call`` with the module's own parameters are covered too;
- under ``torch.compile`` the waits are never traced away (they run at every call), and as the
  guard cannot run in a compiled forward, a module of the user's own waits for its whole
  subtree instead (less overlap, the same weights);
- ``state_dict()`` and ``load_state_dict()`` of the module or any submodule wait for all.

An in-place edit of a parameter whose gather is still in flight (``p.clamp_()`` under
``no_grad`` right after ``step()``) would be overwritten when the gather lands: its version
counter is recorded when the gather starts, and a change is an error when it lands (the
gathered weights are written, so every rank holds the optimizer's weights). Reads outside any
forward (``copy.deepcopy``, ``parameters_to_vector``, values from ``named_parameters()``) and
edits through ``p.data`` are not seen: call ``ShardedNeuroOptima.wait_for_weights()`` first.
The cost of prefetching is memory: all receive buffers are alive until the forward reaches them.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .collectives import all_gather_flat, wait
from .flat_shards import Bucket

__all__ = ["WeightGather", "BUCKETS_IN_FLIGHT", "ReadGuard"]

BUCKETS_IN_FLIGHT = 2  # all-gathers in flight at once when not prefetching

# torch layers whose forward only calls their children: no direct read of a child's weight.
_DELEGATING = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.TransformerEncoder,
               nn.TransformerDecoder, nn.Transformer)


def _reads_children(sub: nn.Module) -> bool:
    """A torch layer that may read its children's weights in its own forward."""
    return type(sub).__module__.startswith("torch.nn.") and not isinstance(sub, _DELEGATING)


class ReadGuard(TorchFunctionMode):
    """Waits for the gather of every in-flight parameter a torch operation is handed."""

    def __init__(self, gather: "WeightGather") -> None:
        super().__init__()
        self.gather = gather

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.gather._pending:
            self.gather._wait_for_reads(args, kwargs.values())
        return func(*args, **kwargs)


class WeightGather:
    def __init__(self, buckets: list[Bucket], process_group, timeout: datetime.timedelta | None,
                 module: nn.Module | None = None, prefetch: bool = False) -> None:
        if prefetch and module is None:
            raise ValueError("overlap_param_gather=True needs module=...: the forward "
                             "pre-hooks of its submodules wait for their weights")
        self.buckets = buckets
        self.process_group = process_group
        self.timeout = timeout
        self.prefetch = prefetch
        # bucket position -> (out, work, version of each slot's parameter at the start)
        self._pending: dict[int, tuple[Tensor, Any, list[int]]] = {}
        self._handles: list = []
        self._entered: list[tuple[nn.Module, ReadGuard | None, bool]] = []  # forwards running
        self._names: dict[Tensor, str] = {}
        self._position_of_id: dict[int, int] = {}
        if prefetch:
            self._hook(module)

    def _hook(self, module: nn.Module) -> None:
        position = {slot.param: i for i, b in enumerate(self.buckets) for slot in b.slots}
        self._position_of_id = {id(p): i for p, i in position.items()}
        self._names = {p: name for name, p in module.named_parameters(remove_duplicate=False)}
        # Run at every call, never traced: a compiled forward must still wait at run time.
        wait_for = torch.compiler.disable(self.flush)
        for sub in module.modules():
            own = sub.parameters(recurse=_reads_children(sub))
            mine = sorted({position[p] for p in own if p in position})
            if mine:
                self._handles.append(sub.register_forward_pre_hook(
                    lambda _m, _a, mine=mine: wait_for(mine)))
            subtree = sorted({position[p] for p in sub.parameters() if p in position})
            if subtree and not type(sub).__module__.startswith("torch.nn."):
                # Under torch.compile, where the guard cannot run, a module of the user's own
                # waits for its whole subtree, as an FSDP unit does.
                self._handles.append(sub.register_forward_pre_hook(
                    lambda _m, _a, subtree=subtree: (
                        wait_for(subtree) if torch.compiler.is_compiling() else None)))
            if subtree:
                # First of its pre-hooks (it never raises); the exit runs even on an error.
                self._handles.append(sub.register_forward_pre_hook(self._enter, prepend=True))
                self._handles.append(sub.register_forward_hook(self._exit, always_call=True))
            # Reading or loading the weights of any submodule: first let the gathers land.
            self._handles.append(sub.register_state_dict_pre_hook(lambda *_: self.flush()))
            self._handles.append(sub.register_load_state_dict_pre_hook(lambda *_: self.flush()))

    # The guard is on inside the forward of a module of the user's own while weights are in
    # flight, and off inside torch's layers: those wait for what they read in their pre-hooks,
    # and some (attention, the encoder layers) pick their fused fast path only when no torch
    # function mode is active, so the guard would change their arithmetic.

    def _top_guard(self) -> ReadGuard | None:
        depth = torch._C._len_torch_function_stack()
        top = torch._C._get_function_stack_at(depth - 1) if depth else None
        return top if isinstance(top, ReadGuard) and top.gather is self else None

    def _enter(self, module: nn.Module, _args: Any) -> None:
        if torch.compiler.is_compiling():  # traced: the pre-hooks' waits alone apply
            self._entered.append((module, None, False))
            return
        want = bool(self._pending) and not type(module).__module__.startswith("torch.nn.")
        top = self._top_guard()
        change = None
        if want and top is None:
            change = ReadGuard(self)
            change.__enter__()
        elif not want and top is not None:
            change = top
            top.__exit__(None, None, None)
        self._entered.append((module, change, want))

    def _exit(self, module: nn.Module, _args: Any, _out: Any) -> None:
        if not self._entered or self._entered[-1][0] is not module:
            return  # an earlier pre-hook raised before ours ran
        _, change, pushed = self._entered.pop()
        if change is None:
            return
        if pushed:
            if self._top_guard() is change:
                change.__exit__(None, None, None)
        else:
            change.__enter__()

    def _wait_for_reads(self, args, more) -> None:
        wanted = set()
        for values in (args, more):
            for a in values:
                if isinstance(a, (list, tuple)):
                    for b in a:
                        if id(b) in self._position_of_id:
                            wanted.add(self._position_of_id[id(b)])
                elif id(a) in self._position_of_id:
                    wanted.add(self._position_of_id[id(a)])
        if wanted:
            self.flush(sorted(wanted, reverse=True))

    def _start(self, position: int) -> tuple[Tensor, Any, list[int]]:
        bucket = self.buckets[position]
        out = torch.empty(bucket.full_numel(), dtype=bucket.dtype, device=bucket.device)
        versions = [slot.param._version for slot in bucket.slots]
        return out, all_gather_flat(out, bucket.owned_for_gather(), self.process_group), versions

    def _finish(self, position: int, out: Tensor, work: Any,
                versions: list[int] | None = None) -> list[str]:
        """Wait for one bucket and write it; returns the parameters edited meanwhile."""
        wait(work, self.timeout, f"all-gather of weight bucket {position}")
        bucket = self.buckets[position]
        edited = [self._names.get(slot.param, f"parameter {slot.index}")
                  for slot, v in zip(bucket.slots, versions or ()) if slot.param._version != v]
        bucket.write_params(out)
        return edited

    @staticmethod
    def _refuse(edited: list[str]) -> None:
        if edited:
            raise RuntimeError(
                f"{', '.join(edited)} changed in place after step() while the updated weights "
                f"were still being all-gathered (overlap_param_gather=True): the edit was made "
                f"to the weights before the step, and the gathered weights have replaced it. "
                f"Call optimizer.wait_for_weights() before editing weights after step(), or "
                f"construct with overlap_param_gather=False")

    @torch.no_grad()
    def gather(self) -> None:
        """All-gather every bucket's updated chunks into the module's parameters."""
        self.flush()
        if self.prefetch:
            for position in reversed(range(len(self.buckets))):  # the forward's order
                self._pending[position] = self._start(position)
            return
        in_flight: list[tuple[int, Tensor, Any, list[int]]] = []
        for position in range(len(self.buckets)):
            if len(in_flight) >= BUCKETS_IN_FLIGHT:
                self._finish(*in_flight.pop(0))
            in_flight.append((position, *self._start(position)))
        for item in in_flight:
            self._finish(*item)

    @torch.no_grad()
    def flush(self, positions: list[int] | None = None) -> None:
        """Wait for (and write) the prefetched buckets at ``positions``, or all of them."""
        if not self._pending:
            return
        edited: list[str] = []
        for position in (sorted(self._pending, reverse=True) if positions is None
                         else positions):
            item = self._pending.pop(position, None)
            if item is not None:
                edited += self._finish(position, *item)
        self._refuse(edited)

    def remove(self) -> None:
        self.flush()
        for handle in self._handles:
            handle.remove()
        self._handles = []
