"""The generated files under dashboards/: one function knows their names and content.

`envoygeo dashboards build` writes them; a unit test fails when the committed files
differ from what the generators produce, so a hand edit cannot drift silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.dashboards import kibana, osd
from pipeline.dashboards.names import DEFAULT, IndexNames

KIBANA_NDJSON = "kibana/envoygeo.ndjson"
KIBANA_RULE = "kibana/rules/per-ip-rate.json"
OSD_NDJSON = "opensearch-dashboards/envoygeo.ndjson"


def ndjson(objs: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(o, sort_keys=True, separators=(",", ":")) + "\n" for o in objs)


def generated(names: IndexNames = DEFAULT) -> dict[str, str]:
    """The committed files are `generated()` (default index names); `dashboards build
    -c config.yaml` writes `generated(IndexNames.from_settings(...))`."""
    return {
        KIBANA_NDJSON: ndjson(kibana.saved_objects(names)),
        KIBANA_RULE: json.dumps(kibana.rule_file(names=names), indent=2) + "\n",
        OSD_NDJSON: ndjson(osd.saved_objects(names)),
    }


def write(root: Path, names: IndexNames = DEFAULT) -> list[Path]:
    written = []
    for rel, text in generated(names).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
