"""launch/train.py --resume: a run that dies mid-way and is restarted continues from its last
(sharded) checkpoint and writes exactly the metrics of a run that never stopped."""

from __future__ import annotations

import importlib.util

import pytest

from launch import checkpoint as ckpt
from test_launch_helpers import output, read_metrics, run_train, without_time

# 128 examples, global batch 32: 4 steps per epoch, 3 epochs. Checkpoints every 3 steps and at
# each epoch end; the crash after step 7 leaves the mid-epoch checkpoint of step 6 as the last.
RUN = ["--epochs", "3", "--subset", "128", "--test-subset", "96", "--batch-size", "16",
       "--checkpoint-every", "3", "--no-progress"]
# FSDP2 exercises the sharded (torch.distributed.checkpoint) path; one strategy keeps CI short.
BACKENDS = {"fsdp2": "neurooptima.dtensor"}


@pytest.mark.parametrize("strategy", list(BACKENDS))
def test_killed_run_resumes_with_identical_metrics(strategy, tmp_path):
    if importlib.util.find_spec(BACKENDS[strategy]) is None:
        pytest.skip(f"--strategy {strategy}: backend {BACKENDS[strategy]} is not available")
    args = [*RUN, "--strategy", strategy]
    whole = run_train([*args, "--out", str(tmp_path / "whole")], timeout=180)
    assert whole.returncode == 0, output(whole)[-4000:]

    run_dir = tmp_path / "crashed"
    crashed = run_train([*args, "--out", str(run_dir), "--crash-after-steps", "7"], timeout=180)
    assert crashed.returncode != 0, "the simulated crash did not stop the run"
    assert "final test accuracy" not in output(crashed)
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None and ckpt.read_meta(latest)["global_step"] == 6
    assert len(read_metrics(run_dir)) == 1  # epoch 1 finished before the crash

    resumed = run_train([*args, "--out", str(run_dir), "--resume"], timeout=180)
    text = output(resumed)
    assert resumed.returncode == 0, text[-4000:]
    assert "resumed from" in text and "(epoch 2, step 2)" in text
    assert without_time(read_metrics(run_dir)) == without_time(read_metrics(tmp_path / "whole"))
