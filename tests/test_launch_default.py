"""The README's main command: `torchrun --standalone --nproc_per_node=2 launch/train.py` trains
the MLP on the embedded digits data with NeuroOptima's defaults and reaches >= 95 % accuracy."""

from __future__ import annotations

from test_launch_helpers import final_accuracy, output, run_train


def test_default_run_reaches_95_percent_on_digits():
    result = run_train([], nproc=2, timeout=300)
    text = output(result)
    assert result.returncode == 0, text[-4000:]
    assert "digits" in text and "neurooptima | strategy ddp on 2 rank(s)" in text
    assert final_accuracy(text) >= 0.95, text[-2000:]
