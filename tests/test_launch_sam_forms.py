"""launch/: --sam-ascent, --sam-warmup, --sam-interval and --sam-start reach NeuroOptima, and
under momentum ascent every evaluation sees w (optimizer.eval() before, train() after)."""

from __future__ import annotations

import importlib.util
import math

import pytest

from launch import train
from launch.optimizers import neurooptima_kwargs
from test_launch_helpers import output, read_metrics, run_train

SHORT = ["--epochs", "1", "--subset", "64", "--test-subset", "64", "--no-progress"]
MSAM = ["--sam-ascent", "momentum", "--sam-rho", "1.0", "--sam-warmup", "1"]


def test_flags_reach_the_optimizer_arguments(capsys):
    parser = train.build_parser()
    args = parser.parse_args([*MSAM, "--sam-interval", "3", "--sam-start", "7"])
    kwargs = neurooptima_kwargs(args)
    assert {k: kwargs[k] for k in ("sam_ascent", "sam_rho", "sam_warmup", "sam_interval",
                                   "sam_start")} == {"sam_ascent": "momentum", "sam_rho": 1.0,
                                                     "sam_warmup": 1, "sam_interval": 3,
                                                     "sam_start": 7}
    assert not {"sam_ascent", "sam_warmup"} & set(neurooptima_kwargs(parser.parse_args([])))
    for flag, bad in (("--sam-interval", "0"), ("--sam-warmup", "-1"), ("--sam-ascent", "x")):
        with pytest.raises(SystemExit):
            parser.parse_args([flag, bad])
        assert flag in capsys.readouterr().err
    with pytest.raises(ValueError, match="--sam-ascent.*only apply to --optimizer neurooptima"):
        train.main(["--optimizer", "adamw", "--sam-ascent", "momentum", *SHORT])


@pytest.mark.parametrize("flags", [MSAM, ["--sam-rho", "0.05", "--sam-interval", "2"]],
                         ids=["momentum", "scheduled"])
def test_evaluation_sees_w_and_training_goes_on_at_the_ascent_point(flags, tmp_path,
                                                                    monkeypatch):
    seen = []
    evaluate = train.evaluate

    def spying(strategy, *args, **kwargs):
        groups = strategy.optimizer.param_groups
        seen.append(([g["ascent_eval"] for g in groups], groups[0]["sam_interval"],
                     groups[0]["sam_ascent"]))
        return evaluate(strategy, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", spying)
    out = tmp_path / "run"
    assert train.main([*SHORT, *flags, "--batch-size", "16", "--out", str(out)]) == 0
    (metrics,) = read_metrics(out)
    assert math.isfinite(metrics["test_loss"])
    ascent = "momentum" if flags is MSAM else "gradient"
    # eval() moves momentum ascent's groups to w; a group without it already holds w.
    assert seen == [([flags is MSAM], 1 if flags is MSAM else 2, ascent)]
    # Trained on after evaluating: resuming continues from a checkpoint saved in train mode.
    assert train.main([*SHORT, *flags, "--batch-size", "16", "--epochs", "2", "--out",
                       str(out), "--resume"]) == 0
    assert seen[-1][0] == [flags is MSAM] and len(read_metrics(out)) == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="the deepspeed package is not installed")
def test_deepspeed_momentum_ascent_trains_like_one_process(tmp_path):
    """--strategy deepspeed (ZeRO 2) on 2 ranks against one process, momentum ascent: the
    test loss (evaluated at w through eval_mode) equal up to summation order."""
    single = tmp_path / "single"
    assert train.main([*SHORT, *MSAM, "--batch-size", "32", "--out", str(single)]) == 0
    ds = tmp_path / "ds"
    result = run_train([*SHORT, *MSAM, "--batch-size", "16", "--strategy", "deepspeed",
                        "--out", str(ds)], nproc=2, timeout=240)
    assert result.returncode == 0, output(result)[-4000:]
    (want,), (got,) = read_metrics(single), read_metrics(ds)
    for key in ("train_loss", "test_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
