"""`envoygeo dead-letters`: what the command refuses before touching Kafka, and what its
help teaches (the real topic: tests/integration/test_dead_letters.py)."""

from __future__ import annotations

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
