"""One round of `envoygeo policy`: read, decide, render, diff, write, audit.

Order of effects on a real round: the gateway files first (what is enforced), then the
audit records, then the state file. If auditing fails the state is not advanced, so
the next round finds the same changes and audits them then: a change is never
enforced without eventually being recorded.
"""

from __future__ import annotations

import difflib
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.iplists import IpList
from pipeline.policy import audit, render, sources, state
from pipeline.policy.decide import Decision, Offence, decide
from pipeline.policy.state import Change

if TYPE_CHECKING:
    from pipeline.config import Settings


def state_path(settings: Settings) -> Path:
    p = settings.policy
    if p.state_file is not None:
        return p.state_file
    first = p.envoy_rbac_file or p.istio_file
    assert first is not None  # the command refuses a config with no output
    return first.with_name(first.name + ".state.json")


@dataclass
class RoundResult:
    decision: Decision
    changes: list[Change]
    offences: int
    written: list[str] = field(default_factory=list)
    diff_text: str = ""

    def summary(self) -> str:
        d = self.decision
        static = sum(1 for e in d.deny if e.origin == "deny_list")
        count = {a: sum(1 for c in self.changes if c.action == a)
                 for a in ("added", "removed", "extended")}
        parts = [f"{len(d.deny)} denied ({static} from deny lists, {len(d.deny) - static} "
                 f"from {self.offences} alerts)",
                 f"{count['added']} added, {count['removed']} removed, "
                 f"{count['extended']} extended"]
        if d.allowlisted:
            parts.append(f"{len(d.allowlisted)} alerting allow-listed, not denied: "
                         + _some(e.cidr for e in d.allowlisted))
        if d.cut:
            parts.append(f"{len(d.cut)} over policy.max_entries not denied (smallest "
                         "offenders): " + _some(f"{e.cidr} (score {e.score})" for e in d.cut))
        if d.invalid:
            parts.append(f"{len(d.invalid)} alerts without a usable address ignored: "
                         + _some(o.alert_id for o in d.invalid))
        return "; ".join(parts)


def _some(items: Any, n: int = 5) -> str:
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def read_offences(settings: Settings, es: Any, since: float) -> list[Offence]:
    if settings.policy.source == "kafka":
        from pipeline.kafka_security import client_config

        return sources.from_kafka(client_config(settings.kafka), settings.kafka.alerts_topic,
                                  since)
    return sources.from_elasticsearch(es, settings.elasticsearch.alerts_index, since)


def outputs(settings: Settings, decision: Decision) -> dict[Path, str]:
    p = settings.policy
    out: dict[Path, str] = {}
    if p.envoy_rbac_file is not None:
        out[p.envoy_rbac_file] = render.envoy_ecds(
            decision, filter_name=p.envoy_filter_name, allow_only=p.allow_only)
    if p.istio_file is not None:
        out[p.istio_file] = render.istio_yaml(
            decision, name=p.istio_name, namespace=p.istio_namespace,
            selector=p.istio_selector, allow_only=p.allow_only)
    return out


def run_round(settings: Settings, es: Any, *, dry_run: bool,
              now: float | None = None) -> RoundResult:
    p = settings.policy
    now = time.time() if now is None else now
    allow, deny = IpList.load(p.allow_files), IpList.load(p.deny_files)
    offences = read_offences(settings, es, now - p.expire_after_s)
    decision = decide(offences, deny, allow, now=now, expire_after_s=p.expire_after_s,
                      max_entries=p.max_entries, rules=p.rules)
    spath = state_path(settings)
    changes = state.diff(state.load(spath), decision, now)
    files = outputs(settings, decision)
    result = RoundResult(decision, changes, len(offences))
    current = {path: (path.read_text() if path.exists() else "") for path in files}
    if dry_run:
        result.diff_text = "".join(
            "".join(difflib.unified_diff(current[path].splitlines(keepends=True),
                                         text.splitlines(keepends=True),
                                         fromfile=f"{path} (now)", tofile=f"{path} (new)"))
            for path, text in files.items())
        return result
    for path, text in files.items():
        if current[path] != text:
            state.write_atomically(path, text)
            result.written.append(str(path))
    if changes:
        docs = audit.documents(changes, now=now, outputs=[str(x) for x in files],
                               run_id=uuid.uuid4().hex)
        audit.write(es, p.audit_index, docs)
    if changes or not spath.exists():
        state.save(spath, decision)
    return result
