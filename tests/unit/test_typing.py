"""The package type-checks: `mypy pipeline` (its settings in pyproject.toml) finds nothing.

Type hints are part of the public surface (the enricher and plugin API, `py.typed`), so
a wrong hint is a bug a user's own type checker would report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.unit


def test_mypy_finds_nothing_in_the_package() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", "pipeline"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout
