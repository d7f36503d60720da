"""The source is formatted and lint-clean (after asyncpg's tests/test__sourcecode.py).

Runs the same ruff as ``make lint``, with the settings in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    if not RUFF.exists():
        pytest.fail(f"ruff is not installed next to {sys.executable} (pip install -e '.[test]')")
    return subprocess.run(
        [str(RUFF), *args, "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_format() -> None:
    proc = _ruff("format", "--check")
    if proc.returncode != 0:
        pytest.fail(f"ruff format --check found unformatted files:\n{proc.stdout}{proc.stderr}")


def test_ruff_check() -> None:
    proc = _ruff("check", "--output-format", "concise")
    if proc.returncode != 0:
        pytest.fail(f"ruff check found problems:\n{proc.stdout}{proc.stderr}")
