"""One audit document per change: who, what, when, why (the alert ids).

ECS-shaped so it sits beside the alerts in Kibana: `event.action` is the change,
`user.name` / `host.name` who ran it, `envoygeo.policy.*` the entry, its reason, its
expiry and the alerts behind it, `related.ip` the address for single-address entries.
"""

from __future__ import annotations

import getpass
import socket
from datetime import UTC, datetime
from typing import Any

from pipeline.iplists import parse_network
from pipeline.policy.state import Change

DATASET = "envoygeo.policy"
MAPPINGS: dict[str, Any] = {
    "dynamic": False,
    "properties": {
        "@timestamp": {"type": "date"},
        "event": {"properties": {k: {"type": "keyword"} for k in (
            "kind", "category", "type", "action", "dataset", "module")}},
        "user": {"properties": {"name": {"type": "keyword"}}},
        "host": {"properties": {"name": {"type": "keyword"}}},
        "related": {"properties": {"ip": {"type": "ip"}}},
        "message": {"type": "text"},
        "envoygeo": {"properties": {"policy": {"properties": {
            "cidr": {"type": "keyword"}, "range": {"type": "ip_range"},
            "change": {"type": "keyword"}, "origin": {"type": "keyword"},
            "reason": {"type": "keyword"}, "alert_ids": {"type": "keyword"},
            "rules": {"type": "keyword"}, "expires_at": {"type": "date"},
            "score": {"type": "long"}, "outputs": {"type": "keyword"},
            "run_id": {"type": "keyword"}}}}},
    },
}
_EVENT_TYPE = {"added": "creation", "removed": "deletion", "extended": "change"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def documents(changes: list[Change], *, now: float, outputs: list[str],
              run_id: str) -> list[dict[str, Any]]:
    user, host = who(), socket.gethostname()
    docs = []
    for c in changes:
        e = c.entry
        net = parse_network(e.cidr)
        policy: dict[str, Any] = {
            "cidr": e.cidr, "range": e.cidr, "change": c.action, "origin": e.origin,
            "reason": c.reason, "alert_ids": c.alert_ids, "rules": e.rules,
            "score": e.score, "outputs": outputs, "run_id": run_id}
        if e.expires_at is not None and c.action != "removed":
            policy["expires_at"] = _iso(e.expires_at)
        doc: dict[str, Any] = {
            "@timestamp": _iso(now),
            "event": {"kind": "event", "category": ["configuration"],
                      "type": [_EVENT_TYPE[c.action]], "action": f"deny-{c.action}",
                      "dataset": DATASET, "module": "envoygeo"},
            "user": {"name": user}, "host": {"name": host},
            "message": f"deny {c.action}: {e.cidr} ({c.reason})",
            "envoygeo": {"policy": policy},
        }
        if net.num_addresses == 1:
            doc["related"] = {"ip": [str(net.network_address)]}
        docs.append(doc)
    return docs


def write(es: Any, index: str, docs: list[dict[str, Any]]) -> None:
    """Index the documents (creating the index with its mapping the first time) and
    wait for them to be searchable; any failure raises, so the caller keeps the old
    state and the next round audits the change again instead of losing it."""
    if not docs:
        return
    if not es.indices.exists(index=index):
        try:
            es.indices.create(index=index, mappings=MAPPINGS)
        except Exception as exc:  # created meanwhile by another policy process
            if "resource_already_exists" not in str(exc):
                raise
    ops: list[dict[str, Any]] = []
    for d in docs:
        ops.append({"create": {"_index": index}})
        ops.append(d)
    resp = es.bulk(operations=ops, refresh="wait_for")
    if resp.get("errors"):
        bad = [i["create"] for i in resp["items"] if i["create"].get("error")]
        raise RuntimeError(f"audit index {index}: {len(bad)} of {len(docs)} records "
                           f"refused: {bad[0]['error']}")
