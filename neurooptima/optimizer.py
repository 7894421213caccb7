"""``NeuroOptima``: Adan / Lion / Lion-Adan updates with optional SAM (or ASAM) and Lookahead.

The class is a thin ``torch.optim.Optimizer`` around the pure functions in ``functional``,
``sam``, ``momentum_ascent``, ``lookahead`` and ``norms``; it only gathers tensors, keeps state
and orders the phases of a step:

    first pass (closure)  ->  global norm  ->  perturb to w + e          (SAM due this step)
    second pass (closure) ->  restore w    ->  check / clip  ->  update  ->  Lookahead sync

With momentum ascent the one pass runs at ``w~``; the update goes back to ``w`` first and on
to the new ``w~`` after (inside the fused kernel where it can, see ``momentum_ascent``).

Per-parameter state keys are namespaced: ``step`` (tensor counter of applied updates),
``adan.exp_avg`` ... (the rule's buffers, see ``functional.RULE_BUFFERS``), ``lookahead.slow``
(created with the parameter, a copy of its initial value) and ``sam.origin`` (only between the
two SAM passes). Each param group counts the steps it skipped for non-finite gradients in
``skipped_steps``.

Host reads (each one waits for a GPU). A step whose every parameter goes through the fused
kernel (``fused=True``: float32 or narrower, contiguous, not DTensor) is sync-free: norm
statistics, SAM's norm and perturbation, the clipping coefficient, the non-finite skip, the
step counters (tensors on the parameters' device, as torch's ``capturable`` ones) with the
bias corrections, and Lookahead's every-k-th decision all stay on the device; a skipped step
stores what it loaded (``where(finite, new, old)``) and its counters advance by ``finite``.
``skipped_steps`` is then a 0-d device tensor, and ``SkippedStepWarning`` reads a
non-blocking host copy of the device count once that copy has completed (a GPU never waits;
the warning may come a step late). The reads that remain, and why:

* every other step (``foreach`` or for-loop kernels, float64 or DTensor parameters): one read
  of the norm statistics decides the skip and the clipping, the eager kernels take the step
  counts and a tensor ``lr`` as numbers (one read per parameter, as torch's non-capturable
  optimizers), and Lookahead reads the counts; a compiled per-element selection on those
  paths would cost a full extra pass over every buffer;
* SAM's first pass when a group is not fused: one read, so that a skipped perturbation keeps
  no restore copy (``sam.origin``); fused groups keep it either way;
* ``state_dict()`` reads ``skipped_steps`` (saved as a number); a learning rate tensor is read
  when it is checked (at construction and when the group's ``lr`` is replaced, not when it is
  changed in place); counters of a loaded state dict are read once at its first fused step
  (to group equal counts; the optimizer tracks them from then on without reading).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach, _get_scalar_dtype

from . import functional as F
from .dtensor import check_fsdp1_connected, local, local_list, mesh_norm_stats, split_for_norm
from .lookahead import lookahead_sync_
from .norms import device_norm, local_norm_stats, norm_from_stats
from .sam import gradient_due, norm_terms, perturb_
from . import host_reads, momentum_ascent, reduced_state, state_validation
from .count_tokens import CountTokens
from .integrations import guards
from .rules import compute_dtype_for, run_rule
from .skipped_steps import SkipLog, SkippedStepWarning
from .validation import check_group, prepare_group

__all__ = ["NeuroOptima", "SkippedStepWarning"]

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); so do we.
CLIP_EPS = 1e-6

_SAM_ORIGIN = "sam.origin"
_SLOW = "lookahead.slow"


# Every per-group setting; a change to any of them is checked again at the next step.
HYPER_KEYS = ("lr", "weight_decay", "sam_rho", "lookahead_k", "lookahead_alpha", "betas", "eps",
              "update", "beta_diff", "no_prox", "sam_adaptive", "sam_eta", "max_grad_norm",
              "maximize", "foreach", "fused", "state_dtype", "sam_ascent", "sam_warmup",
              "sam_interval", "sam_start")


def _fingerprint(group: dict[str, Any]) -> tuple:
    return tuple([group.get(key) for key in HYPER_KEYS])


def _tensor_step(value: Any, device: torch.device | None = None) -> Tensor:
    """A per-parameter ``step`` as the 0-d tensor the kernels count in, on the parameter's
    device, in torch's scalar dtype (float64 when the default dtype is float64, else float32;
    a state dict written by hand or by another tool may hold a plain number)."""
    dtype = _get_scalar_dtype()
    if not isinstance(value, Tensor):
        return torch.tensor(float(value), dtype=dtype, device=device)
    if value.dtype != dtype or (device is not None and value.device != device):
        return value.to(device=device, dtype=dtype)
    return value


def _new_step(p: Tensor) -> Tensor:
    return torch.zeros((), dtype=_get_scalar_dtype(), device=p.device)


NEED_CLOSURE = ("SAM (sam_rho > 0, sam_ascent='gradient') evaluates the gradient twice on this "
                "step: pass step(closure) with a closure that zeroes the gradients, runs "
                "forward and backward and returns the loss; or call first_step() after the "
                "first backward and second_step() after the second (optimizer.sam_due says "
                "whether a step needs them); or use sam_ascent='momentum', the one-gradient "
                "form, which runs in any loop; or set sam_rho=0")


def run_step(optimizer: Any, closure: Callable[[], Tensor] | None,
             finish: Callable[[], None]) -> Tensor | None:
    """PyTorch's closure contract with SAM's two passes, for every NeuroOptima front end.

    ``optimizer`` provides ``sam_due`` (whether this step runs two passes), ``_sam_phase``,
    ``first_step()`` and ``zero_grad()``; ``finish()`` ends the step (restore and update).
    Returns the first-pass loss; the closure is called once or twice as the schedule says.
    """
    if optimizer._sam_phase is not None:  # the second half of first_step() / second_step()
        if closure is not None:
            raise ValueError("step(closure) called between first_step() and second_step(); "
                             "call second_step() (or step() without a closure) first")
        finish()
        return None
    if optimizer.sam_due:
        if closure is None:
            raise ValueError(NEED_CLOSURE)
        with torch.enable_grad():
            loss = closure()
        optimizer.first_step()
        optimizer.zero_grad()
        with torch.enable_grad():
            closure()
        finish()
        return loss
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    finish()
    return loss


class NeuroOptima(Optimizer):
    r"""Adan, Lion or Lion-Adan with SAM/ASAM and Lookahead, each exactly as published.

    The defaults are the configuration ``benchmarks/suite.py`` found fastest to a target over
    its four workloads (geometric mean of gradient evaluations) among those that take one
    gradient a step: Adan with weight decay 0.01 and momentum ascent at rho 0.5, Lookahead off,
    and the learning rate of each rule never far from each workload's best: 3e-2 for Adan, 1e-3
    for Lion and Lion-Adan (see ``benchmarks/results/REPORT.md``). Under momentum ascent the
    model holds an ascent point between steps: evaluate and save between ``eval()`` and
    ``train()``; ``sam_rho=0`` is the plain rule.

    Args:
        params: parameters or param groups.
        lr: learning rate (>= 0); None: the group's rule's own default, 3e-2 for ``adan``,
            1e-3 for ``lion`` and ``lion_adan`` (sign updates take smaller steps), resolved
            per param group, so a group with its own ``update`` gets its rule's rate.
        weight_decay: decay (>= 0); Adan applies it proximally ``w / (1 + lr wd)`` unless
            ``no_prox=True`` (then ``w * (1 - lr wd)`` first); Lion rules apply it decoupled.
        sam_rho: radius (>= 0) of either sharpness-aware form; 0 disables it; None: the
            form's own, 0.5 for momentum ascent (the suite's), 0.05 for exact SAM.
        lookahead_k: sync period (integer >= 0); 0 or None disables Lookahead.
        lookahead_alpha: slow-weight step in (0, 1].
        betas: None for the rule's official defaults; for ``adan`` a 2-tuple means
            (first moment, second moment) with ``beta_diff`` for the difference, a 3-tuple is
            (first moment, difference, second moment); Lion rules take a 2-tuple.
        eps: Adan denominator term (>= 0).
        update: ``"adan"`` (default), ``"lion"`` or ``"lion_adan"``.
        beta_diff: Adan's gradient-difference decay used with a 2-tuple ``betas``.
        no_prox: Adan weight decay as multiplication before the step instead of proximal.
        sam_adaptive: ASAM instead of SAM.
        sam_eta: ASAM's ``eta`` in ``T_w = |w| + eta``.
        max_grad_norm: clip the update gradient to this global L2 norm (None: no clipping).
        maximize: maximize the objective.
        sam_ascent: ``"momentum"`` (momentum ascent, MSAM: one gradient a step; between steps
            the model holds ``w - s m``, see ``momentum_ascent``; ``eval()``/``train()`` move it
            to ``w`` and back) or ``"gradient"`` (SAM/ASAM: two gradients on the steps it
            runs). None: momentum, except when ``sam_rho`` is given alone: a radius on its own
            is SAM's, as published, so code written for SAM keeps meaning SAM.
        sam_warmup: steps (integer >= 0) during which momentum ascent holds ``w`` (rho 0);
            the suite sets it to the learning-rate warm-up.
        sam_interval: gradient ascent runs on every ``sam_interval``-th step (integer >= 1),
        sam_start: and from step ``sam_start`` on (integer >= 1); other steps are plain.
        foreach: multi-tensor kernels; None picks them where torch does (accelerators).
        fused: one compiled single-pass kernel per (device, dtype) over flat buffers (see
            ``fused``); None or False: off. Cannot be combined with ``foreach=True``.
        state_dtype: dtype the rule's buffers are stored in (e.g. ``torch.bfloat16``); the
            math runs in float32 or wider. None: the parameter's dtype. With a narrower state
            dtype, SAM keeps its perturbation in it instead of a full copy of the weights.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 lr: float | None = None,
                 weight_decay: float = 0.01, sam_rho: float | None = None,
                 lookahead_k: int | None = 0, lookahead_alpha: float = 0.5,
                 betas: tuple[float, ...] | None = None, eps: float = 1e-8, *,
                 update: str = "adan", beta_diff: float = 0.92,
                 no_prox: bool = False, sam_adaptive: bool = False, sam_eta: float = 0.01,
                 max_grad_norm: float | None = None, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None,
                 state_dtype: torch.dtype | None = None, sam_ascent: str | None = None,
                 sam_warmup: int = 0, sam_interval: int = 1, sam_start: int = 1) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, sam_rho=sam_rho,
                        lookahead_k=lookahead_k, lookahead_alpha=lookahead_alpha, betas=betas,
                        eps=eps, update=update, beta_diff=beta_diff, no_prox=no_prox,
                        sam_adaptive=sam_adaptive, sam_eta=sam_eta, max_grad_norm=max_grad_norm,
                        maximize=maximize, foreach=foreach, fused=fused,
                        state_dtype=state_dtype, sam_ascent=sam_ascent, sam_warmup=sam_warmup,
                        sam_interval=sam_interval, sam_start=sam_start)
        # Check the defaults once up front so an empty or odd params list still reports them.
        check_group(dict(defaults))
        self._sam_phase: str | None = None  # None, "perturbed" or "skipped" between passes
        self.in_second_pass = False
        # id(group) -> (group, FusedLayout): the steady state of each fused group.
        self._fused_layouts: dict[int, tuple[dict[str, Any], Any]] = {}
        # id(group) -> (group, its hyperparameters when last checked): a step re-checks a group
        # only when one of them changed.
        self._checked: dict[int, tuple[dict[str, Any], tuple]] = {}
        self._skips = SkipLog()  # steps skipped for non-finite gradients, and the warning
        self._counts = CountTokens()  # which parameters share a step count (fused grouping)
        super().__init__(params, defaults)
        # torch's load_state_dict casts state to the parameter dtype; put state_dtype back.
        self.register_load_state_dict_post_hook(reduced_state.restore_state_dtypes)
        # A checkpoint of another model or rule, or a partial one, is refused before loading.
        self.register_state_dict_post_hook(state_validation.record_state_count)
        self.register_state_dict_post_hook(_plain_numbers)
        self.register_load_state_dict_pre_hook(state_validation.check_load)
        self.register_load_state_dict_pre_hook(state_validation.drop_sharded_masters)
        # Framework paths that would drop or mis-scale SAM's second pass are refused.
        self.register_step_pre_hook(guards.check_step)

    # ---------------------------------------------------------------- groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        prepare_group(group, type(self).__name__)
        self._checked[id(group)] = (group, _fingerprint(group))
        self._init_lookahead(group)

    @torch.no_grad()
    def _init_lookahead(self, group: dict[str, Any]) -> None:
        # Slow weights are the initial weights, created now for every parameter that trains.
        # A parameter that does not (requires_grad=False) gets them at its first update
        # (``_ensure_slow``): a frozen backbone costs no second copy.
        if group["lookahead_k"] > 0:
            for p in group["params"]:
                if p.requires_grad and _SLOW not in self.state[p]:
                    self.state[p][_SLOW] = p.detach().clone()

    def _ensure_slow(self, params: list[Tensor]) -> None:
        """Slow weights for parameters about to be updated for the first time without them:
        a copy of the weights before that update (for a parameter frozen since construction,
        its initial value unless it was edited)."""
        for p in params:
            state = self.state[p]
            if _SLOW not in state:
                state[_SLOW] = p.detach().clone()

    def _check_groups(self) -> None:
        """Validate every group whose hyperparameters changed since they were last checked
        (e.g. edited in ``param_groups``); a bad value raises ``ValueError`` naming it."""
        for group in self.param_groups:
            entry = self._checked.get(id(group))
            if entry is not None and entry[0] is group and entry[1] == _fingerprint(group):
                continue
            check_group(group)
            self._checked[id(group)] = (group, _fingerprint(group))
        forms = {group["sam_ascent"] for group in self.param_groups if group["sam_rho"] > 0}
        if len(forms) > 1:
            raise ValueError("param groups mix sam_ascent='gradient' and 'momentum'; give every "
                             "group with sam_rho > 0 the same sam_ascent")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_sam_phase", None)
        self.__dict__.setdefault("in_second_pass", False)
        self.__dict__.setdefault("_skips", SkipLog())
        # A loaded state dict (torch's load_state_dict comes through here) has new tensors
        # and new param groups, checked again at the next step; its counts are read once.
        self.__dict__["_fused_layouts"] = {}
        self.__dict__["_checked"] = {}
        self.__dict__["_counts"] = CountTokens()
        # Counters saved as plain numbers become tensors again, as in torch.optim, on the
        # parameter's device.
        for p, entry in self.state.items():
            if "step" in entry:
                device = p.device if isinstance(p, Tensor) else None
                entry["step"] = _tensor_step(entry["step"], device)

    @property
    def sam_enabled(self) -> bool:
        """Whether gradient-ascent SAM (two gradients) runs on some steps."""
        return any(group["sam_rho"] > 0 and group["sam_ascent"] == "gradient"
                   for group in self.param_groups)

    @property
    def sam_due(self) -> bool:
        """Whether the coming step runs gradient-ascent SAM: two forward/backward passes
        (``first_step()`` after the first, ``second_step()`` after the second)."""
        return any(gradient_due(group) for group in self.param_groups)

    # ---------------------------------------------------------------- momentum ascent

    @torch.no_grad()
    def eval(self) -> None:
        """Move the model from the ascent point ``w~`` to the weights ``w`` (momentum ascent;
        a no-op where the model already holds ``w``), for evaluation, export or averaging.
        ``train()`` goes back, bit for bit; a step in eval mode is an error."""
        momentum_ascent.to_eval_(self.state, self.param_groups)

    @torch.no_grad()
    def train(self) -> None:
        """Back to the ascent point after ``eval()``; a no-op in training mode."""
        momentum_ascent.to_train_(self.state, self.param_groups)

    def _check_training(self) -> None:
        if any(group.get(momentum_ascent.EVALUATING) for group in self.param_groups):
            raise RuntimeError("the optimizer is in eval mode (the model holds w, not the "
                               "momentum-ascent point): call optimizer.train() before the "
                               "next forward/backward and step()")

    def _grads(self, group: dict[str, Any], *, for_update: bool = True
               ) -> tuple[list[Tensor], list[Tensor]]:
        """Parameters that have gradients, and the gradients the math should see.

        Gradients of DTensor parameters come back as their local shards (see ``dtensor``). For
        the update, a fused group in its steady state returns its layout's own lists (see
        ``fused_layout``); SAM's first pass only needs the gradients laid out flat.
        """
        if group.get("fused") and for_update:
            layout = self._fused_layout(group)  # lays the gradients out flat if it must
            if layout is not None:
                grads = layout.grads
                if group["maximize"]:
                    grads = list(torch._foreach_neg(grads))
                return layout.params, grads
        elif group.get("fused"):
            from .fused import adopt_grads_  # torch.compile is imported only when used

            adopt_grads_(group["params"])
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("NeuroOptima does not support sparse gradients; use a dense "
                                   "embedding (sparse=False) or torch.optim.SparseAdam")
            params.append(p)
            grads.append(local(p.grad))
        if group["maximize"]:
            grads = list(torch._foreach_neg(grads)) if grads else grads
        return params, grads

    def _fused_layout(self, group: dict[str, Any]) -> Any:
        """The steady-state layout of a fused group, or None while it is being laid out.

        Gradients that were already flat when the step began (backward accumulated into the
        previous step's views) are the sign of a steady state: only then is a layout built.
        Fresh gradient tensors every step (``zero_grad(set_to_none=True)``) never pay for it.
        """
        from .fused import adopt_grads_  # torch.compile is imported only when used
        from .fused_layout import FusedLayout

        names = F.state_keys(group["update"])
        slow_key = _SLOW if group["lookahead_k"] > 0 else None
        layout = self._stored_layout(group)
        if (layout is not None and layout.names == names and layout.slow_key == slow_key
                and layout.intact(self.state, group["params"])):
            return layout
        self._fused_layouts.pop(id(group), None)
        if not adopt_grads_(group["params"]):
            return None
        params = group["params"]
        known = all(p in self.state and "step" in self.state[p] for p in params)
        layout = FusedLayout.of(self.state, params, names, slow_key,
                                same_count=known and len(set(self._counts.of(params, self.state))) == 1)
        if layout is not None:
            self._fused_layouts[id(group)] = (group, layout)
        return layout

    def _reduce_norm_stats(self, stats: Tensor) -> Tensor:
        """Sum packed norm statistics over every holder of the tensors (here: one process).

        Distributed backends override this with one all-reduce.
        """
        if not self.__dict__.get("_pieces_checked", False):
            check_fsdp1_connected(self)
            self._pieces_checked = True
        return stats

    def _norm_stats(self, tensors: list[Tensor], owners: list[Tensor] | None = None, *,
                    norm: bool = True) -> Tensor:
        """Packed ``[sum of squares, non-finite count]`` of ``tensors``, summed over every
        holder, on the device (see ``norms``; nothing is read on the host).

        ``owners[i]`` is the parameter whose placement ``tensors[i]`` shares (default: the
        tensor itself): DTensor contributions are summed over their mesh with one all-reduce
        per mesh, plain ones go through ``_reduce_norm_stats``. ``norm=False``: only the
        finiteness is needed (the sum of squares is then 0), which costs less to establish.
        """
        plain, sharded = split_for_norm(tensors, tensors if owners is None else owners)
        device = self._device(plain, sharded)
        if any(group.get("fused") for group in self.param_groups):
            from .fused import fused_norm_stats

            local_stats = fused_norm_stats(plain, device, norm=norm)
        else:
            local_stats = local_norm_stats(plain, device, norm=norm)
        stats = self._reduce_norm_stats(local_stats)
        if sharded:
            mesh = mesh_norm_stats(sharded)
            stats = stats + mesh.to(stats.device)
        return stats

    def _device(self, plain: list[Tensor], sharded: dict) -> torch.device:
        """Where norm statistics live: the tensors' device, else the parameters' (a rank that
        holds no gradient still sums on the device its peers use)."""
        if plain:
            return plain[0].device
        for shards in sharded.values():
            if shards:
                return shards[0].device
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _global_norm(self, tensors: list[Tensor], owners: list[Tensor] | None = None, *,
                     norm: bool = True) -> tuple[float, bool]:
        """Global L2 norm of ``tensors`` and whether all are finite, read on the host (one
        read); ``_norm_stats`` with ``norms.device_norm`` keeps them on the device."""
        return norm_from_stats(self._norm_stats(tensors, owners, norm=norm))

    # ---------------------------------------------------------------- SAM phases

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """SAM's first phase: move each parameter to ``w + e`` using the current gradients.

        Call after the first backward; then zero the gradients (or pass ``zero_grad=True``),
        run the second forward and backward, and call ``second_step()`` (or ``step()``).
        Non-finite gradients skip the perturbation, and the second pass then runs at ``w``.
        """
        if self._sam_phase is not None:
            raise RuntimeError("first_step() was called twice; call second_step() in between")
        self._check_groups()
        self._check_training()
        self._perturb()
        if zero_grad:
            self.zero_grad()

    def _perturb(self) -> None:
        per_group = [self._grads(group, for_update=False) for group in self.param_groups]
        terms: list[Tensor] = []
        owners: list[Tensor] = []
        for group, (params, grads) in zip(self.param_groups, per_group):
            terms += norm_terms(local_list(params), grads, adaptive=group["sam_adaptive"],
                                eta=group["sam_eta"])
            owners += params
        stats = self._norm_stats(terms, owners)
        self.in_second_pass = True
        finite: Tensor | None = None
        if all(group.get("fused") for group in self.param_groups):
            # Sync-free: the norm and the decision stay on the device; a non-finite gradient
            # makes e = 0, and the restore copy is kept either way.
            norm, finite = device_norm(stats)
        else:
            # One host read decides, so a skipped perturbation keeps no restore copy.
            norm, ok = norm_from_stats(stats)
            if not ok:
                self._sam_phase = "skipped"
                return
        self._sam_phase = "perturbed"
        for group, (params, grads) in zip(self.param_groups, per_group):
            if not gradient_due(group) or not params:
                continue
            dtype = group.get("state_dtype")
            if all(reduced_state.stores_perturbation(p.dtype, dtype) for p in params):
                # Narrow state: keep e (state dtype), not a full copy of w (see reduced_state).
                reduced_state.perturb_stored_(self.state, params, local_list(params), grads,
                                              rho=group["sam_rho"], norm=norm,
                                              adaptive=group["sam_adaptive"],
                                              eta=group["sam_eta"], dtype=dtype, finite=finite)
                continue
            weights = local_list(params)
            self._keep_origin(params, weights)
            flat_w, flat_g = _flat_pair(weights, grads)
            if flat_w is not None:  # one flat run each (a fused group): one pass
                weights, grads = [flat_w], [flat_g]
            perturb_(weights, grads, rho=group["sam_rho"], norm=norm,
                     adaptive=group["sam_adaptive"], eta=group["sam_eta"], finite=finite)

    def _keep_origin(self, params: list[Tensor], weights: list[Tensor]) -> None:
        """Keep a copy of ``w`` for the restore: one copy of a flat run, views per parameter."""
        from .fused import flat_view

        flat = flat_view(weights) if len(weights) > 1 and _all_plain(weights) else None
        if flat is None:
            for p in params:
                self.state[p][_SAM_ORIGIN] = p.detach().clone()
            return
        copy, offset = flat.clone(), 0
        for p, w in zip(params, weights):
            self.state[p][_SAM_ORIGIN] = copy[offset:offset + w.numel()].view(w.shape)
            offset += w.numel()

    def second_step(self, zero_grad: bool = False) -> None:
        """SAM's second phase: restore ``w`` and apply the update with the current gradients;
        ``zero_grad=True`` zeroes the gradients afterwards."""
        if self._sam_phase is None:
            raise RuntimeError("second_step() needs a preceding first_step()")
        self.step()
        if zero_grad:
            self.zero_grad()

    # Run eagerly under torch.compile: dynamo dropped this method's attribute writes
    # (_sam_phase, in_second_pass) when a compiled step graph-broke later in _update.
    @torch._disable_dynamo
    @torch.no_grad()
    def _restore(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                origin = self.state[p].pop(_SAM_ORIGIN, None) if p in self.state else None
                if origin is not None:
                    local(p).copy_(local(origin))
                e = (self.state[p].pop(reduced_state.SAM_PERTURBATION, None)
                     if p in self.state else None)
                if e is not None:
                    local(p).sub_(e)
        self._sam_phase = None
        self.in_second_pass = False

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One optimization step; returns the closure's (first-pass) loss.

        With SAM on, ``closure`` must zero the gradients, compute the loss, call backward and
        return the loss; it is called twice. Without a closure, ``step()`` completes a step
        begun with ``first_step()``, or (SAM off) applies the update to the current gradients.
        """
        self._check_groups()
        if self._sam_phase is None:
            self._check_training()
        return run_step(self, closure, self._finish_step)

    def _finish_step(self) -> None:
        """The end of every step: undo the SAM perturbation if any, then update (momentum
        ascent goes back to ``w`` and ascends again around the update)."""
        if self._sam_phase is not None:
            self._restore()
        self._update()

    def _update(self) -> None:
        """Check, clip and apply the update rule to every parameter that has a gradient."""
        for group in self.param_groups:
            group["sam_clock"] += 1  # applied or skipped, the step counts for the schedule
        try:
            self._check_and_apply()
        finally:
            for _, layout in self._fused_layouts.values():
                layout.release()  # hold no gradient between steps

    def _check_and_apply(self) -> None:
        per_group = [self._grads(group) for group in self.param_groups]
        # The norm's value matters only for clipping; every step checks finiteness.
        clipping = any(group["max_grad_norm"] is not None for group in self.param_groups)
        sync_free = self._sync_free(per_group)
        # Momentum ascent in the fused kernel: the gradient statistics come with its sums.
        packed = (momentum_ascent.fused_stats(self.state, self.param_groups, per_group,
                                              self._reduce_norm_stats) if sync_free else None)
        stats = (packed[:2] if packed is not None else
                 self._norm_stats(*self._update_norm_terms(per_group), norm=clipping))
        if sync_free and not host_reads.reads_are_free(stats.device):
            self._apply_fused(per_group, stats, packed)
            return
        # The one host read of the step: the skip decision (free on the CPU; an eager
        # step's kernels take numbers anyway).
        norm, finite = norm_from_stats(stats)
        if not finite:
            self._skip_step()
            return
        if sync_free:  # the fused kernel without its predicate, clipping inside it
            self._apply_fused(per_group, stats, packed, known_finite=True)
            return
        momentum_ascent.leave_(self.state, self.param_groups)
        for group, (params, grads) in zip(self.param_groups, per_group):
            if not params:
                continue
            if group["lookahead_k"] > 0:
                self._ensure_slow(params)
            max_norm = group["max_grad_norm"]
            if max_norm is not None:
                coef = max_norm / (norm + CLIP_EPS)
                if coef < 1.0:
                    grads = list(torch._foreach_mul(grads, coef))
            rest = self._apply_rule(group, params, grads)
            self._lookahead(group, rest)
        momentum_ascent.take_(self.state, self.param_groups, self._norm_stats)

    def _sync_free(self, per_group: list[tuple[list[Tensor], list[Tensor]]]) -> bool:
        """Whether every parameter with a gradient goes through the fused kernel, which takes
        the skip, clipping and Lookahead as device-side data (else one host read decides)."""
        from .fused import fusable

        for group, (params, grads) in zip(self.param_groups, per_group):
            if not params:
                continue
            if not group.get("fused"):
                return False
            if self._verified_layout(group, params, grads) is None and not all(
                    fusable(p, g) for p, g in zip(params, grads)):
                return False
        return True

    def _skip_step(self) -> None:
        """Skip the whole step, decided on the host: no weight, buffer or counter moves."""
        self._skips.host_skip(self.param_groups)

    def _apply_fused(self, per_group: list[tuple[list[Tensor], list[Tensor]]],
                     stats: Tensor, packed: Tensor | None, *, known_finite: bool = False
                     ) -> None:
        """The fused step, clipping and Lookahead inside the kernel. By default sync-free: the
        kernel stores ``where(finite, new, old)``, so a step with a non-finite gradient moves
        no weight, buffer, counter or slow weight, nothing is read on the host, and the skip
        is counted on the device. ``known_finite``: the host decided that the step is finite,
        so the kernels run without the predicate and there is nothing to count."""
        if known_finite:  # nothing to compute on the device but the clipping norm
            clipping = any(group["max_grad_norm"] is not None for group in self.param_groups)
            norm, predicate = (stats[0].sqrt() if clipping else None), None
        else:
            norm, predicate = device_norm(stats)
        # Momentum ascent inside the kernel where it can (``packed``), else around it.
        scales = (None if packed is None else
                  momentum_ascent.fused_scales(self.param_groups, packed, norm, predicate))
        if scales is None:
            momentum_ascent.leave_(self.state, self.param_groups, predicate)
        for i, (group, (params, grads)) in enumerate(zip(self.param_groups, per_group)):
            if not params:
                continue
            if group["lookahead_k"] > 0:
                self._ensure_slow(params)
            clip = group["max_grad_norm"] is not None
            self._apply_rule(group, params, grads, finite=predicate,
                             norm=norm if clip else None,
                             ascent=None if scales is None else scales[i])
        if scales is None:
            momentum_ascent.take_(self.state, self.param_groups, self._norm_stats, predicate)
        if predicate is not None:
            self._skips.device_skip(self.param_groups, predicate)

    def _update_norm_terms(self, per_group: list[tuple[list[Tensor], list[Tensor]]]
                           ) -> tuple[list[Tensor], list[Tensor]]:
        """The update's gradients and their owners, for its norm and finiteness check; a fused
        group in its steady state contributes its one flat gradient."""
        tensors: list[Tensor] = []
        owners: list[Tensor] = []
        for group, (params, grads) in zip(self.param_groups, per_group):
            layout = self._verified_layout(group, params, grads)
            if layout is not None:
                tensors.append(layout.flat_grad)
                owners.append(layout.flat_grad)
            else:
                tensors += grads
                owners += params
        return tensors, owners

    def _use_foreach(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        if group["foreach"] is None:
            if group.get("fused"):
                return True  # what the fused kernel leaves (Lookahead, DTensor) runs foreach
            _, foreach = _default_to_fused_or_foreach(params, differentiable=False,
                                                      use_fused=False)
            return foreach
        return group["foreach"]

    def _apply_rule(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    *, finite: Tensor | None = None, norm: Tensor | None = None,
                    ascent: Tensor | None = None) -> list[Tensor]:
        """Apply the group's rule; returns the parameters whose Lookahead sync is still to do
        (the fused kernel does its own). ``finite``/``norm``: the sync-free step's predicate
        and clipping norm (fused parameters only)."""
        names = F.state_keys(group["update"])
        slow_key = _SLOW if group["lookahead_k"] > 0 else None
        layout = self._verified_layout(group, params, grads)
        if layout is not None:  # the steady state of a fused group: one kernel call
            from .fused import group_rule_

            group_rule_(group, layout.flat_param, layout.flat_grad, layout.flat_buffers,
                        layout.flat_step,
                        compute_dtype_for(layout.flat_param.dtype, group.get("state_dtype")),
                        finite=finite, norm=norm, slow=layout.flat_slow, ascent=ascent)
            # A layout's parameters share one count and move together (see count_tokens).
            self._counts.moved_together(id(layout), params)
            return []
        rule = group["update"]
        states = [self.state[p] for p in params]
        created: list[Tensor] = []
        for p, g, state in zip(params, grads, states):
            if names[0] not in state:
                state["step"] = _new_step(p)
                created.append(p)
                for name in names:
                    # zeros_like(p) keeps a DTensor parameter's state a DTensor.
                    state[name] = torch.zeros_like(p, memory_format=torch.preserve_format,
                                                   dtype=group.get("state_dtype") or p.dtype)
                    if name.endswith("prev_grad") and finite is None:
                        # Adan's difference is 0 at k = 1: the previous gradient starts as g
                        # (the fused kernel sets it itself at k = 1, after clipping).
                        local(state[name]).copy_(g)
            elif not isinstance(state["step"], Tensor):
                state["step"] = _tensor_step(state["step"], p.device)
        if created:
            self._counts.created(created)
        tokens = self._counts.of(params, self.state)
        self._counts.advance(params, tokens)
        if group.get("fused"):
            from .fused import fused_update_  # imports torch.compile

            rest_idx = fused_update_(self.state, group, params, grads, names, tokens,
                                     finite=finite, norm=norm, slow_key=slow_key,
                                     ascent=ascent)
            params, grads = [params[i] for i in rest_idx], [grads[i] for i in rest_idx]
            if not params:
                return []
            if finite is not None or norm is not None or ascent is not None:
                raise RuntimeError("internal: a fused step with its skip or clipping inside "
                                   "the kernel left parameters to the eager kernels")
        torch._foreach_add_([self.state[p]["step"] for p in params], 1)
        foreach = self._use_foreach(group, params)
        state_dtype = group.get("state_dtype")
        # Multi-tensor kernels need one device and dtype per call; so does the upcast of
        # reduced-precision state.
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            buckets[(p.device, p.dtype) if foreach or state_dtype else None].append(i)
        lr = group["lr"]
        if isinstance(lr, Tensor):
            lr = float(lr)  # the eager kernels take numbers: one host read
        for idx in buckets.values():
            compute_dtype = compute_dtype_for(params[idx[0]].dtype, state_dtype)
            # Upcast copies are temporaries: bound their size when state is stored narrow.
            for chunk in (reduced_state.chunks(idx, params) if compute_dtype else [idx]):
                # The eager kernels take the counts as numbers (as torch's non-capturable
                # optimizers do): one host read per parameter.
                steps = [int(self.state[params[i]]["step"].item()) for i in chunk]
                # The kernels run on local shards of DTensor parameters and state.
                buffers = [local_list([self.state[params[i]][name] for i in chunk])
                           for name in names]
                run_rule(rule, local_list([params[i] for i in chunk]),
                         [grads[i] for i in chunk], buffers, steps, lr=lr,
                         betas=group["betas"], eps=group["eps"],
                         weight_decay=group["weight_decay"], no_prox=group["no_prox"],
                         foreach=foreach, compute_dtype=compute_dtype)
        return params

    def _stored_layout(self, group: dict[str, Any]) -> Any:
        """The layout kept for ``group`` (by identity: an id can outlive its group), or None."""
        entry = self._fused_layouts.get(id(group))
        return entry[1] if entry is not None and entry[0] is group else None

    def _verified_layout(self, group: dict[str, Any], params: list[Tensor],
                         grads: list[Tensor] | None = None) -> Any:
        """The layout ``_grads`` verified this step, if ``params`` (and ``grads``) are its own
        lists: not filtered, clipped or negated since."""
        layout = self._stored_layout(group) if group.get("fused") else None
        if layout is None or params is not layout.params:
            return None
        return layout if grads is None or grads is layout.grads else None

    def _lookahead(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Lookahead for parameters the eager kernels updated (the fused kernel syncs its
        own): the counts are read on the host, one read per parameter."""
        k = group["lookahead_k"]
        if k == 0 or not params:
            return
        due = [p for p in params if int(self.state[p]["step"].item()) % k == 0]
        if due:
            slow = [self.state[p][_SLOW] for p in due]  # see _ensure_slow
            lookahead_sync_(local_list(due), local_list(slow), alpha=group["lookahead_alpha"],
                            foreach=self._use_foreach(group, due)
                            and len({(p.device, p.dtype) for p in due}) == 1)


def _all_plain(tensors: list[Tensor]) -> bool:
    from .dtensor import is_dtensor

    return not any(is_dtensor(t) for t in tensors)


def _flat_pair(weights: list[Tensor], grads: list[Tensor]) -> tuple[Tensor | None,
                                                                    Tensor | None]:
    """The flat tensors of ``weights`` and ``grads`` when each list is one flat run of the
    same layout (a fused group after its first step), else (None, None)."""
    from .fused import flat_view

    if len(weights) < 2 or not _all_plain(weights) or not _all_plain(grads):
        return None, None
    flat_w = flat_view(weights)
    flat_g = flat_view(grads) if flat_w is not None else None
    if flat_g is None or flat_g.numel() != flat_w.numel() or flat_g.dtype != flat_w.dtype:
        return None, None
    return flat_w, flat_g


def _plain_numbers(optimizer: NeuroOptima, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict()`` saves ``skipped_steps`` and the ascent scale as numbers (read once,
    here), so a saved state never aliases a live device tensor and JSON writers can take it."""
    for group in state_dict["param_groups"]:
        count = group.get("skipped_steps")
        if isinstance(count, Tensor):
            group["skipped_steps"] = int(count)
        scale = group.get(momentum_ascent.SCALE)
        if isinstance(scale, Tensor):
            group[momentum_ascent.SCALE] = float(scale)  # float64: exact
    return state_dict
