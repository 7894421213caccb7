"""DeepSpeed: NeuroOptima from a ds_config under ZeRO stages 0-3, SAM at engine level.

Every engine trains the same small uneven-shaped MLP on a fixed global batch split across the
ranks, with ``sam_step``, and is compared with the single-process ``NeuroOptima`` taking
``step(closure)`` on the whole batch: fp32 weights within 1e-6 relative (per tensor,
``||w - w_ref|| / ||w_ref||``), bf16 within ``BF16_RTOL`` (per stage, see there). The loss is scaled so that gradient
norms exceed 1: DeepSpeed's default clipping at 1.0 would break every comparison if it applied.

DeepSpeed's JIT ops are disabled (``disable_jit_ops`` and ``DS_ACCELERATOR=cpu``), so no run
compiles anything. Engines are slow to build, so each test builds few.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("deepspeed")

from neurooptima import NeuroOptima  # noqa: E402
from neurooptima.distributed import deepspeed as nds  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
DS_CONFIG = REPO / "launch" / "ds_config.json"
STEPS = 10
FP32_RTOL = 1e-6
# bf16 keeps 8 significant bits (~0.4% rounding of weights and activations per step). Stages
# 1-3 keep fp32 master weights and land within ~0.2% after 10 Adan steps. Stage 0's bf16 wrapper
# (DeepSpeed's FP16_UnfusedOptimizer) lands ~3% away even with SAM off, so it gets more room.
BF16_RTOL = {0: 6e-2, 1: 1e-2, 2: 1e-2, 3: 1e-2}
PER_RANK = 4
LOSS_SCALE = 20.0  # gradient norms well above 1, so silent clipping at 1.0 would show

HYPER = dict(lr=2e-2, weight_decay=0.05, sam_rho=0.05, lookahead_k=3, lookahead_alpha=0.5)


@pytest.fixture(scope="module", autouse=True)
def _no_jit_ops():
    nds.disable_jit_ops()


def make_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3)).to(dtype)


def global_batch(world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(world * PER_RANK, 7, generator=g),
            torch.randn(world * PER_RANK, 3, generator=g))


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return LOSS_SCALE * (out.float() - y).pow(2).mean()


def ds_config(stage: int, params: dict, bf16: bool = False, **extra) -> dict:
    world = dist.get_world_size()
    config = {"train_batch_size": world * PER_RANK, "train_micro_batch_size_per_gpu": PER_RANK,
              "optimizer": {"type": "NeuroOptima", "params": params},
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
              "steps_per_print": 10**9, "wall_clock_breakdown": False}
    config.update(extra)
    return config


def reference(params: dict, steps: int = STEPS) -> list[torch.Tensor]:
    """Single-process NeuroOptima on the global batch."""
    model = make_model()
    opt = NeuroOptima(model.parameters(), **params)
    world = dist.get_world_size()
    for step in range(steps):
        x, y = global_batch(world, step)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def train(engine, first: int, last: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = next(p for p in engine.module.parameters()).dtype
    for step in range(first, last):
        x, y = global_batch(world, step)
        x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        nds.sam_step(engine, lambda: loss_fn(engine(x.to(dtype)), y))


def full_weights(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def build(stage: int, params: dict, bf16: bool = False, **extra):
    model = make_model(torch.bfloat16 if bf16 else torch.float32)
    engine, *_ = nds.initialize(model=model, config=ds_config(stage, params, bf16, **extra))
    return engine


def rel_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    return [((g - w).norm() / w.norm()).item() for g, w in zip(got, want)]


def agree(ok: bool) -> bool:
    """True when every rank passed, so no rank leaves a peer waiting in a collective."""
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return flag.item() == 0


def shared_dir(tmp_path) -> str:
    """One directory every rank writes to (rank 0's temporary directory)."""
    holder = [str(tmp_path)]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ------------------------------------------------------------------------ exactness, fp32


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_rule_matches_single_process(stage, tmp_path):
    """Every update rule, SAM and Lookahead on: 10 steps equal single-process NeuroOptima.

    The Adan run also saves a checkpoint at step 5; a fresh engine that loads it and runs
    steps 5-9 must land on the same weights (Lookahead syncs at steps 6 and 9 and Adan's
    buffers drive every step, so lost state would show).
    """
    folder = shared_dir(tmp_path)
    errors, resumed, state_keys = {}, None, set()
    for rule in ("adan", "lion", "lion_adan"):
        params = dict(HYPER, update=rule)
        engine = build(stage, params)
        assert engine.gradient_clipping() == 0.0  # not DeepSpeed's default 1.0
        if rule == "adan":
            train(engine, 0, STEPS // 2)
            engine.save_checkpoint(folder, tag="half")
        train(engine, STEPS // 2 if rule == "adan" else 0, STEPS)
        weights = full_weights(engine)
        errors[rule] = rel_errors(weights, reference(params))
        if rule == "adan":
            again = build(stage, params)
            again.load_checkpoint(folder, tag="half")
            for state in again.basic_optimizer.state.values():
                state_keys |= set(state)
            train(again, STEPS // 2, STEPS)
            resumed = rel_errors(full_weights(again), weights)
    worst = max(max(e) for e in errors.values())
    ok = worst <= FP32_RTOL and max(resumed) == 0.0
    assert agree(ok), (errors, resumed)
    assert worst <= FP32_RTOL, errors
    assert max(resumed) == 0.0, resumed  # the exact trajectory, bit for bit
    assert {"lookahead.slow", "adan.exp_avg", "adan.exp_avg_diff", "adan.exp_avg_sq",
            "adan.prev_grad"} <= state_keys


@pytest.mark.two_ranks_only
@pytest.mark.parametrize("stage", [1, 3])
def test_asam_matches_single_process(stage):
    """ASAM's T_w reads the fp32 master partitions; the result equals the core's ASAM."""
    params = dict(HYPER, sam_adaptive=True, sam_rho=0.5)
    engine = build(stage, params)
    train(engine, 0, STEPS)
    errors = rel_errors(full_weights(engine), reference(params))
    assert agree(max(errors) <= FP32_RTOL), errors
    assert max(errors) <= FP32_RTOL, errors


def local_sam_reference(params: dict) -> list[torch.Tensor]:
    """Per-replica SAM: each replica perturbs with its own gradient and norm, the second-pass
    gradients are averaged and the core applies the update (SAM off in the core)."""
    from neurooptima.sam import perturb_

    model = make_model()
    opt = NeuroOptima(model.parameters(), **dict(params, sam_rho=0.0))
    world = dist.get_world_size()
    weights = list(model.parameters())
    for step in range(STEPS):
        x, y = global_batch(world, step)
        total = [torch.zeros_like(w) for w in weights]
        for r in range(world):
            xr, yr = x[r * PER_RANK:(r + 1) * PER_RANK], y[r * PER_RANK:(r + 1) * PER_RANK]
            g = torch.autograd.grad(loss_fn(model(xr), yr), weights)
            origin = [w.detach().clone() for w in weights]
            norm = torch.stack([t.norm() for t in g]).norm().item()
            with torch.no_grad():
                perturb_([w.detach() for w in weights], list(g), rho=params["sam_rho"],
                         norm=norm, adaptive=False, eta=0.01)
            g2 = torch.autograd.grad(loss_fn(model(xr), yr), weights)
            with torch.no_grad():
                for w, o, t, d in zip(weights, origin, total, g2):
                    w.copy_(o)
                    t.add_(d / world)
        for w, t in zip(weights, total):
            w.grad = t
        opt.step()
    return [w.detach().clone() for w in weights]


@pytest.mark.two_ranks_only
@pytest.mark.parametrize("stage", [0, 1])
def test_local_sam_is_per_replica_sam(stage):
    params = dict(HYPER, sam_mode="local")
    engine = build(stage, params)
    train(engine, 0, STEPS)
    ref_params = {k: v for k, v in params.items() if k != "sam_mode"}
    errors = rel_errors(full_weights(engine), local_sam_reference(ref_params))
    assert agree(max(errors) <= FP32_RTOL), errors
    assert max(errors) <= FP32_RTOL, errors


@pytest.mark.parametrize("stage", [2, 3])
def test_local_sam_is_refused_where_gradients_are_partitioned(stage):
    with pytest.raises(ValueError, match=f"sam_mode=\"local\".*ZeRO stage {stage} reduces"):
        nds.initialize(model=make_model(), config=ds_config(stage, dict(HYPER, sam_mode="local")))


# ------------------------------------------------------------------------ bf16


@pytest.mark.two_ranks_only
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_close_to_fp32_single_process(stage):
    """bf16 weights and activations: within BF16_RTOL of the fp32 single-process run."""
    params = dict(HYPER)
    engine = build(stage, params, bf16=True)
    train(engine, 0, STEPS)
    errors = rel_errors(full_weights(engine), reference(params))
    assert agree(max(errors) <= BF16_RTOL[stage]), errors
    assert max(errors) <= BF16_RTOL[stage], errors


# ------------------------------------------------------------------------ config


def test_unknown_parameter_is_named():
    config = ds_config(1, dict(HYPER, sam_rhoo=0.1))
    with pytest.raises(ValueError, match="unknown NeuroOptima parameter 'sam_rhoo'"):
        nds.initialize(model=make_model(), config=config)
    config = ds_config(1, HYPER)
    config["optimizer"]["parameters"] = {}
    with pytest.raises(ValueError, match="'parameters'"):
        nds.initialize(model=make_model(), config=config)


def test_clipping_is_never_deepspeeds_silent_default():
    ds, _ = nds.split_config(ds_config(2, HYPER))
    assert ds["gradient_clipping"] == 0.0 and "optimizer" not in ds
    assert ds["zero_allow_untested_optimizer"] is True
    ds, _ = nds.split_config(ds_config(2, HYPER, gradient_clipping=2.5))
    assert ds["gradient_clipping"] == 2.5  # the user's own setting stays
    ds, kwargs = nds.split_config(ds_config(2, dict(HYPER, max_grad_norm=0.5)))
    assert ds["gradient_clipping"] == 0.5 and "max_grad_norm" not in kwargs
    with pytest.raises(ValueError, match="max_grad_norm=0.5 conflicts with gradient_clipping"):
        nds.split_config(ds_config(2, dict(HYPER, max_grad_norm=0.5), gradient_clipping=1.0))
    with pytest.raises(ValueError, match="max_grad_norm must be a number > 0"):
        nds.split_config(ds_config(2, dict(HYPER, max_grad_norm=-1)))


@pytest.mark.two_ranks_only
def test_max_grad_norm_clips_like_the_core():
    """max_grad_norm becomes DeepSpeed's clipping; the weights equal the core's clipped run."""
    params = dict(HYPER, max_grad_norm=0.5)  # first-step gradient norm is ~19
    engine = build(2, params)
    assert engine.gradient_clipping() == 0.5
    train(engine, 0, STEPS)
    errors = rel_errors(full_weights(engine), reference(params))
    unclipped = rel_errors(full_weights(engine), reference(dict(HYPER)))
    assert agree(max(errors) <= FP32_RTOL), errors
    assert max(errors) <= FP32_RTOL, errors
    assert min(unclipped) > 1e-3  # clipping really changed the run


@pytest.mark.two_ranks_only
def test_example_config_file(tmp_path):
    """launch/ds_config.json through args.deepspeed_config, as the launcher passes it."""
    import argparse

    config = json.loads(DS_CONFIG.read_text())
    params = {k: v for k, v in config["optimizer"]["params"].items() if k != "sam_mode"}
    args = argparse.Namespace(deepspeed_config=str(DS_CONFIG),
                              local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    engine, optimizer, _, _ = nds.initialize(args=args, model=make_model())
    assert args.deepspeed_config == str(DS_CONFIG)  # the caller's namespace is untouched
    assert engine.zero_optimization_stage() == config["zero_optimization"]["stage"]
    assert isinstance(engine.basic_optimizer, nds.EngineNeuroOptima)
    train(engine, 0, STEPS)
    errors = rel_errors(full_weights(engine), reference(params))
    assert agree(max(errors) <= FP32_RTOL), errors
    assert max(errors) <= FP32_RTOL, errors


# ------------------------------------------------------------------------ launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.two_ranks_only
def test_deepspeed_launcher_runs_the_example(tmp_path):
    """`deepspeed --num_gpus 2 launch/train_deepspeed.py --deepspeed_config ...` on localhost.

    Rank 0 runs the launcher; rank 1 waits for its result file without any collective (the
    launch takes longer than the session's collective timeout).
    """
    done = pathlib.Path(shared_dir(tmp_path)) / "launcher.json"
    if dist.get_rank() == 0:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                            "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR",
                            "MASTER_PORT") and not k.startswith("TORCHELASTIC")}
        env["DS_ACCELERATOR"] = "cpu"
        launcher = pathlib.Path(sys.executable).parent / "deepspeed"
        command = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()),
                   str(REPO / "launch" / "train_deepspeed.py"), "--deepspeed_config",
                   str(DS_CONFIG), "--steps", "20"]
        try:
            run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=600)
            result = {"rc": run.returncode, "stdout": run.stdout, "stderr": run.stderr[-3000:]}
        except subprocess.TimeoutExpired as error:
            result = {"rc": "timeout", "stdout": str(error.stdout), "stderr": ""}
        done.with_suffix(".tmp").write_text(json.dumps(result))
        done.with_suffix(".tmp").rename(done)
    else:
        deadline = time.monotonic() + 660
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(1.0)
    result = json.loads(done.read_text())
    assert result["rc"] == 0, result
    # Both ranks share the launcher's stdout, so a result may share its line with other output.
    lines = [json.loads(found) for found in re.findall(r'\{"rank": [^{}]*\}', result["stdout"])]
    assert sorted(line["rank"] for line in lines) == [0, 1], result["stdout"]
    assert len({line["checksum"] for line in lines}) == 1  # every rank holds the same weights
    assert all(line["last_loss"] < line["first_loss"] for line in lines), lines
