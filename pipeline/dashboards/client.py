"""Import saved objects into Kibana / OpenSearch Dashboards and create the alert rule.

stdlib only (urllib): the worker image has no HTTP client dependency to spare, and the
two calls needed are simple. Every failure becomes a DashboardsError whose message says
what to do (credentials, privileges, conflicts, per-object import errors), because the
people running this are usually setting up a cluster, not debugging Python.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Literal

Flavour = Literal["kibana", "osd"]


class DashboardsError(Exception):
    """An import or rule request that did not do what was asked."""


@dataclass(frozen=True)
class Target:
    url: str
    flavour: Flavour = "kibana"
    space: str | None = None
    api_key: str | None = None
    username: str | None = None
    password: str | None = None
    verify_tls: bool = True
    ca_certs: str | None = None  # PEM bundle for a private CA (kibana.ca_certs)
    timeout_s: float = 30.0

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.verify_tls:
            return ssl._create_unverified_context()  # noqa: S323
        return ssl.create_default_context(cafile=self.ca_certs) if self.ca_certs else None

    def base(self) -> str:
        root = self.url.rstrip("/")
        return f"{root}/s/{urllib.parse.quote(self.space)}" if self.space else root

    def headers(self) -> dict[str, str]:
        # Both products refuse state-changing API calls without their XSRF header.
        h = {"kbn-xsrf": "true"} if self.flavour == "kibana" else {"osd-xsrf": "true"}
        if self.api_key:
            h["Authorization"] = f"ApiKey {self.api_key}"
        elif self.username is not None:
            token = base64.b64encode(f"{self.username}:{self.password or ''}".encode())
            h["Authorization"] = f"Basic {token.decode()}"
        return h


def multipart(field: str, filename: str, content: bytes) -> tuple[str, bytes]:
    """A multipart/form-data body with one file part (what the import API expects)."""
    boundary = f"envoygeo-{uuid.uuid4().hex}"
    body = b"".join([
        f"--{boundary}\r\n".encode(),
        f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'.encode(),
        b"Content-Type: application/ndjson\r\n\r\n",
        content,
        f"\r\n--{boundary}--\r\n".encode(),
    ])
    return f"multipart/form-data; boundary={boundary}", body


def _explain(status: int, payload: Any, what: str, target: Target) -> str:
    message = payload.get("message", "") if isinstance(payload, dict) else str(payload)
    # One line: a proxy's HTML error page says nothing the status does not.
    message = "" if message.lstrip().startswith("<") else " ".join(message.split())
    hint = {
        401: "authentication failed: check kibana.api_key/api_key_file or "
             "kibana.username/password/password_file (--api-key, --username/--password)",
        403: "forbidden: the credentials lack the privilege"
             + (f" in space {target.space!r}" if target.space else "")
             + " (saved objects management / alerting 'all')",
        404: "not found: is the URL the Kibana/OSD base URL, and does the space exist?",
        409: "version conflict: the object changed on the server meanwhile; run again",
    }.get(status, "request failed")
    return f"{what}: HTTP {status} {hint}" + (f" ({message})" if message else "")


def request(target: Target, method: str, path: str, body: bytes | None = None,
            content_type: str = "application/json", what: str = "request",
            ok_statuses: tuple[int, ...] = ()) -> tuple[int, Any]:
    """Send one API request; returns (status, parsed JSON). Raises on 4xx/5xx unless
    the status is in ok_statuses (so callers can handle e.g. 409 themselves)."""
    headers = target.headers()
    if body is not None:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(target.base() + path, data=body, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=target.timeout_s,
                                    context=target.tls_context()) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except urllib.error.URLError as e:
        from pipeline.service_errors import tls_line

        cause = e.reason if isinstance(e.reason, BaseException) else e
        tls = tls_line(cause, what, target.url, target.ca_certs, "kibana.url / kibana.ca_certs",
                       "that kibana.url says https:// only for a TLS port")
        if tls is not None:
            raise DashboardsError(tls) from None
        raise DashboardsError(f"{what}: cannot reach {target.url}: {e.reason}") from None
    try:
        payload = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        payload = raw.decode(errors="replace")[:300]
    if status >= 400 and status not in ok_statuses:
        raise DashboardsError(_explain(status, payload, what, target))
    return status, payload


def import_saved_objects(target: Target, ndjson: bytes, filename: str = "envoygeo.ndjson",
                         overwrite: bool = True) -> list[str]:
    """POST …/api/saved_objects/_import; returns "type/id title" lines of what landed.

    A 200 response can still carry per-object `errors` (missing references, unsupported
    types — e.g. Kibana 8 files sent to OpenSearch Dashboards); those are failures too.
    """
    if not filename.endswith(".ndjson"):
        filename += ".ndjson"  # the API rejects other extensions
    content_type, body = multipart("file", filename, ndjson)
    query = "?overwrite=true" if overwrite else ""
    _, payload = request(target, "POST", f"/api/saved_objects/_import{query}", body,
                         content_type, what="saved objects import")
    errors = payload.get("errors") or []
    if errors or not payload.get("success", False):
        lines = [f"  {e.get('type')}/{e.get('id')} {e.get('title', '')!r}: "
                 f"{_object_error(e.get('error', {}))}" for e in errors]
        raise DashboardsError("saved objects import: "
                              f"{payload.get('successCount', 0)} imported, "
                              f"{len(errors)} failed:\n" + "\n".join(lines))
    return [f"{r.get('type')}/{r.get('id')} {r.get('meta', {}).get('title', '')}".rstrip()
            for r in payload.get("successResults", [])]


def _object_error(error: dict[str, Any]) -> str:
    kind = error.get("type", "error")
    if kind == "missing_references":
        refs = ", ".join(f"{r.get('type')}/{r.get('id')}" for r in error.get("references", []))
        return f"missing references: {refs}"
    if kind == "conflict":
        return "conflict with an existing object (import with overwrite)"
    if kind == "unsupported_type":
        return "unsupported type (Kibana 8 objects do not import into OpenSearch Dashboards)"
    return error.get("message") or kind


def upsert_rule(target: Target, rule_id: str, rule: dict[str, Any]) -> str:
    """Create the rule with a fixed id, or update it when it exists.

    POST /api/alerting/rule/<id> creates; it answers 409 when the id is taken, and then
    PUT /api/alerting/rule/<id> updates (PUT refuses rule_type_id and consumer, which
    cannot change). Returns "created" or "updated".
    """
    path = f"/api/alerting/rule/{urllib.parse.quote(rule_id)}"
    status, _ = request(target, "POST", path, json.dumps(rule).encode(),
                        what="alert rule create", ok_statuses=(409,))
    if status != 409:
        return "created"
    update = {k: v for k, v in rule.items() if k not in ("rule_type_id", "consumer",
                                                         "enabled")}
    request(target, "PUT", path, json.dumps(update).encode(), what="alert rule update")
    return "updated"
