"""``ShardedNeuroOptima``: NeuroOptima with its state split ZeRO-style across data-parallel ranks.

The model is not wrapped in DDP; the optimizer owns gradient synchronization:

    backward  -> post-accumulate-grad hooks fill buckets -> async reduce-scatter per bucket
    step      -> wait, average  -> inner NeuroOptima updates this rank's chunks
              -> all-gather the updated chunks into every rank's full parameters

The inner optimizer is a ``NeuroOptima`` whose parameters are this rank's flat, padded chunks
(views into each bucket's ``owned`` buffer) and whose gradients are the reduce-scattered chunks,
so every kernel, SAM, Lookahead, clipping, the non-finite skip and the state names are the core's
own. Its only change is ``_reduce_norm_stats``: one all-reduce of the packed
``[sum_sq, nonfinite]`` pair. Padding elements have zero weight and zero gradient, so they add
nothing to any norm and every update rule leaves them at zero.

SAM, ``sam_mode="global"``: reduce-scatter the first-pass gradients, collective-aware norm,
perturb the owned chunks, all-gather the perturbed weights, second pass, restore the owned
chunks from the chunk-sized ``sam.origin``, update, all-gather. ``sam_mode="local"``: each rank
perturbs its full weights with its own local gradient and local norm (no communication), and the
second pass runs as a plain step; the owned chunks still hold ``w``, and the final all-gather
overwrites every perturbed element.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.optim.optimizer import Optimizer

from neurooptima import NeuroOptima, reduced_state
from neurooptima.optimizer import _tensor_step, run_step
from neurooptima.norms import local_norm_stats, norm_from_stats
from neurooptima.optimizer import CLIP_EPS
from neurooptima.integrations import guards
from neurooptima.sam import gradient_due, norm_terms, perturb_
from neurooptima.state_validation import check_state_dict
from neurooptima.validation import check_group, prepare_group

from .agreement import check_same_on_all_ranks, describe_parameters
from .amp import TORCH_SCALER_ERROR, torch_scaler_reading
from .buffers import BufferBroadcast
from .collectives import all_gather_flat, all_reduce_norm_stats, broadcast_, wait
from .flat_shards import Bucket, ShardSlot, build_buckets
from .grad_sync import GradientSync
from .topology import resolve_topology
from .weight_gather import WeightGather

__all__ = ["ShardedNeuroOptima", "SAM_MODES", "MASTER"]

MASTER = "master"  # checkpoint key of a parameter's float32 master weights

SAM_MODES = ("global", "local")

# Every per-group setting of NeuroOptima; ``skipped_steps`` is a counter, not a setting.
HYPER_KEYS = ("lr", "weight_decay", "sam_rho", "lookahead_k", "lookahead_alpha", "betas", "eps",
              "update", "beta_diff", "no_prox", "sam_adaptive", "sam_eta", "max_grad_norm",
              "maximize", "foreach", "fused", "state_dtype", "sam_ascent", "sam_warmup",
              "sam_interval", "sam_start")
# What the inner optimizer advances per group between steps (counters, momentum ascent's scale
# and mode); mirrored here so that state dicts and checkpoints carry them.
STEP_KEYS = ("skipped_steps", "sam_clock", "ascent_scale", "ascent_eval")

class _ShardOptimizer(NeuroOptima):
    """NeuroOptima over this rank's chunks; norm statistics are summed over the group."""

    def __init__(self, params: list[dict[str, Any]], *, group, timeout, **defaults) -> None:
        self._group = group
        self._timeout = timeout
        super().__init__(params, **defaults)

    def _reduce_norm_stats(self, stats: Tensor) -> Tensor:
        return all_reduce_norm_stats(stats, self._group, self._timeout)

    def update_only(self) -> None:
        """Check, clip and apply the update (the SAM-local second pass: no restore needed)."""
        self._update()


def _as_timeout(timeout: Any) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        if timeout is not None and timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be None, a positive number of seconds or a timedelta, "
                         f"got {timeout!r}")
    return datetime.timedelta(seconds=timeout)


class ShardedNeuroOptima(Optimizer):
    r"""NeuroOptima with ZeRO-style sharded state and built-in gradient synchronization.

    Every rank builds the same model (weights are broadcast from the group's first rank at
    construction) and calls this optimizer like ``NeuroOptima``; do not wrap the model in DDP.
    The result of a step equals single-process ``NeuroOptima`` on the concatenated global batch
    with a mean loss (gradients are averaged over ranks, as DDP does).

    Args:
        params: parameters or param groups (the same on every rank).
        process_group: the data-parallel group (default: the whole world).
        device_mesh: instead of ``process_group``, a ``DeviceMesh``: 1-D (shard), or 2-D
            ``(replicate, shard)`` for hybrid sharding (state sharded within the shard group,
            replicated across the replicate group; see ``topology``).
        sam_mode: ``"global"`` (exact SAM on the global batch) or ``"local"`` (per-replica
            perturbation from each rank's own gradient, no communication in the first pass).
        bucket_cap_mb: size of a gradient bucket (full, padded buffer) in MiB, > 0.
        timeout: seconds (or a timedelta) a collective may wait for its peers before this rank
            raises; None uses the process group's timeout.
        master_weights: with bfloat16 or float16 parameters, keep this rank's chunks in float32
            (the master weights, sharded with the state): the update runs in float32 and the
            all-gather sends the parameters' dtype. False: update the parameters' dtype.
        reduce_dtype: dtype of the gradient reduce-scatter (e.g. ``torch.float32`` for bf16
            parameters); None: the parameters' dtype.
        module: the model; with ``broadcast_buffers`` its buffers (BatchNorm statistics) are
            broadcast from the group's first rank before every training forward, as DDP does.
        broadcast_buffers: switch for the above (needs ``module``).
        overlap_param_gather: return from ``step()`` with the weights' all-gather in flight;
            every read of a weight in a forward waits for its gather, and an in-place edit
            of a weight still in flight raises (needs ``module``; the contract is in
            ``weight_gather``).
        lr, weight_decay, sam_rho, lookahead_k, lookahead_alpha, betas, eps, update, beta_diff,
        no_prox, sam_adaptive, sam_eta, max_grad_norm, maximize, foreach, fused, state_dtype,
        sam_ascent, sam_warmup, sam_interval, sam_start:
            as ``NeuroOptima`` (momentum ascent perturbs this rank's (master) chunks and the
            all-gather ships ``w~``; its norm is local sums plus one scalar all-reduce); with ``fused=True`` the compiled kernel runs once per gradient
            bucket on this rank's chunks, which are already consecutive views of one buffer;
            ``state_dtype`` stores this rank's chunks of the rule buffers in that dtype.

    After backward the gradients belong to the optimizer (see ``grad_sync``): clip with
    ``max_grad_norm`` or ``clip_grad_norm_``, scale the loss with ``ShardedGradScaler``; an edit
    of ``p.grad`` after backward raises. A parameter some ranks produce no gradient for gets the
    mean with zeros; one no rank produces a gradient for is not updated. ``requires_grad`` may
    change between steps. Accumulate micro-batches inside ``no_sync()``.
    """

    # torch's GradScaler hands the scale and the overflow flag to step() (see ``amp``).
    _step_supports_amp_scaling = True

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # torch's own scalers unscale p.grad through here, after it was reduced (see ``amp``).
        if torch_scaler_reading(sys._getframe(1)):
            raise RuntimeError(TORCH_SCALER_ERROR)
        return self.__dict__["param_groups"]  # where torch's load_state_dict writes them

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.__dict__["param_groups"] = groups

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], *,
                 process_group: dist.ProcessGroup | None = None,
                 device_mesh: DeviceMesh | None = None, sam_mode: str = "global",
                 bucket_cap_mb: float = 25, timeout: float | datetime.timedelta | None = None,
                 master_weights: bool = True, reduce_dtype: torch.dtype | None = None,
                 module: nn.Module | None = None, broadcast_buffers: bool = True,
                 overlap_param_gather: bool = False,
                 lr: float | None = None, weight_decay: float = 0.01, sam_rho: float | None = None,
                 lookahead_k: int | None = 0, lookahead_alpha: float = 0.5,
                 betas: tuple[float, ...] | None = None, eps: float = 1e-8,
                 update: str = "adan", beta_diff: float = 0.92, no_prox: bool = False,
                 sam_adaptive: bool = False, sam_eta: float = 0.01,
                 max_grad_norm: float | None = None, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None,
                 state_dtype: torch.dtype | None = None, sam_ascent: str | None = None,
                 sam_warmup: int = 0, sam_interval: int = 1, sam_start: int = 1) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedNeuroOptima needs an initialized process group: call "
                               "torch.distributed.init_process_group() first (e.g. under "
                               "torchrun)")
        if sam_mode not in SAM_MODES:
            raise ValueError(f"sam_mode must be one of {', '.join(map(repr, SAM_MODES))}, "
                             f"got {sam_mode!r}")
        if (isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float))
                or not bucket_cap_mb > 0):
            raise ValueError(f"bucket_cap_mb must be a number > 0, got {bucket_cap_mb!r}")
        self.topology = resolve_topology(process_group, device_mesh)
        # The shard group: reduce-scatter, norms and all-gather run in it.
        self.process_group = process_group = self.topology.shard_group
        self.rank = self.topology.shard_rank
        self.world_size = self.topology.shard_size
        self.sam_mode = sam_mode
        self.bucket_cap_mb = bucket_cap_mb
        if not isinstance(master_weights, bool):
            raise ValueError(f"master_weights must be True or False, got {master_weights!r}")
        if reduce_dtype is not None and not (isinstance(reduce_dtype, torch.dtype)
                                             and reduce_dtype.is_floating_point):
            raise ValueError(f"reduce_dtype must be None or a floating-point torch dtype, got "
                             f"{reduce_dtype!r}")
        self.master_weights = master_weights
        self.reduce_dtype = reduce_dtype
        self.timeout = _as_timeout(timeout)
        defaults = dict(lr=lr, weight_decay=weight_decay, sam_rho=sam_rho,
                        lookahead_k=lookahead_k, lookahead_alpha=lookahead_alpha, betas=betas,
                        eps=eps, update=update, beta_diff=beta_diff, no_prox=no_prox,
                        sam_adaptive=sam_adaptive, sam_eta=sam_eta, max_grad_norm=max_grad_norm,
                        maximize=maximize, foreach=foreach, fused=fused,
                        state_dtype=state_dtype, sam_ascent=sam_ascent, sam_warmup=sam_warmup,
                        sam_interval=sam_interval, sam_start=sam_start)
        check_group(dict(defaults))
        self._constructed = False
        self._sam_phase: str | None = None  # None, "global" or "local" between the passes
        self._no_sync = False
        self._clipped = False  # clip_grad_norm_ ran on this step's gradients
        self._amp_agreed = False  # ShardedGradScaler checked this step's gradients
        super().__init__(params, defaults)
        self._check_same_on_all_ranks(module)
        self._constructed = True
        # Framework paths that would drop or mis-scale SAM's second pass are refused.
        self.register_step_pre_hook(guards.check_step)

        self._module, self._overlap_param_gather = module, overlap_param_gather
        self._rebuilt = False  # buckets laid out in the measured order of the gradients
        self._lay_out(order=None)
        self._broadcast_initial_weights()
        for bucket in self._buckets:
            bucket.pull_owned()
        inner_groups = [{"params": [self._chunks[p] for p in group["params"]],
                         **{k: group[k] for k in HYPER_KEYS}}
                        for group in self.param_groups]
        self._inner = _ShardOptimizer(inner_groups, group=process_group, timeout=self.timeout,
                                      **defaults)
        self._buffers = (BufferBroadcast(module, self.topology.groups, self.timeout)
                         if module is not None and broadcast_buffers else None)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _lay_out(self, order: list[int] | None) -> None:
        """Buckets in ``order`` (parameter indices; None: reverse), the chunks, the gradient
        sync and the weight gather over them."""
        self._buckets = build_buckets(
            self._params(), world_size=self.world_size, rank=self.rank,
            bucket_cap_bytes=int(self.bucket_cap_mb * 2**20),
            master_dtype=torch.float32 if self.master_weights else None,
            reduce_dtype=self.reduce_dtype, order=order)
        self._slots: dict[Tensor, tuple[Bucket, ShardSlot]] = {}
        self._chunks: dict[Tensor, Tensor] = {}  # module parameter -> its chunk (inner param)
        for bucket in self._buckets:
            for slot in bucket.slots:
                self._slots[slot.param] = (bucket, slot)
                self._chunks[slot.param] = bucket.chunk_view(bucket.owned, slot)
        # A weak reference: an optimizer the user drops is freed at once, and with it the
        # gradient hooks (they hold the sync weakly), without waiting for the cycle collector.
        me = weakref.ref(self)
        self._sync = GradientSync(self._buckets, self.process_group, self.world_size,
                                  self.timeout,
                                  suspended=lambda: me()._no_sync or me()._holds_first_pass(),
                                  replicate_group=self.topology.replicate_group,
                                  replicas=self.topology.replicas)
        self._weights = WeightGather(self._buckets, self.process_group, self.timeout,
                                     self._module, prefetch=self._overlap_param_gather)

    @torch.no_grad()
    def _rebuild_buckets(self) -> None:
        """Once, after the first step: lay the buckets out in the order backward produced the
        gradients (rank 0's order, so all ranks agree), as DDP rebuilds its buckets, so each
        bucket's reduce-scatter starts as soon as its gradients exist."""
        self._rebuilt = True
        seen = list(dict.fromkeys(self._sync.ready_order))
        known = set(seen)
        order = seen + [i for i in reversed(range(len(self._params()))) if i not in known]
        for group in self.topology.groups:
            box = [order]
            dist.broadcast_object_list(box, src=dist.get_global_rank(
                group if group is not None else dist.group.WORLD, 0), group=group)
            order = box[0]
        def layout(buckets: list[Bucket]) -> list[list[int]]:
            return [[slot.index for slot in b.slots] for b in buckets]

        planned = build_buckets(self._params(), world_size=self.world_size, rank=self.rank,
                                bucket_cap_bytes=int(self.bucket_cap_mb * 2**20), order=order)
        if layout(planned) == layout(self._buckets):
            self._sync.record_order = False
            return
        old_chunks, old_sync, old_weights = self._chunks, self._sync, self._weights
        old_weights.remove()  # waits for prefetched weights
        old_sync.remove_hooks()
        self._lay_out(order)
        moved = {}
        for p, chunk in self._chunks.items():
            old = old_chunks[p]
            chunk.copy_(old)  # weights or float32 masters
            moved[old] = chunk
        for group in self._inner.param_groups:
            group["params"] = [moved[c] for c in group["params"]]
        self._inner.state = type(self._inner.state)(
            self._inner.state.default_factory,
            {moved.get(k, k): v for k, v in self._inner.state.items()})
        getattr(self._inner, "_fused_layouts", {}).clear()
        self._sync.record_order = False

    # ---------------------------------------------------------------- construction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_constructed", False):
            raise RuntimeError("ShardedNeuroOptima shards its parameters at construction; pass "
                               "every param group to the constructor")
        super().add_param_group(param_group)
        prepare_group(self.param_groups[-1], type(self).__name__)

    def _check_same_on_all_ranks(self, module: nn.Module | None) -> None:
        """Every rank must pass the same settings and parameters; else all raise at once."""
        names = {p: n for n, p in module.named_parameters()} if module is not None else {}
        check_same_on_all_ranks({
            "settings": {"sam_mode": self.sam_mode, "bucket_cap_mb": self.bucket_cap_mb,
                         "master_weights": self.master_weights,
                         "reduce_dtype": str(self.reduce_dtype)},
            "groups": [{"hyper": {k: group[k] for k in HYPER_KEYS},
                        "params": describe_parameters(group["params"], names)}
                       for group in self.param_groups]}, self.topology.groups)

    @torch.no_grad()
    def _broadcast_initial_weights(self) -> None:
        for i, bucket in enumerate(self._buckets):
            full = bucket.pack_params()
            for group in self.topology.groups:
                broadcast_(full, group, self.timeout,
                           f"broadcast of the initial weights (bucket {i})")
            bucket.write_params(full)

    def remove_hooks(self) -> None:
        """Detach the gradient, buffer and weight hooks (the optimizer stops synchronizing)."""
        self._sync.remove_hooks()
        self._weights.remove()
        if self._buffers is not None:
            self._buffers.remove()

    # ---------------------------------------------------------------- properties

    @property
    def local_optimizer(self) -> NeuroOptima:
        """The inner ``NeuroOptima`` over this rank's chunks (its ``state`` is this rank's)."""
        return self._inner

    @property
    def sam_enabled(self) -> bool:
        """Whether gradient-ascent SAM (two gradients) runs on some steps."""
        return any(group["sam_rho"] > 0 and group["sam_ascent"] == "gradient"
                   for group in self.param_groups)

    @property
    def sam_due(self) -> bool:
        """Whether the coming step runs gradient-ascent SAM (two passes); every rank agrees."""
        return any(gradient_due(group) for group in self.param_groups)

    # ---------------------------------------------------------------- momentum ascent

    @torch.no_grad()
    def eval(self) -> None:
        """Every rank's model to the weights ``w`` (momentum ascent; else a no-op); a
        collective call. ``train()`` goes back to ``w~`` bit for bit."""
        self._move_between_points(self._inner.eval)

    @torch.no_grad()
    def train(self) -> None:
        """Back to the momentum-ascent point after ``eval()``; a collective call."""
        self._move_between_points(self._inner.train)

    def _move_between_points(self, move: Callable[[], None]) -> None:
        if self._sam_phase is not None:
            raise RuntimeError("eval()/train() between first_step() and second_step()")
        self._sync_groups_to_inner()
        self._pull_chunks()
        before = [group["ascent_eval"] for group in self._inner.param_groups]
        move()
        self._sync_groups_from_inner()
        if before != [group["ascent_eval"] for group in self._inner.param_groups]:
            self._gather_weights()

    @property
    def in_second_pass(self) -> bool:
        return self._sam_phase is not None

    def _load_master(self, param: Tensor, value: Tensor) -> None:
        """A checkpoint's float32 master chunk of ``param``: kept at the next step also when
        the module's weights are loaded after it (see ``flat_shards``)."""
        bucket, slot = self._slots[param]
        bucket.load_master(slot, value)

    def chunk_of(self, param: Tensor) -> Tensor:
        """This rank's flat, padded chunk of ``param`` (a parameter of the inner optimizer)."""
        return self._chunks[param]

    # ---------------------------------------------------------------- gradient sync

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally: backward passes inside start no communication."""
        previous, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = previous

    def _holds_first_pass(self) -> bool:
        # SAM-local's first pass perturbs with the local gradient: nothing to reduce.
        return self.sam_mode == "local" and self._sam_phase is None and self.sam_due

    def _finish_reduction(self) -> None:
        self._sync.reduce(self._chunks)

    def _discard_pending(self) -> None:
        self._sync.discard()
        for chunk in self._chunks.values():
            chunk.grad = None
        self._clipped = False
        self._amp_agreed = False

    # ---------------------------------------------------------------- clipping and AMP

    def _reduced_grads(self) -> list[Tensor]:
        self._finish_reduction()
        return [c.grad for c in self._chunks.values() if c.grad is not None]

    def _reduced_stats(self, grads: list[Tensor], *, norm: bool) -> Tensor:
        """Global ``[sum of squares, non-finite count]`` of the reduced gradients: each rank's
        chunks, one all-reduce of 16 bytes."""
        device = self._buckets[0].device if self._buckets else None
        stats = local_norm_stats(grads, device, norm=norm)
        return all_reduce_norm_stats(stats, self.process_group, self.timeout)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> Tensor:
        """Clip the reduced gradients to a global L2 norm of ``max_norm``; returns the norm.

        Call between backward and step, instead of ``torch.nn.utils.clip_grad_norm_`` (which
        would see only this rank's unreduced ``p.grad``). The norm comes from each rank's chunks
        and one scalar all-reduce, as FSDP's ``clip_grad_norm_``; the scaling is
        ``torch.nn.utils.clip_grad_norm_``'s, ``max_norm / (norm + 1e-6)`` capped at 1. With a
        loss scaler, call ``scaler.unscale_(optimizer)`` first.
        """
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm < 0:
            raise ValueError(f"max_norm must be a real number >= 0, got {max_norm!r}")
        if norm_type != 2.0:
            raise ValueError(f"norm_type must be 2.0 (the L2 norm, which the sharded norm "
                             f"statistics sum), got {norm_type!r}")
        grads = self._reduced_grads()
        stats = self._reduced_stats(grads, norm=True)
        total = torch.where(stats[1] > 0, torch.full_like(stats[0], float("nan")),
                            stats[0].sqrt())
        if error_if_nonfinite and bool(stats[1] > 0):
            raise RuntimeError("the total norm of the gradients is non-finite, so it cannot be "
                               "clipped; set error_if_nonfinite=False to let the step skip it")
        if grads:
            coef = torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        self._clipped = True
        return total.float()

    @torch.no_grad()
    def _unscale_reduced_(self, inv_scale: Tensor | None) -> Tensor:
        """For ``ShardedGradScaler``: multiply the reduced gradients by ``inv_scale`` (None:
        leave them) and return the all-ranks overflow flag, a float32 tensor of shape (1,)."""
        if inv_scale is not None and self._clipped:
            raise RuntimeError("scaler.unscale_(optimizer) after optimizer.clip_grad_norm_(): "
                               "the norm was taken of loss-scaled gradients; unscale first")
        grads = self._reduced_grads()
        if inv_scale is not None and grads:
            torch._foreach_mul_(grads, inv_scale.to(grads[0].device, grads[0].dtype))
        stats = self._reduced_stats(grads, norm=False)
        self._amp_agreed = True
        return (stats[1:] > 0).float()

    def _apply_loss_scale(self) -> bool:
        """torch's ``_step_supports_amp_scaling`` protocol: ``grad_scale`` (None once
        unscaled) and ``found_inf`` are set on the optimizer by ``GradScaler.step``. Returns
        whether the loss-scale overflow check (the same on every rank) skips this step."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return False
        if not self._amp_agreed:
            raise RuntimeError(TORCH_SCALER_ERROR)
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            return bool(found_inf.sum() > 0)
        if self._clipped:
            raise RuntimeError("optimizer.clip_grad_norm_() ran on loss-scaled gradients: call "
                               "scaler.unscale_(optimizer) before clipping, or clip with "
                               "max_grad_norm=..., which acts after unscaling")
        grads = self._reduced_grads()
        if grads:
            inv_scale = grad_scale.double().reciprocal().float()
            torch._foreach_mul_(grads, inv_scale.to(grads[0].device, grads[0].dtype))
        # As torch's GradScaler does for optimizers without the protocol: an overflow is the
        # scaler's business (it backs off), not a non-finite skip of the optimizer's.
        return bool(found_inf.sum() > 0)

    def _gather_weights(self) -> None:
        self._weights.gather()

    def wait_for_weights(self) -> None:
        """With ``overlap_param_gather``: wait until every updated weight is in the module.
        Forwards and ``state_dict()`` wait by themselves; call this before reading or editing
        weights outside a forward (``copy.deepcopy``, ``parameters_to_vector``, ``p.clamp_``)."""
        self._weights.flush()

    def _pull_chunks(self) -> None:
        # The module's weights are the truth between steps (a user may load or edit them).
        self._weights.flush()
        for bucket in self._buckets:
            bucket.pull_owned()

    def _sync_groups_to_inner(self) -> None:
        for outer, inner in zip(self.param_groups, self._inner.param_groups):
            for key in HYPER_KEYS + STEP_KEYS:
                if key in outer:  # groups saved before an option existed lack it
                    inner[key] = outer[key]

    def _sync_groups_from_inner(self) -> None:
        for outer, inner in zip(self.param_groups, self._inner.param_groups):
            for key in STEP_KEYS:
                outer[key] = inner[key]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._discard_pending()
        super().zero_grad(set_to_none)

    # ---------------------------------------------------------------- SAM phases

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """SAM's first phase (after the first backward): move the weights to ``w + e``;
        ``zero_grad=True`` then zeroes the gradients for the second pass."""
        if self._sam_phase is not None:
            raise RuntimeError("first_step() was called twice; call second_step() in between")
        self._sync_groups_to_inner()
        self._pull_chunks()
        if self.sam_mode == "global":
            self._finish_reduction()
            self._inner.first_step()
            self._sam_phase = "global"
            if self._inner._sam_phase == "perturbed":
                self._gather_weights()
        else:
            self._perturb_locally()
            self._sam_phase = "local"
        self._discard_pending()
        if zero_grad:
            self.zero_grad()

    def _perturb_locally(self) -> None:
        """SAM-local: this rank's own gradient and norm perturb its full weights."""
        per_group, terms = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            if group["maximize"] and grads:
                grads = list(torch._foreach_neg(grads))
            per_group.append((params, grads))
            terms += norm_terms(params, grads, adaptive=group["sam_adaptive"],
                                eta=group["sam_eta"])
        norm, finite = norm_from_stats(local_norm_stats(terms))
        if not finite:
            return  # the second pass runs at w on this rank
        for group, (params, grads) in zip(self.param_groups, per_group):
            if gradient_due(group):
                perturb_(params, grads, rho=group["sam_rho"], norm=norm,
                         adaptive=group["sam_adaptive"], eta=group["sam_eta"])

    def second_step(self, zero_grad: bool = False) -> None:
        """SAM's second phase (after the second backward): restore ``w`` and update;
        ``zero_grad=True`` then zeroes the gradients."""
        if self._sam_phase is None:
            raise RuntimeError("second_step() needs a preceding first_step()")
        self.step()
        if zero_grad:
            self.zero_grad()

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One optimization step on every rank; returns the closure's (first-pass) loss."""
        if self._sam_phase is None:
            self._inner._check_training()
        return run_step(self, closure, self._finish_step)

    def _finish_step(self) -> None:
        self._sync_groups_to_inner()
        phase = self._sam_phase
        if phase is None:
            self._pull_chunks()
        try:
            self._finish_reduction()
            if self._apply_loss_scale():  # loss-scale overflow: no update on any rank
                if phase == "global":
                    self._inner._restore()
            elif phase == "global":
                self._inner.step()  # restores the owned chunks from sam.origin, then updates
            else:
                self._inner.update_only()  # plain step, or SAM-local (chunks still hold w)
        finally:
            self._discard_pending()
        self._sam_phase = None
        self._gather_weights()
        self._sync_groups_from_inner()
        if not self._rebuilt:
            self._rebuild_buckets()

    # ---------------------------------------------------------------- full state dict

    def _slot_list(self) -> list[ShardSlot]:
        return sorted((slot for _, slot in self._slots.values()), key=lambda s: s.index)

    def _bucket_of(self, slot: ShardSlot) -> Bucket:
        return self._slots[slot.param][0]

    def _gather_chunk(self, value: Tensor, slot: ShardSlot, key: str) -> Tensor:
        """The parameter-shaped whole of a chunk-sized tensor, from every rank (collective)."""
        gathered = value.new_empty(self.world_size * slot.chunk)
        wait(all_gather_flat(gathered, value.detach().contiguous(), self.process_group),
             self.timeout, f"all-gather of state {key!r} of parameter {slot.index}")
        return slot.unpad(gathered).clone()

    @torch.no_grad()
    def state_dict(self) -> dict[str, Any]:
        """The full (unsharded) state dict, in ``NeuroOptima``'s format; a collective call.

        Every rank receives the whole dict; it loads into single-process ``NeuroOptima``.
        With master weights each parameter's entry also holds its float32 ``"master"``.
        For checkpoints that stay sharded, see ``neurooptima.distributed.checkpoint``.
        """
        if self._sam_phase is not None:
            raise RuntimeError("state_dict() between first_step() and second_step(); take "
                               "it between steps")
        self._sync_groups_from_inner()
        state: dict[int, dict[str, Any]] = {}
        for slot in self._slot_list():
            entry = self._inner.state.get(self._chunks[slot.param])
            if not entry:
                continue
            full: dict[str, Any] = {}
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() == 1 and key != "step":
                    full[key] = self._gather_chunk(value, slot, key)
                else:
                    full[key] = value.clone() if torch.is_tensor(value) else value
            if self._bucket_of(slot).has_master:
                full[MASTER] = self._gather_chunk(self._chunks[slot.param], slot, MASTER)
            state[slot.index] = full
        groups, index = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
            groups.append(packed)
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a full state dict (from ``NeuroOptima`` or ``ShardedNeuroOptima.state_dict``).

        Each rank keeps only its chunk of every buffer.
        """
        if self._sam_phase is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        self._weights.flush()
        # Refuse a checkpoint of another model or rule whole, before anything is loaded. The
        # float32 masters are this optimizer's own key, which NeuroOptima's check does not know.
        check_state_dict([group["params"] for group in self.param_groups],
                         {**state_dict, "state": {
                             i: {k: v for k, v in entry.items() if k != MASTER}
                             if isinstance(entry, dict) else entry
                             for i, entry in state_dict["state"].items()}},
                         [group["update"] for group in self.param_groups])
        for saved in state_dict["param_groups"]:
            check_group({k: v for k, v in saved.items() if k != "params"})
        self._discard_pending()
        # torch's loader checks the group sizes and takes the param groups; the state it casts
        # to the (maybe bfloat16) module parameters' dtype is not used: the chunks are taken
        # from the caller's tensors, in their own precision.
        super().load_state_dict(state_dict)
        self.state.clear()
        for group in self.param_groups:
            check_group(group)
            group.setdefault("skipped_steps", 0)
        by_id = {saved_id: p for saved, group in zip(state_dict["param_groups"],
                                                     self.param_groups)
                 for saved_id, p in zip(saved["params"], group["params"])}
        inner_state: dict[Tensor, dict[str, Any]] = {}
        masters: list[tuple[Tensor, Tensor]] = []
        for saved_id, entry in state_dict["state"].items():
            p = by_id[saved_id]
            _, slot = self._slots[p]
            chunk = self._chunks[p]
            new: dict[str, Any] = {}
            for key, value in entry.items():
                if key == "step":  # a copy: the caller's counter must not count our steps
                    new[key] = _tensor_step(value, chunk.device).clone()
                elif torch.is_tensor(value) and value.shape == p.shape:
                    # A copy, never an alias of the caller's tensor.
                    own = slot.own_chunk(value.to(chunk.device), self.world_size).to(chunk.dtype)
                    if key == MASTER:
                        masters.append((p, own))
                    else:
                        new[key] = own
                else:
                    new[key] = value.clone() if torch.is_tensor(value) else value
            inner_state[chunk] = new
        self._inner.state.clear()
        self._inner.state.update(inner_state)
        for p, own in masters:
            self._load_master(p, own)
        self._sync_groups_to_inner()
        reduced_state.restore_state_dtypes(self._inner)  # the loader cast to the chunk dtype
