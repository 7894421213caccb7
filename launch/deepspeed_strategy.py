"""``--strategy deepspeed``: the model in a DeepSpeed engine (ZeRO stage 0-3).

NeuroOptima enters through ``neurooptima.distributed.deepspeed.initialize`` with the config
entry ``{"optimizer": {"type": "NeuroOptima", "params": {...}}}`` and steps with ``sam_step``
(both SAM passes around the engine). A baseline is handed to the engine as a client optimizer.

The config comes from ``--deepspeed-config`` when given, else from the flags alone. Batch sizes
always follow ``--batch-size`` (one micro-batch per step: SAM needs it), the ZeRO stage follows
``--zero-stage`` when given, and every optimizer flag given on the command line overrides the
file's value.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neurooptima import frozen_batchnorm_stats

from .optimizers import baseline_class, baseline_kwargs, neurooptima_kwargs
from .strategy_base import BackendUnavailable, LossFn, Strategy

__all__ = ["DeepSpeedStrategy", "deepspeed_config"]

ENGINE_FOLDER = "engine"
ENGINE_TAG = "state"
DEFAULT_ZERO_STAGE = 2


def deepspeed_config(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of this run (see the module docstring for precedence)."""
    config: dict[str, Any] = {}
    if args.deepspeed_config is not None:
        config = json.loads(Path(args.deepspeed_config).read_text())
    config["train_micro_batch_size_per_gpu"] = args.batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = args.batch_size * world_size
    zero = dict(config.get("zero_optimization", {}))
    if args.zero_stage is not None or "stage" not in zero:
        zero["stage"] = args.zero_stage if args.zero_stage is not None else DEFAULT_ZERO_STAGE
    config["zero_optimization"] = zero
    config.setdefault("steps_per_print", 2**31 - 1)  # the progress bar reports instead
    if args.optimizer == "neurooptima":
        section = config.get("optimizer") or {}
        if section and str(section.get("type", "")).lower() != "neurooptima":
            raise ValueError(f"--deepspeed-config names optimizer {section.get('type')!r}; "
                             f"with --optimizer neurooptima it must be \"NeuroOptima\" (or "
                             f"absent)")
        params = dict(section.get("params", {}))
        flags = neurooptima_kwargs(args)
        if args.lr is None and "lr" in params:
            flags.pop("lr", None)  # the file's learning rate wins over the built-in default
        params.update(flags)
        if args.sam_mode is not None or "sam_mode" not in params:
            params["sam_mode"] = args.sam_mode or "global"
        config["optimizer"] = {"type": "NeuroOptima", "params": params}
    else:
        if "optimizer" in config:
            raise ValueError(f"--deepspeed-config names an optimizer; with --optimizer "
                             f"{args.optimizer} the baseline comes from the flags, so remove "
                             f"the file's \"optimizer\" entry")
        config["zero_allow_untested_optimizer"] = True
        config.setdefault("gradient_clipping", 0.0)  # DeepSpeed's default would clip at 1.0
    return config


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    sharded_checkpoint = True

    def setup(self, model: nn.Module) -> None:
        if importlib.util.find_spec("deepspeed") is None:
            raise BackendUnavailable("--strategy deepspeed needs the deepspeed package: "
                                     "pip install 'neurooptima[deepspeed]'")
        if importlib.util.find_spec("neurooptima.distributed.deepspeed") is None:
            raise BackendUnavailable("--strategy deepspeed needs NeuroOptima's DeepSpeed "
                                     "adapter (neurooptima.distributed.deepspeed), which is not "
                                     "available in this installation")
        from neurooptima.distributed import deepspeed as ds_adapter

        if self.device.type == "cpu":
            ds_adapter.disable_jit_ops()  # no JIT-built CPU ops: plain torch collectives
        model = model.to(self.device)
        config = deepspeed_config(self.args, self.world_size)
        client = None
        if self.args.optimizer != "neurooptima":
            client = baseline_class(self.args.optimizer)(model.parameters(),
                                                         **baseline_kwargs(self.args))
        engine, optimizer, _, _ = ds_adapter.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=config, optimizer=client)
        self._adapter = ds_adapter
        self.engine = engine
        self.model = engine
        self.module = engine.module
        self.optimizer = optimizer
        self._input_dtype = (torch.bfloat16 if engine.bfloat16_enabled()
                             else torch.float16 if engine.fp16_enabled() else None)

    def _cast(self, inputs: Tensor) -> Tensor:
        if self._input_dtype is not None and inputs.is_floating_point():
            return inputs.to(self._input_dtype)
        return inputs

    def train_step(self, inputs: Tensor, targets: Tensor, loss_fn: LossFn) -> Tensor:
        engine = self.engine
        engine.train()
        inputs = self._cast(inputs)
        if self.args.optimizer != "neurooptima":
            loss = loss_fn(engine(inputs), targets)
            engine.backward(loss)
            engine.step()
            return loss.detach()
        calls = 0

        def closure() -> Tensor:
            nonlocal calls
            calls += 1
            # The second SAM pass must not count the batch twice in BatchNorm statistics.
            frozen = calls > 1
            with frozen_batchnorm_stats(engine.module) if frozen else contextlib.nullcontext():
                return loss_fn(engine(inputs), targets)

        return self._adapter.sam_step(engine, closure).detach()

    @torch.no_grad()
    def eval_forward(self, inputs: Tensor) -> Tensor:
        self.engine.eval()
        return self.engine(self._cast(inputs))

    def weights_eval(self) -> None:
        if self.args.optimizer == "neurooptima":
            self._adapter.eval_mode(self.engine)  # collective: every rank evaluates

    def weights_train(self) -> None:
        if self.args.optimizer == "neurooptima":
            self._adapter.train_mode(self.engine)

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / ENGINE_FOLDER), tag=ENGINE_TAG,
                                    save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory / ENGINE_FOLDER), tag=ENGINE_TAG,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed engine checkpoint in {directory}")
