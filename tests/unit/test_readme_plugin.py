"""The README's Python API example runs as printed: the block after the
`readme-example: plugin` marker is executed in a fresh interpreter and prints what its
`# prints:` line says (so the public API it shows stays true)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.unit


def test_the_plugin_example_runs_and_prints_what_the_readme_says(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-example: plugin -->\n```python\n(.*?)```", readme, re.S)
    assert block is not None, "the marked example is gone from README.md"
    code = block[1]
    expected = re.search(r"^# prints: (.*)$", code, re.M)
    assert expected is not None
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected[1]
