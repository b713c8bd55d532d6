"""Every example runs (at tiny sizes), as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("examples/quickstart.py", ["--scale", "tiny", "--batch-sizes", "1,2"], "default-tiny on"),
        ("examples/custom_ensemble.py", [], "vote shares per sample"),
        ("examples/serve.py", ["--scale", "tiny", "--batch-size", "2"], "8 concurrent requests"),
    ],
)
def test_example_runs(script: str, args: list[str], expected: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expected in proc.stdout
