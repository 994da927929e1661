"""The speed scripts in ``benchmarks/`` still import and parse their arguments (``--help``), so a renamed
module or function breaks this test instead of the scripts silently."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def test_there_are_benchmark_scripts() -> None:
    assert SCRIPTS, f"no scripts found in {ROOT / 'benchmarks'}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[script.name for script in SCRIPTS])
def test_benchmark_script_help(script: Path) -> None:
    python = str(VENV_PYTHON) if VENV_PYTHON.is_file() else sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [python, str(script), "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{script.name} --help failed:\n{result.stderr[-2000:]}"
    assert "usage:" in result.stdout
