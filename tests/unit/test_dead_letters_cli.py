"""`envoygeo dead-letters`: what the command refuses before touching Kafka, and what its
help teaches (the real topic: tests/integration/test_dead_letters.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.deadletters import DeadLetterError, replay

pytestmark = pytest.mark.unit


def test_an_unknown_stage_is_refused_naming_the_stages() -> None:
    out = CliRunner().invoke(main, ["dead-letters", "replay", "--stage", "plugin,indx"])
    assert out.exit_code == 2
    assert "unknown stage 'indx'; stages: parse, plugin, index" in out.output
    with pytest.raises(DeadLetterError, match="unknown stage 'parsed'"):
        replay(Settings().kafka, ["parsed"], "t")


def test_help_names_the_headers_stages_and_positions() -> None:
    group = CliRunner().invoke(main, ["dead-letters", "--help"]).output
    for text in ("envoygeo.stage", "envoygeo.error", "envoygeo.source", "replay", "show"):
        assert text in group
    rep = CliRunner().invoke(main, ["dead-letters", "replay", "--help"]).output
    assert "[default: plugin,index]" in rep and "<kafka.group_id>-replay-<stage>" in rep
    assert "dead-letters" in CliRunner().invoke(main, ["--help"]).output


def test_an_unreachable_kafka_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"kafka:\n  bootstrap_servers: 127.0.0.1:{port}\n")
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "dead-letters", "show",
                          "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines()[-1] == (
        f"envoygeo dead-letters: Kafka 127.0.0.1:{port}: Failed to get metadata: "
        "Local: Broker transport failure")
