"""launch/train.py: every strategy trains one short epoch on 2 ranks, and each gives the metrics
of one process on the same global batches; the baselines run; bad flags are refused."""

from __future__ import annotations

import importlib.util
import math

import pytest

from launch import train
from test_launch_helpers import final_accuracy, output, read_metrics, run_train, without_time

# Per rank 16 examples, global batch 32: 4 steps on 128 examples.
SHORT = ["--epochs", "1", "--subset", "128", "--test-subset", "96", "--no-progress"]
BACKENDS = {"ddp": None, "zero": "neurooptima.distributed.sharded",
            "fsdp2": "neurooptima.dtensor", "fsdp1": "neurooptima.distributed.fsdp",
            "deepspeed": "neurooptima.distributed.deepspeed"}


def _backend_missing(strategy: str) -> str | None:
    module = BACKENDS[strategy]
    if module is not None and importlib.util.find_spec(module) is None:
        return f"--strategy {strategy}: its backend {module} is not part of this checkout yet"
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        return "--strategy deepspeed: the deepspeed package is not installed"
    return None


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """One process, global batch 32: what every 2-rank strategy must reproduce."""
    out = tmp_path_factory.mktemp("single")
    assert train.main([*SHORT, "--batch-size", "32", "--out", str(out)]) == 0
    return read_metrics(out)


@pytest.mark.parametrize("strategy", list(BACKENDS))
def test_strategy_trains_one_epoch_like_one_process(strategy, single_process, tmp_path):
    reason = _backend_missing(strategy)
    if reason:
        pytest.skip(reason)
    result = run_train([*SHORT, "--batch-size", "16", "--strategy", strategy,
                        "--out", str(tmp_path)], nproc=2, timeout=180)
    text = output(result)
    assert result.returncode == 0, text[-4000:]
    assert f"strategy {strategy} on 2 rank(s)" in text
    (metrics,) = read_metrics(tmp_path)
    (expected,) = single_process
    assert metrics["steps"] == expected["steps"] == 4
    # Same global batches, averaged gradients: equal up to float summation order.
    for key in ("train_loss", "test_loss"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
    assert metrics["test_accuracy"] == pytest.approx(expected["test_accuracy"], abs=1.5 / 96)
    assert final_accuracy(text) == pytest.approx(metrics["test_accuracy"], abs=1e-4)


@pytest.mark.parametrize("strategy", ["zero", "fsdp2"])
def test_hybrid_mesh_trains_like_one_process(strategy, single_process, tmp_path):
    """--mesh 2,2: four ranks, state sharded over 2 and replicated over 2 (per rank 8
    examples, the same global batch of 32)."""
    result = run_train([*SHORT, "--batch-size", "8", "--strategy", strategy, "--mesh", "2,2",
                        "--out", str(tmp_path)], nproc=4, timeout=240)
    text = output(result)
    assert result.returncode == 0, text[-4000:]
    (metrics,) = read_metrics(tmp_path)
    (expected,) = single_process
    assert metrics["steps"] == expected["steps"] == 4
    for key in ("train_loss", "test_loss"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key


def test_mesh_is_refused_where_it_does_not_apply(tmp_path):
    result = run_train([*SHORT, "--strategy", "ddp", "--mesh", "1,2"], nproc=2, timeout=120)
    assert result.returncode != 0
    assert "--mesh applies to --strategy zero and fsdp2" in output(result)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "lion", "adan"])
def test_baselines_train(optimizer, tmp_path, capsys):
    args = ["--epochs", "2", "--subset", "256", "--batch-size", "32", "--no-progress",
            "--optimizer", optimizer, "--out", str(tmp_path)]
    assert train.main(args) == 0
    first, second = read_metrics(tmp_path)
    assert all(math.isfinite(m[k]) for m in (first, second) for k in ("train_loss", "test_loss"))
    assert second["train_loss"] < first["train_loss"]
    assert f"| {optimizer} |" in capsys.readouterr().out


def test_neurooptima_flags_reach_the_optimizer(tmp_path):
    # Lion's sign step with lookahead off and ASAM: a different run from the default one.
    common = ["--epochs", "1", "--subset", "64", "--batch-size", "32", "--no-progress"]
    assert train.main([*common, "--out", str(tmp_path / "a")]) == 0
    assert train.main([*common, "--update", "lion", "--lookahead-k", "0", "--sam-adaptive",
                       "--sam-rho", "0.5", "--lr", "1e-3", "--out", str(tmp_path / "b")]) == 0
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert without_time(a) != without_time(b)


def test_neurooptima_only_flags_are_refused_for_a_baseline():
    with pytest.raises(ValueError, match="--sam-rho.*only apply to --optimizer neurooptima"):
        train.main(["--optimizer", "adamw", "--sam-rho", "0.1", "--epochs", "1",
                    "--subset", "64"])


def test_bad_values_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        train.main(["--epochs", "0"])
    assert "--epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--resume needs --out"):
        train.main(["--resume"])


def test_a_run_directory_is_not_overwritten(tmp_path):
    args = ["--epochs", "1", "--subset", "64", "--batch-size", "32", "--no-progress",
            "--out", str(tmp_path)]
    assert train.main(args) == 0
    with pytest.raises(SystemExit, match="--resume"):
        train.main(args)
    with pytest.raises(SystemExit, match="other settings.*seed"):
        train.main([*args, "--resume", "--seed", "5"])


def test_collective_timeout_is_finite_and_configurable(capsys):
    parser = train.build_parser()
    assert parser.parse_args([]).collective_timeout == 300  # not gloo's 30 minutes
    assert parser.parse_args(["--collective-timeout", "20"]).collective_timeout == 20
    for bad in ("0", "-5"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--collective-timeout", bad])
    assert "expected a number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--mesh", "2x2"])
    assert "expected R,S" in capsys.readouterr().err
