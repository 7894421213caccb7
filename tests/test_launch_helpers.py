"""Shared pieces of the launch/ tests that start training runs (this module holds no tests)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"
FINAL = re.compile(r"final test accuracy: ([0-9.]+)")


def run_train(args: list[str], *, nproc: int = 2, timeout: float = 120
              ) -> subprocess.CompletedProcess:
    """launch/train.py under torchrun on ``nproc`` local ranks (plain python when 0)."""
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", str(TRAIN), *args]
    else:
        command = [sys.executable, str(TRAIN), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def final_accuracy(text: str) -> float:
    found = FINAL.findall(text)
    assert found, f"no final accuracy printed:\n{text[-3000:]}"
    return float(found[-1])


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def without_time(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "time_s"} for m in metrics]
