"""NeuroOptima as a DeepSpeed optimizer: a config entry, ZeRO stages 0-3, SAM at engine level.

DeepSpeed's config accepts only its own optimizer names or a ``torch.optim`` attribute, so
``initialize`` reads ``{"optimizer": {"type": "NeuroOptima", "params": {...}}}`` itself, builds
the optimizer and hands DeepSpeed a config without that entry. Everything else is
``deepspeed.initialize`` unchanged (same arguments, same returned tuple).

Inside DeepSpeed the optimizer is an ``EngineNeuroOptima``: under ZeRO it is stepped once per
group (stage 3: sub-group) on one flat fp32 partition, with no closure; it steps every
partition together at the last call (see ``deepspeed_zero``), so the non-finite skip, the
schedule's step count and momentum ascent's norm are one over every group and, through one
all-reduce, every rank. It never runs gradient-ascent SAM itself (``sam_step`` does, around
the engine), and creates its Lookahead slow weights from the tensor it actually steps (at that
tensor's first update, i.e. a copy of its initial value). DeepSpeed clips gradients
(``max_grad_norm`` becomes ``gradient_clipping``, whose coefficient ``max / (norm + 1e-6)`` is
the core's).

Momentum ascent (``sam_ascent="momentum"``) is the core's, inside the client's step: the fp32
masters (stage 0: the model's weights) hold ``w~`` between steps, and DeepSpeed's own copy to
the model's partitions and all-gather ship it. It needs no closure, so DeepSpeed's plain loop
runs it. ``eval_mode(engine)`` / ``train_mode(engine)`` move the masters to ``w`` and back and
publish them.

``sam_step(engine, closure)``, where the closure runs the forward pass and returns the loss,
runs gradient-ascent SAM on the steps its schedule (``sam_interval``, ``sam_start``) names and
a plain forward, backward and step otherwise:

* ``sam_mode="global"`` (every stage): ``engine.backward``; each rank sums the squares of the
  reduced gradient elements it owns (stage 0: all ranks hold the same full gradients, so no
  collective; stages 1-3: its partition, one all-reduce of the packed statistics); perturb what
  it owns to ``w + e``, computed from the fp32 master weights where DeepSpeed keeps them; make
  the perturbed weights visible to the forward pass (stages 1/2: all-gather of the low-precision
  partitions; stage 3: re-gather of the persistent parameters); zero the gradients; second
  forward and ``engine.backward``; restore; ``engine.step()``.
* ``sam_mode="local"`` (stages 0 and 1, where a per-replica gradient exists): the first
  backward runs under ``engine.no_sync()``, so each replica keeps its own full gradient, and
  perturbs its full weights with its local norm, without communication. Stages 2 and 3 reduce
  into partitions during backward; there local mode is an error.

Restoring: at stage 0 the optimizer updates the model parameters themselves, so ``w`` comes
back from a copy before ``engine.step()``. At stages 1-3 the fp32 master partitions never move
during SAM and ``engine.step()`` rewrites every low-precision weight from them; only a step
that DeepSpeed skipped (``engine.was_step_applied()`` false) needs an explicit restore.

deepspeed is imported inside functions only, so ``import neurooptima.distributed`` never needs it.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from neurooptima import NeuroOptima
from neurooptima.norms import local_norm_stats, norm_from_stats
from neurooptima.sam import gradient_due, norm_terms, perturb_

from .collectives import all_reduce_norm_stats
from .deepspeed_zero import ZeroPartitions

__all__ = ["initialize", "sam_step", "eval_mode", "train_mode", "EngineNeuroOptima",
           "disable_jit_ops", "split_config", "CONFIG_TYPE", "SAM_MODES"]

CONFIG_TYPE = "NeuroOptima"
SAM_MODES = ("global", "local")

# Keys of the config's "params" that are not NeuroOptima arguments but engine-level settings.
ENGINE_KEYS = ("sam_mode",)

# Where a per-replica gradient exists: stages 0 and 1 reduce after backward, which
# engine.no_sync() postpones; stages 2 and 3 reduce inside backward, into partitions.
LOCAL_STAGES = (0, 1)
_LOCAL_STAGE_ERROR = ("sam_mode=\"local\" needs each replica's own full gradient after the first "
                      "backward; ZeRO stage {stage} reduces gradients into partitions during "
                      "backward. Use sam_mode=\"global\", or ZeRO stage 0 or 1")


# -------------------------------------------------------------------------------- JIT ops


def disable_jit_ops() -> None:
    """Mark every DeepSpeed op as not buildable in this process, so nothing JIT-compiles.

    DeepSpeed consults ``deepspeed.ops.__compatible_ops__`` (computed on first use by running
    compiler probes) before JIT-building an op; on CPU ``deepspeed.initialize`` would otherwise
    build its shared-memory collective op. With every entry False it uses plain
    ``torch.distributed`` collectives. NeuroOptima needs none of DeepSpeed's fused optimizer
    kernels. Call before the first ``initialize``.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    deepspeed.ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)


# -------------------------------------------------------------------------------- optimizer


class EngineNeuroOptima(NeuroOptima):
    """NeuroOptima as DeepSpeed steps it: on flat fp32 partitions, with no closure.

    Hyperparameters and state names are the core's. Gradient-ascent SAM settings stay in the
    param groups for ``sam_step``; ``step()`` applies the update, with momentum ascent around it
    (``sam_ascent="momentum"``). Under ZeRO with several (sub-)groups DeepSpeed steps the
    client once per partition; the optimizer keeps each call's partition and gradient and
    steps all of them at the last call, so the non-finite skip, the schedule's clock and
    momentum ascent's norm are one over every group (and, through the all-reduce, every rank),
    as in one process. Build it through ``initialize``.
    """

    def __init__(self, params, *, sam_mode: str = "global", **kwargs: Any) -> None:
        if sam_mode not in SAM_MODES:
            raise ValueError(f"sam_mode must be one of {', '.join(map(repr, SAM_MODES))}, "
                             f"got {sam_mode!r}")
        super().__init__(params, **kwargs)
        self.sam_mode = sam_mode
        # Set by initialize under ZeRO, where each rank sees only its partition's gradients.
        self.dp_group: Any = None
        # Set by initialize under ZeRO: the master partitions DeepSpeed steps.
        self.partitions: ZeroPartitions | None = None
        # The full list of groups (ZeRO 1/2 swap in one group per call).
        self.all_groups = self.param_groups
        # id(partition) -> (partition, gradient): the calls of this engine step so far.
        self._pending: dict[int, tuple[Tensor, Tensor | None]] = {}
        # The model parameters and their groups, kept before DeepSpeed swaps in partitions.
        self.model_params: list[tuple[Tensor, dict[str, Any]]] = [
            (p, group) for group in self.param_groups for p in group["params"]]

    def _init_lookahead(self, group: dict[str, Any]) -> None:
        # Deferred to the first update: under ZeRO the stepped tensor is a flat partition that
        # does not exist yet.
        pass

    @property
    def sam_enabled(self) -> bool:
        # DeepSpeed calls step() without a closure; SAM runs around the engine in sam_step.
        return False

    @property
    def sam_due(self) -> bool:
        # The engine's step applies the update only; sam_step runs the two passes.
        return False

    @property
    def engine_sam_due(self) -> bool:
        """Whether the coming engine step runs gradient-ascent SAM (two passes in sam_step)."""
        return any(gradient_due(group) for group in self.all_groups)

    def _reduce_norm_stats(self, stats: Tensor) -> Tensor:
        # Every rank steps the same groups in the same order, so one all-reduce per call keeps
        # the non-finite skip one decision for all partitions.
        if self.dp_group is not None:
            all_reduce_norm_stats(stats, group=self.dp_group)
        return stats

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        if closure is not None:
            raise ValueError("EngineNeuroOptima is stepped by the DeepSpeed engine without a "
                             "closure; use engine.step(), or sam_step(engine, closure) for SAM")
        parts = self.partitions
        if parts is None or parts.calls_per_step == 1:
            return super().step()
        for group in self.param_groups:
            for flat in group["params"]:
                self._pending[id(flat)] = (flat, flat.grad)
        if id(parts.flats[-1]) not in self._pending:
            return None  # DeepSpeed drops each gradient after its call; we keep a reference
        pending, self._pending = self._pending, {}
        shown = self.param_groups
        self.param_groups = self.all_groups
        try:
            with parts.shown(self.all_groups):
                for flat, grad in pending.values():
                    flat.grad = grad
                super().step()
        finally:
            self.param_groups = shown
            for flat, _ in pending.values():
                if flat is not parts.flats[-1]:
                    flat.grad = None  # DeepSpeed frees the last call's gradient itself
        # DeepSpeed copied the earlier partitions to the model before they moved; it copies
        # the last one (and publishes every one) after this call returns.
        parts.copy_to_model(list(range(parts.calls_per_step - 1)))
        return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch's load builds new param group dicts: follow them (the schedule's clock, the
        # ascent scale and every hyperparameter live there).
        old = {id(group): i for i, group in enumerate(self.all_groups)}
        super().load_state_dict(state_dict)
        self.all_groups = self.param_groups
        self.model_params = [(p, self.all_groups[old[id(group)]])
                             for p, group in self.model_params]

    @torch.no_grad()
    def _update(self) -> None:
        for group in self.param_groups:
            if group["lookahead_k"] == 0:
                continue
            for p in group["params"]:
                state = self.state[p]
                if p.grad is not None and "lookahead.slow" not in state and "step" not in state:
                    state["lookahead.slow"] = p.detach().clone()  # w before its first update
        super()._update()


# -------------------------------------------------------------------------------- config


def _load_config(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    raise ValueError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")


def _optimizer_arguments() -> tuple[str, ...]:
    names = [name for name, p in inspect.signature(NeuroOptima.__init__).parameters.items()
             if name not in ("self", "params") and p.kind is not p.VAR_KEYWORD]
    return tuple(names) + ENGINE_KEYS


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def split_config(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(DeepSpeed config without the NeuroOptima entry, NeuroOptima keyword arguments).

    The arguments are None when the config names another optimizer (or none). Validates every
    key, maps ``max_grad_norm`` to ``gradient_clipping`` (0, no clipping, when neither is set:
    DeepSpeed's own default would clip at 1.0) and sets ``zero_allow_untested_optimizer``.
    """
    ds_config = _load_config(config)
    section = ds_config.get("optimizer")
    if not isinstance(section, dict) or str(section.get("type", "")).lower() != CONFIG_TYPE.lower():
        return ds_config, None
    unknown_section = sorted(set(section) - {"type", "params"})
    if unknown_section:
        raise ValueError(f"unknown key(s) {unknown_section} in the DeepSpeed config's "
                         f"\"optimizer\" entry; accepted: \"type\", \"params\"")
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"optimizer.params must be a JSON object, got {params!r}")
    accepted = _optimizer_arguments()
    for key in params:
        if key not in accepted:
            raise ValueError(f"unknown NeuroOptima parameter {key!r} in the DeepSpeed config's "
                             f"optimizer.params; accepted: {', '.join(accepted)}")
    kwargs = dict(params)
    if isinstance(kwargs.get("state_dtype"), str):  # JSON cannot name a torch.dtype
        dtype = getattr(torch, kwargs["state_dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"state_dtype must name a torch dtype such as \"bfloat16\", got "
                             f"{kwargs['state_dtype']!r}")
        kwargs["state_dtype"] = dtype
    del ds_config["optimizer"]

    max_grad_norm = kwargs.pop("max_grad_norm", None)
    clipping = ds_config.get("gradient_clipping")
    if max_grad_norm is not None:
        max_grad_norm = _check_positive("max_grad_norm", max_grad_norm)
        if clipping not in (None, 0, 0.0) and float(clipping) != max_grad_norm:
            raise ValueError(f"optimizer.params.max_grad_norm={max_grad_norm:g} conflicts with "
                             f"gradient_clipping={clipping!r}; set one of them")
        ds_config["gradient_clipping"] = max_grad_norm
    elif clipping is None:
        ds_config["gradient_clipping"] = 0.0

    if ds_config.get("zero_allow_untested_optimizer", True) is not True:
        raise ValueError("zero_allow_untested_optimizer must be true (or absent) for NeuroOptima: "
                         "DeepSpeed refuses client optimizers under ZeRO otherwise")
    ds_config["zero_allow_untested_optimizer"] = True

    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if kwargs.get("sam_mode", "global") == "local" and stage not in LOCAL_STAGES:
        raise ValueError(_LOCAL_STAGE_ERROR.format(stage=stage))
    return ds_config, kwargs


def initialize(args=None, model=None, model_parameters=None, config=None, **kwargs):
    """``deepspeed.initialize`` that also honours ``{"optimizer": {"type": "NeuroOptima"}}``.

    Takes the same arguments and returns the same ``(engine, optimizer, dataloader,
    lr_scheduler)``. The config comes from ``config`` (dict or JSON path), ``config_params``
    or ``args.deepspeed_config``, as in DeepSpeed.
    """
    import deepspeed

    if config is None:
        config = kwargs.pop("config_params", None)
    if config is None and args is not None:
        for name in ("deepspeed_config", "deepscale_config"):
            if getattr(args, name, None) is not None:
                config = getattr(args, name)
                # DeepSpeed refuses a config given twice; we pass the rewritten one.
                args = copy.copy(args) if isinstance(args, argparse.Namespace) else args
                setattr(args, name, None)
                break
    if config is None:
        return deepspeed.initialize(args=args, model=model, model_parameters=model_parameters,
                                    **kwargs)
    ds_config, opt_kwargs = split_config(config)
    if opt_kwargs is None:
        return deepspeed.initialize(args=args, model=model, model_parameters=model_parameters,
                                    config=ds_config, **kwargs)
    if kwargs.get("optimizer") is not None:
        raise ValueError("the config names the NeuroOptima optimizer and an optimizer was "
                         "passed as well; give one of them")
    if model_parameters is None:
        if model is None:
            raise ValueError("initialize needs model (and optionally model_parameters)")
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    model_parameters = list(model_parameters)
    optimizer = EngineNeuroOptima(model_parameters, **opt_kwargs)
    kwargs["optimizer"] = optimizer
    result = deepspeed.initialize(args=args, model=model, model_parameters=model_parameters,
                                  config=ds_config, **kwargs)
    engine = result[0]
    stage = engine.zero_optimization_stage()
    if stage == 3 and any(group["sam_ascent"] == "momentum" and group["sam_adaptive"]
                          and group["sam_rho"] > 0 for group in optimizer.param_groups):
        # Its kept offsets did not reproduce one process reliably under stage 3's sub-groups.
        raise ValueError("the |w|-scaled momentum ascent (sam_adaptive=True with "
                         "sam_ascent='momentum') is not supported at ZeRO stage 3: use stage "
                         "0, 1 or 2, or sam_adaptive=False")
    if stage > 0:
        optimizer.dp_group = engine.optimizer.dp_process_group
        optimizer.partitions = ZeroPartitions(engine.optimizer, stage)
    return result


# -------------------------------------------------------------------------------- SAM


@dataclass
class _Owned:
    """Gradient elements a rank owns, the weights the math reads, and what the forward reads."""

    grad: Tensor  # reduced (global) or local gradient elements, flat
    weight: Tensor  # the same elements of w, fp32 master where DeepSpeed keeps one, flat
    target: Tensor  # the low-precision (or fp32) elements the forward pass reads, flat
    group: dict[str, Any]


def _client(engine) -> EngineNeuroOptima:
    optimizer = getattr(engine, "basic_optimizer", None)
    if not isinstance(optimizer, EngineNeuroOptima):
        raise ValueError("sam_step, eval_mode and train_mode need an engine built by "
                         "neurooptima.distributed.deepspeed.initialize with "
                         "{\"optimizer\": {\"type\": \"NeuroOptima\"}} in its config")
    return optimizer


def _owned_stage0(optimizer: EngineNeuroOptima) -> list[_Owned]:
    return [_Owned(p.grad.view(-1), p.detach().view(-1), p.detach().view(-1), group)
            for p, group in optimizer.model_params if p.grad is not None]


def _owned_stage12(optimizer: EngineNeuroOptima) -> list[_Owned]:
    owned = []
    for p, group in optimizer.model_params:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # no element of p lies in this rank's partition
            continue
        grad = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
        address = mapping.lp_fragment_address
        if grad.numel() != address.numel:  # a full-size buffer: keep the owned fragment
            grad = grad.narrow(0, address.start, address.numel)
        owned.append(_Owned(grad, mapping.hp_fragment.view(-1), mapping.lp_fragment, group))
    return owned


def _owned_stage3(optimizer: EngineNeuroOptima) -> list[_Owned]:
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

    owned = []
    for p, group in optimizer.model_params:
        part = p.ds_tensor.numel()
        # The last ranks' partitions end in padding; keep the real elements only.
        start = dist.get_rank(group=p.ds_process_group) * part
        real = max(0, min(part, p.ds_numel - start))
        grad = safe_get_local_grad(p)
        if real == 0 or grad is None:
            continue
        owned.append(_Owned(grad.view(-1)[:real], safe_get_local_fp32_param(p).view(-1)[:real],
                            p.ds_tensor.data.view(-1)[:real], group))
    return owned


@torch.no_grad()
def _norm(owned: list[_Owned], group) -> tuple[float, bool]:
    terms = []
    for o in owned:
        terms += norm_terms([o.weight.float()], [o.grad.float()], adaptive=o.group["sam_adaptive"],
                            eta=o.group["sam_eta"])
    stats = local_norm_stats(terms)
    if group is not None:
        all_reduce_norm_stats(stats, group=group)
    return norm_from_stats(stats)


@torch.no_grad()
def _perturb(owned: list[_Owned], norm: float) -> None:
    for o in owned:
        if not gradient_due(o.group):
            continue  # the norm is every group's, the move only where SAM runs this step
        w = o.weight.float().clone()  # the master value, so low-precision targets get w + e
        perturb_([w], [o.grad.float()], rho=o.group["sam_rho"], norm=norm,
                 adaptive=o.group["sam_adaptive"], eta=o.group["sam_eta"])
        o.target.copy_(w)


def _publish(optimizer: EngineNeuroOptima) -> None:
    """Make every rank's forward pass read the weights owners just wrote into partitions."""
    if optimizer.partitions is not None:  # stage 0: the model's own tensors were written
        optimizer.partitions.publish()


@torch.no_grad()
def _restore_from_masters(optimizer: EngineNeuroOptima) -> None:
    optimizer.partitions.copy_to_model()
    optimizer.partitions.publish()


def sam_step(engine, closure: Callable[[], Tensor]) -> Tensor:
    """One SAM (or ASAM) step of a DeepSpeed engine; returns the first pass's loss.

    ``closure`` runs the forward pass and returns the loss; ``sam_step`` calls backward itself
    (twice) and finally ``engine.step()``. On a step where gradient-ascent SAM is not due
    (``sam_rho`` 0, momentum ascent, or ``sam_interval``/``sam_start`` say so) it is one plain
    forward, backward and step.
    """
    optimizer = _client(engine)
    stage = engine.zero_optimization_stage()
    if engine.gradient_accumulation_steps() != 1:
        raise ValueError(f"sam_step runs one micro-batch per step; set "
                         f"gradient_accumulation_steps to 1 (got "
                         f"{engine.gradient_accumulation_steps()})")
    mode = optimizer.sam_mode
    if mode == "local" and stage not in LOCAL_STAGES:
        raise ValueError(_LOCAL_STAGE_ERROR.format(stage=stage))
    if not optimizer.engine_sam_due:  # the decision comes from the step count: same on all ranks
        loss = closure()
        engine.backward(loss)
        engine.step()
        return loss

    loss = closure()
    if mode == "local":
        with engine.no_sync():  # the gradients stay this replica's own
            engine.backward(loss)
        owned = _owned_stage0(optimizer)
        norm, finite = _norm(owned, None)  # this replica only: no communication
    else:
        engine.backward(loss)
        owned = {0: _owned_stage0, 3: _owned_stage3}.get(stage, _owned_stage12)(optimizer)
        # Stage 0: every rank holds the same full reduced gradients, so the local sum is global.
        norm, finite = _norm(owned, optimizer.dp_group if stage > 0 else None)
    perturbed = finite  # a non-finite first pass leaves w unperturbed, as the core does
    origins = None
    if perturbed:
        if stage == 0:
            origins = [(o.target, o.target.clone()) for o in owned]
        _perturb(owned, norm)
        if mode == "global":
            _publish(optimizer)
    del owned
    engine.optimizer.zero_grad()
    engine.backward(closure())
    if origins is not None:  # stage 0: the optimizer updates these very tensors
        with torch.no_grad():
            for target, origin in origins:
                target.copy_(origin)
    engine.step()
    if perturbed and stage > 0 and not engine.was_step_applied():
        # The step was skipped, so nothing rewrote the perturbed weights from the masters.
        _restore_from_masters(optimizer)
    return loss


# -------------------------------------------------------------------------------- eval / train


def eval_mode(engine) -> None:
    """Momentum ascent: move the engine's model from the ascent point ``w~`` to ``w`` (for
    evaluation, export or averaging); ``train_mode`` goes back bit for bit.

    Collective under ZeRO (every rank calls it): each rank moves the fp32 master partitions it
    owns, copies them to the model's partitions and publishes them as a step does. A no-op
    where no group uses momentum ascent. A step in eval mode is an error. Only the weights
    move: the module's own ``train()``/``eval()`` (dropout, BatchNorm) stay the caller's.
    """
    _switch(engine, evaluating=True)


def train_mode(engine) -> None:
    """Back to the ascent point after ``eval_mode``; a no-op in training mode."""
    _switch(engine, evaluating=False)


@torch.no_grad()
def _switch(engine, *, evaluating: bool) -> None:
    optimizer = _client(engine)
    if not any(group["sam_ascent"] == "momentum" for group in optimizer.all_groups):
        return  # the model holds w already (decided from the config: alike on every rank)
    switch = optimizer.eval if evaluating else optimizer.train
    parts = optimizer.partitions
    if parts is None:  # stage 0: the model's own tensors, or fp32 copies of bf16/fp16 ones
        pairs = _stage0_masters(engine, optimizer)
        switch()
        for model_weight, master in pairs:
            model_weight.data.copy_(master.data)
        return
    with parts.shown(optimizer.all_groups):
        switch()
    parts.copy_to_model()
    parts.publish()


def _stage0_masters(engine, optimizer: EngineNeuroOptima) -> list[tuple[Tensor, Tensor]]:
    """(model weight, fp32 master) pairs where DeepSpeed's stage 0 keeps masters of
    low-precision weights (its unfused bf16/fp16 wrapper); none where the optimizer steps the
    model's own tensors."""
    wrapper = engine.optimizer
    if wrapper is optimizer:
        return []
    low, high = getattr(wrapper, "fp16_groups", None), getattr(wrapper, "fp32_groups", None)
    if low is None or high is None:
        raise ValueError(f"eval_mode/train_mode cannot reach the weights DeepSpeed's "
                         f"{type(wrapper).__name__} keeps at ZeRO stage 0; use ZeRO stage 1-3 "
                         f"(or fp32) with momentum ascent")
    return [(lp, hp) for lows, highs in zip(low, high) for lp, hp in zip(lows, highs)]
