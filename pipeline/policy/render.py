"""The deny set as the gateways read it: an Istio AuthorizationPolicy, an Envoy RBAC
filter config delivered through ECDS from a file.

Both match the *remote* address, which behind a PROXY-protocol load balancer is the
client the PROXY header names, not the balancer:

- Istio `remoteIpBlocks` is the `remote.ip` attribute: taken from the PROXY header or
  X-Forwarded-For (with `numTrustedProxies` set); `ipBlocks` would be the packet's
  source, i.e. the load balancer, and would deny every client at once.
- Envoy RBAC `remote_ip` is the downstream remote address after the proxy_protocol
  listener filter and the HTTP connection manager's `use_remote_address` /
  `xff_num_trusted_hops` logic; `direct_remote_ip` is the physical peer (HAProxy).

The allow list is carved out of every deny rule (`notRemoteIpBlocks`, `not_id`), so an
allowed client is never denied even if a deny-list network covers it. With
`allow_only`, everyone outside the allow list is denied (IP allow-listing).

Output is deterministic (sorted, no timestamps): an unchanged decision writes the same
bytes, so `--dry-run` shows an empty diff and Envoy is not reloaded for nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from pipeline.iplists import parse_network
from pipeline.policy.decide import Decision

RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
TYPED_EXTENSION_CONFIG = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
MANAGED_BY = {"app.kubernetes.io/managed-by": "envoygeo"}


def _cidr_range(cidr: str) -> dict[str, Any]:
    n = parse_network(cidr)
    return {"address_prefix": str(n.network_address), "prefix_len": n.prefixlen}


def _any_of(cidrs: list[str]) -> dict[str, Any]:
    ids = [{"remote_ip": _cidr_range(c)} for c in cidrs]
    return ids[0] if len(ids) == 1 else {"or_ids": {"ids": ids}}


def rbac_rules(decision: Decision, *, allow_only: bool) -> dict[str, Any]:
    """`envoy.extensions.filters.http.rbac.v3.RBAC`: one DENY rule set (a filter has
    one action; allow_only is expressed as "deny whoever is not allowed")."""
    policies: dict[str, Any] = {}
    allow = decision.allow
    deny = [e.cidr for e in decision.deny]
    if allow_only:
        if not allow:
            raise ValueError("allow_only with an empty allow list would deny every client")
        policies["envoygeo-not-allowed"] = {
            "permissions": [{"any": True}], "principals": [{"not_id": _any_of(allow)}]}
    if deny:
        principal = _any_of(deny)
        if allow:
            principal = {"and_ids": {"ids": [principal, {"not_id": _any_of(allow)}]}}
        policies["envoygeo-deny"] = {"permissions": [{"any": True}], "principals": [principal]}
    return {"@type": RBAC_TYPE, "rules": {"action": "DENY", "policies": policies}}


def envoy_ecds(decision: Decision, *, filter_name: str, allow_only: bool) -> str:
    """The file an HTTP filter's `config_discovery.config_source.path_config_source`
    points at: a discovery response holding one TypedExtensionConfig named like the
    filter. `version_info` is a hash of the rules, so Envoy's
    `extension_config_discovery.http_filter.<name>.version_text` says which is live."""
    rules = rbac_rules(decision, allow_only=allow_only)
    body = json.dumps(rules, sort_keys=True, separators=(",", ":"))
    doc = {"version_info": hashlib.sha256(body.encode()).hexdigest()[:16],
           "resources": [{"@type": TYPED_EXTENSION_CONFIG, "name": filter_name,
                          "typed_config": rules}]}
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def istio_policies(decision: Decision, *, name: str, namespace: str,
                   selector: dict[str, str], allow_only: bool) -> list[dict[str, Any]]:
    """AuthorizationPolicy objects (security.istio.io/v1). The DENY policy is always
    written, with no rules when nothing is denied (a DENY policy without rules matches
    nothing), so removing the last entry updates the object instead of leaving it."""
    meta = {"namespace": namespace, "labels": dict(MANAGED_BY)}
    source: dict[str, Any] = {}
    if decision.deny:
        source["remoteIpBlocks"] = [e.cidr for e in decision.deny]
        if decision.allow:
            source["notRemoteIpBlocks"] = list(decision.allow)
    deny_spec: dict[str, Any] = {"selector": {"matchLabels": dict(selector)}, "action": "DENY"}
    if source:
        deny_spec["rules"] = [{"from": [{"source": source}]}]
    out = [{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": f"{name}-deny", **meta}, "spec": deny_spec}]
    if allow_only:
        if not decision.allow:
            raise ValueError("allow_only with an empty allow list would deny every client")
        out.append({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                    "metadata": {"name": f"{name}-allow", **meta},
                    "spec": {"selector": {"matchLabels": dict(selector)}, "action": "ALLOW",
                             "rules": [{"from": [{"source": {
                                 "remoteIpBlocks": list(decision.allow)}}]}]}})
    return out


def istio_yaml(decision: Decision, *, name: str, namespace: str, selector: dict[str, str],
               allow_only: bool) -> str:
    docs = istio_policies(decision, name=name, namespace=namespace, selector=selector,
                          allow_only=allow_only)
    header = ("# Generated by `envoygeo policy`; changes are overwritten. "
              "kubectl apply -f this file.\n")
    return header + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)
