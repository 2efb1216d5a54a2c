"""Real access-log lines from shared/samples (or the copy in tests/data/samples)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def samples_dir() -> Path:
    shared = REPO_ROOT.parent / "shared" / "samples"
    if shared.is_dir() and any(shared.iterdir()):
        return shared
    return REPO_ROOT / "tests" / "data" / "samples"


def sample_lines() -> list[tuple[str, str]]:
    """(file name, line) for every non-comment line."""
    out = []
    for path in sorted(samples_dir().iterdir()):
        if not path.is_file():  # e.g. fluent-bit-5.1.1/: captures of whole records
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                out.append((path.name, line))
    return out
