"""benchmarks/gpu_check.py: what runs without a GPU (the message, the bandwidth arithmetic, the
report from recorded results), and its CUDA parts where a GPU exists."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_check  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _result() -> dict:
    """A gpu.json as run_all writes it, with made-up figures."""
    part = dict(command="...", returncode=0, seconds=12.0, tail=["3 passed in 1.0s"], ok=True)
    speed = gpu_check.speed_record("NeuroOptima adan fused", 10_000_000, 44, 0.5e-3, 0.44e-3)
    speed.update(size_label="10M", rule="adan")
    return dict(meta=dict(device="NVIDIA H200", torch="2.13.0", cuda="12.8", python="3.11",
                          date="2025-01-01 00:00:00"),
                unit=part, distributed=part, digits=dict(part, ok=False, returncode=1),
                step_speed=[speed],
                cuda_graph=dict(replays=10, max_abs_diff=0.0, eager_ms=0.4, graph_ms=0.1,
                                steps_graph=13, steps_eager=13, ok=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_it_says_so_and_succeeds(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert gpu_check.NO_GPU in capsys.readouterr().out
    assert not out.exists()


def test_bandwidth_counts_the_bytes_a_step_moves():
    assert [gpu_check.bytes_per_param(r) for r in ("adamw", "adan", "lion", "lion_adan")] == \
        [28, 44, 20, 36]
    assert gpu_check.bytes_per_param("adan", state_bytes=2) == 28
    r = gpu_check.speed_record("x", 10_000_000, 44, 0.5e-3, 0.44e-3)
    assert r["gb_per_s"] == pytest.approx(880.0)  # 440 MB in 0.5 ms
    assert r["copy_gb_per_s"] == pytest.approx(1000.0)
    assert r["fraction_of_copy"] == pytest.approx(0.88)


def test_report_renders_recorded_results(tmp_path):
    out, report = tmp_path / "gpu.json", tmp_path / "GPU.md"
    out.write_text(json.dumps(_result()))
    assert gpu_check.main(["--render", "--out", str(out), "--report", str(report)]) == 0
    text = report.read_text()
    assert "NVIDIA H200" in text and "| 10M | NeuroOptima adan fused | 44 |" in text
    assert "88%" in text and "same as eager" in text and "failed (exit 1)" in text


@CUDA
def test_step_speed_and_graph_capture_on_cuda():
    records = gpu_check.step_speed(["10M"], steps=3)
    assert {r["label"] for r in records} >= {"torch AdamW fused", "NeuroOptima adan fused"}
    assert all(r["fraction_of_copy"] > 0 for r in records)
    assert gpu_check.cuda_graph(replays=3)["ok"]
