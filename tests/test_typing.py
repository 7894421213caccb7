"""``py.typed`` is honoured: ``mypy --strict`` on a user's script (tests/typing/user_script.py)
reports its string learning rate against NeuroOptima's annotations.

The package is installed (not in editable mode, whose import hook type checkers do not follow)
into a scratch folder, as a user's site-packages would hold it. Skipped without mypy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "typing" / "user_script.py"


def _mypy(site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           "--cache-dir", os.devnull, str(SCRIPT)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_mypy_strict_reports_a_wrong_typed_lr(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    assert (site / "neurooptima" / "py.typed").exists()
    result = _mypy(site, tmp_path)
    print(result.stdout)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, result.stdout
    assert 'Argument "lr" to "NeuroOptima" has incompatible type "str"; expected "float | None"' \
        in errors[0]
    # Without the marker mypy would not read the annotations at all.
    (site / "neurooptima" / "py.typed").unlink()
    assert "py.typed marker" in _mypy(site, tmp_path).stdout
