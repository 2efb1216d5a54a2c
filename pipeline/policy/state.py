"""What the last round wrote, and what changed since.

The state file is the memory between rounds: the entries enforced (with their expiry
and alert ids), so a round can say "released: expired" rather than only "gone". Files
are replaced atomically (write a temporary file in the same directory, fsync, rename):
Envoy's filesystem subscription watches for the rename and must never read half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.policy.decide import Decision, Entry


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict[str, Entry]:
    """The entries enforced by the last round; none if the file does not exist yet."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"policy state file {path} is unreadable ({exc}); delete it to "
                         "start over (the next round re-derives the deny set from the "
                         "alerts)") from None
    return {d["cidr"]: Entry.from_json(d) for d in data.get("entries", [])}


def save(path: Path, decision: Decision) -> None:
    write_atomically(path, json.dumps(
        {"version": 1, "entries": [e.to_json() for e in decision.deny],
         "allow": decision.allow}, indent=1) + "\n")


@dataclass
class Change:
    action: str  # "added", "removed", "extended"
    entry: Entry
    reason: str
    previous: Entry | None = None
    alert_ids: list[str] = field(default_factory=list)  # the alerts that caused it


def diff(old: dict[str, Entry], decision: Decision, now: float) -> list[Change]:
    """Changes from `old` to `decision.deny`, each with its reason."""
    new = {e.cidr: e for e in decision.deny}
    allowlisted = {e.cidr for e in decision.allowlisted}
    cut = {e.cidr for e in decision.cut}
    changes: list[Change] = []
    for cidr, e in new.items():
        before = old.get(cidr)
        if before is None:
            why = ("in the deny list" if e.origin == "deny_list" else
                   f"alerted ({', '.join(e.rules)}), {len(e.alert_ids)} alert(s)")
            changes.append(Change("added", e, why, alert_ids=list(e.alert_ids)))
        elif e.origin == "alert" and e.expires_at != before.expires_at:
            fresh = [a for a in e.alert_ids if a not in before.alert_ids]
            changes.append(Change("extended", e, "alerted again", before, fresh or e.alert_ids))
    for cidr, before in old.items():
        if cidr in new:
            continue
        if cidr in allowlisted:
            why = "allow-listed"
        elif cidr in cut:
            why = "cut: over policy.max_entries"
        elif before.origin == "deny_list":
            why = "no longer in the deny list"
        elif before.expires_at is not None and before.expires_at <= now:
            why = "expired"
        else:
            why = "its alerts are gone (rule no longer selected, or deleted)"
        changes.append(Change("removed", before, why, alert_ids=list(before.alert_ids)))
    return changes
