"""pipeline.policy: decisions (expiry, allow list wins, cap), rendering (Envoy RBAC via
ECDS, Istio AuthorizationPolicy), diffs, audit records, the `policy:` config section.
The generated Istio YAML passes kubeconform -strict against Istio's CRD schemas and the
RBAC rules pass `envoy --mode validate`; the end-to-end proof against real HAProxy and
Envoy is tests/integration/test_policy_enforcement.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import ConfigError, load_settings
from pipeline.iplists import IpList, parse_lines
from pipeline.lab.stack import envoy_binary
from pipeline.policy import audit, render, state
from pipeline.policy.decide import Decision, Offence, PolicyError, decide
from pipeline.policy.sources import offence_from_doc
from tests.unit.test_manifests import SCHEMAS, TOOLS

NOW = 1_800_000_000.0


def _lst(*lines: str) -> IpList:
    return IpList(tuple(parse_lines(lines)))


def _o(ip: str, n: int, ago: float, count: int = 100, rule: str = "burst") -> Offence:
    return Offence(ip=ip, alert_id=f"{rule}:{ip}:{n}", rule=rule, ts=NOW - ago, count=count)


def _decide(offences: list[Offence], deny: IpList | None = None, allow: IpList | None = None,
            **kw: Any) -> Decision:
    kw = {"now": NOW, "expire_after_s": 600, "max_entries": 100, **kw}
    return decide(offences, deny or IpList(), allow or IpList(), **kw)


def test_expiry_runs_from_the_latest_alert() -> None:
    d = _decide([_o("198.51.100.7", 1, 500), _o("198.51.100.7", 2, 100),
                 _o("198.51.100.8", 3, 700)])  # older than expire_after_s: ignored
    assert [e.cidr for e in d.deny] == ["198.51.100.7/32"]
    e = d.deny[0]
    assert e.expires_at == NOW - 100 + 600 and e.alert_ids == ["burst:198.51.100.7:1",
                                                               "burst:198.51.100.7:2"]
    assert e.score == 200 and e.origin == "alert"


def test_allow_list_wins_and_deny_list_never_expires() -> None:
    d = _decide([_o("192.0.2.5", 1, 10), _o("203.0.113.9", 2, 10), _o("10.9.9.9", 3, 10)],
                deny=_lst("10.0.0.0/8"), allow=_lst("192.0.2.0/24"))
    assert [(e.cidr, e.origin, e.expires_at) for e in d.deny] == [
        ("10.0.0.0/8", "deny_list", None), ("203.0.113.9/32", "alert", NOW - 10 + 600)]
    assert d.deny[0].alert_ids == ["burst:10.9.9.9:3"]  # covered by the deny list
    assert [e.cidr for e in d.allowlisted] == ["192.0.2.5/32"]
    assert d.allow == ["192.0.2.0/24"]


def test_cap_keeps_largest_offenders_and_says_the_cut() -> None:
    offences = [_o(f"198.51.100.{i}", i, 10, count=i * 10) for i in range(1, 6)]
    d = _decide(offences, deny=_lst("10.0.0.0/8"), max_entries=3)
    assert [e.cidr for e in d.deny] == ["10.0.0.0/8", "198.51.100.4/32", "198.51.100.5/32"]
    assert [e.cidr for e in d.cut] == ["198.51.100.3/32", "198.51.100.2/32", "198.51.100.1/32"]
    with pytest.raises(PolicyError, match="deny list alone has 2 entries, over "
                                          r"policy.max_entries \(1\)"):
        _decide([], deny=_lst("10.0.0.0/8", "11.0.0.0/8"), max_entries=1)


def test_rule_filter_ipv6_and_bad_addresses() -> None:
    d = _decide([_o("2001:db8::1", 1, 5), _o("::ffff:198.51.100.9", 2, 5),
                 _o("garbage", 3, 5), _o("203.0.113.1", 4, 5, rule="other")],
                rules=["burst"])
    assert [e.cidr for e in d.deny] == ["198.51.100.9/32", "2001:db8::1/128"]
    assert [o.ip for o in d.invalid] == ["garbage"]


def test_envoy_rbac_principals() -> None:
    d = _decide([_o("198.51.100.7", 1, 5), _o("2001:db8::1", 2, 5)], allow=_lst("192.0.2.0/24"))
    doc = json.loads(render.envoy_ecds(d, filter_name="envoygeo-rbac", allow_only=False))
    res = doc["resources"][0]
    assert res["name"] == "envoygeo-rbac" and res["@type"] == render.TYPED_EXTENSION_CONFIG
    rules = res["typed_config"]["rules"]
    assert rules["action"] == "DENY"
    assert rules["policies"]["envoygeo-deny"]["principals"] == [{"and_ids": {"ids": [
        {"or_ids": {"ids": [
            {"remote_ip": {"address_prefix": "198.51.100.7", "prefix_len": 32}},
            {"remote_ip": {"address_prefix": "2001:db8::1", "prefix_len": 128}}]}},
        {"not_id": {"remote_ip": {"address_prefix": "192.0.2.0", "prefix_len": 24}}}]}}]
    # Deterministic: the same decision gives the same bytes (no reload, empty diff).
    assert render.envoy_ecds(d, filter_name="envoygeo-rbac", allow_only=False) == \
        json.dumps(doc, indent=1, sort_keys=True) + "\n"
    empty = json.loads(render.envoy_ecds(_decide([]), filter_name="x", allow_only=False))
    assert empty["resources"][0]["typed_config"]["rules"] == {"action": "DENY", "policies": {}}
    only = render.rbac_rules(d, allow_only=True)["rules"]["policies"]["envoygeo-not-allowed"]
    assert only["principals"] == [{"not_id": {"remote_ip": {"address_prefix": "192.0.2.0",
                                                            "prefix_len": 24}}}]
    with pytest.raises(ValueError, match="deny every client"):
        render.rbac_rules(_decide([]), allow_only=True)


def test_rbac_rules_pass_envoy_validate(tmp_path: Path) -> None:
    """The rendered RBAC config, inline in a listener, is accepted by Envoy 1.40 itself
    (all three shapes: empty, deny with allow carve-out, allow_only)."""
    d = _decide([_o("198.51.100.7", 1, 5), _o("2001:db8::1", 2, 5)], allow=_lst("192.0.2.0/24"))
    for i, rules in enumerate([render.rbac_rules(_decide([]), allow_only=False),
                               render.rbac_rules(d, allow_only=False),
                               render.rbac_rules(d, allow_only=True)]):
        hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network."
                        "http_connection_manager.v3.HttpConnectionManager",
               "stat_prefix": "v", "http_filters": [
                   {"name": "envoygeo-rbac", "typed_config": rules},
                   {"name": "envoy.filters.http.router", "typed_config": {
                       "@type": "type.googleapis.com/envoy.extensions.filters.http.router."
                                "v3.Router"}}],
               "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [
                   {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]}}
        cfg = {"static_resources": {"listeners": [{
            "name": "l", "address": {"socket_address": {"address": "127.0.0.1",
                                                        "port_value": 1}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": hcm}]}]}]}}
        path = tmp_path / f"v{i}.json"
        path.write_text(json.dumps(cfg))
        proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path),
                               "-l", "critical"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (rules, proc.stdout, proc.stderr)


def _istio(d: Decision, allow_only: bool) -> str:
    return render.istio_yaml(d, name="envoygeo", namespace="istio-system",
                             selector={"istio": "ingressgateway"}, allow_only=allow_only)


def test_istio_policies() -> None:
    d = _decide([_o("198.51.100.7", 1, 5)], deny=_lst("10.0.0.0/8"), allow=_lst("192.0.2.0/24"))
    docs = list(yaml.safe_load_all(_istio(d, True)))
    deny, allow = docs
    assert deny["apiVersion"] == "security.istio.io/v1" and deny["kind"] == "AuthorizationPolicy"
    assert deny["metadata"]["name"] == "envoygeo-deny"
    assert deny["spec"] == {"selector": {"matchLabels": {"istio": "ingressgateway"}},
                            "action": "DENY", "rules": [{"from": [{"source": {
                                "remoteIpBlocks": ["10.0.0.0/8", "198.51.100.7/32"],
                                "notRemoteIpBlocks": ["192.0.2.0/24"]}}]}]}
    assert allow["spec"]["action"] == "ALLOW"
    assert allow["spec"]["rules"] == [{"from": [{"source": {"remoteIpBlocks": ["192.0.2.0/24"]}}]}]
    # Nothing denied: a DENY policy with no rules (matches nothing), never `rules: [{}]`.
    empty = list(yaml.safe_load_all(_istio(_decide([]), False)))
    assert len(empty) == 1 and "rules" not in empty[0]["spec"]


def test_istio_yaml_passes_kubeconform_strict(tmp_path: Path) -> None:
    kubeconform = TOOLS / "bin" / "kubeconform"
    if not kubeconform.is_file() or not (SCHEMAS / "security.istio.io").is_dir():
        proc = subprocess.run(["bash", "deploy/kubernetes/tools/install"], capture_output=True,
                              text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    d = _decide([_o("198.51.100.7", 1, 5), _o("2001:db8::1", 2, 5)],
                deny=_lst("10.0.0.0/8"), allow=_lst("192.0.2.0/24"))
    text = _istio(d, True) + _istio(_decide([]), False)
    proc = subprocess.run(
        [str(kubeconform), "-strict", "-summary", "-output", "json", "-schema-location",
         f"{SCHEMAS}/{{{{.Group}}}}/{{{{.ResourceKind}}}}_{{{{.ResourceAPIVersion}}}}.json", "-"],
        input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)["summary"]
    assert summary["valid"] == 3 and summary["invalid"] == summary["errors"] == 0
    assert summary["skipped"] == 0
    # The schemas are strict: a misspelt field fails, so the pass above means something.
    bad = text.replace("notRemoteIpBlocks", "notRemoteIPBlocks", 1)
    proc = subprocess.run(
        [str(kubeconform), "-strict", "-schema-location",
         f"{SCHEMAS}/{{{{.Group}}}}/{{{{.ResourceKind}}}}_{{{{.ResourceAPIVersion}}}}.json", "-"],
        input=bad, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "notRemoteIPBlocks" in proc.stdout + proc.stderr


def test_diff_reasons_and_state_roundtrip(tmp_path: Path) -> None:
    first = _decide([_o("198.51.100.7", 1, 500), _o("198.51.100.8", 2, 500)],
                    deny=_lst("10.0.0.0/8"))
    changes = state.diff({}, first, NOW)
    assert sorted((c.action, c.entry.cidr) for c in changes) == [
        ("added", "10.0.0.0/8"), ("added", "198.51.100.7/32"), ("added", "198.51.100.8/32")]
    path = tmp_path / "s" / "state.json"
    state.save(path, first)
    old = state.load(path)
    assert old["198.51.100.7/32"].alert_ids == ["burst:198.51.100.7:1"]
    later = NOW + 200  # .8's alert (500 s ago at NOW) has expired; .7 alerted again
    second = decide([_o("198.51.100.7", 1, 500), _o("198.51.100.7", 9, 10)], IpList(),
                    _lst("203.0.113.0/24"), now=later, expire_after_s=600, max_entries=100)
    got = {(c.action, c.entry.cidr): c for c in state.diff(old, second, later)}
    assert got[("extended", "198.51.100.7/32")].alert_ids == ["burst:198.51.100.7:9"]
    assert got[("removed", "198.51.100.8/32")].reason == "expired"
    assert got[("removed", "10.0.0.0/8")].reason == "no longer in the deny list"
    assert state.diff(old, first, NOW) == []
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="delete it to start over"):
        state.load(tmp_path / "bad.json")


def test_audit_documents() -> None:
    d = _decide([_o("198.51.100.7", 1, 5)], deny=_lst("10.0.0.0/8"))
    docs = audit.documents(state.diff({}, d, NOW), now=NOW, outputs=["/etc/envoy/rbac.json"],
                           run_id="r1")
    by = {doc["envoygeo"]["policy"]["cidr"]: doc for doc in docs}
    one = by["198.51.100.7/32"]
    assert one["event"]["action"] == "deny-added" and one["event"]["type"] == ["creation"]
    assert one["related"] == {"ip": ["198.51.100.7"]}
    assert one["envoygeo"]["policy"]["alert_ids"] == ["burst:198.51.100.7:1"]
    assert one["envoygeo"]["policy"]["expires_at"].endswith("Z")
    assert one["user"]["name"] and one["host"]["name"]
    assert "related" not in by["10.0.0.0/8"] and "expires_at" not in by[
        "10.0.0.0/8"]["envoygeo"]["policy"]


def test_offence_from_alert_document() -> None:
    from pipeline.enrich.alerts import AlertRule, _alert_doc

    doc = _alert_doc("burst:198.51.100.7:5", AlertRule(name="burst", window_s=10, threshold=5),
                     "198.51.100.7", NOW, 5, 42, {})
    o = offence_from_doc(doc.pop("_id"), doc)
    assert o == Offence("198.51.100.7", "burst:198.51.100.7:5", "burst", NOW, 42)
    assert offence_from_doc("x", {"event": {"dataset": "other"}}) is None


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "deny.txt"
    bad.write_text("192.0.2.0/24\n10.1.2.3/8\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"policy": {
        "deny_files": [str(bad)], "allow_files": [str(tmp_path / "none.txt")],
        "max_entries": 0, "istio_selector": {}, "expire_after": 5}}))
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    text = str(exc.value)
    assert f"policy.deny_files: {bad}:2: '10.1.2.3/8' has host bits set" in text
    assert "policy.allow_files: cannot read" in text and "none.txt" in text
    assert "policy.max_entries: Input should be greater than or equal to 1" in text
    assert "policy.istio_selector: an empty selector" in text
    assert "policy.expire_after: unknown key" in text
    cfg.write_text(yaml.safe_dump({"policy": {"allow_only": True}}))
    with pytest.raises(ConfigError, match="allow_only needs allow_files"):
        load_settings(cfg)
    env = {"ENVOYGEO_POLICY__EXPIRE_AFTER_S": "90", "ENVOYGEO_POLICY__SOURCE": "kafka"}
    s = load_settings(None, environ=env)
    assert s.policy.expire_after_s == 90 and s.policy.source == "kafka"


def test_command_needs_an_output_and_teaches(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    res = CliRunner().invoke(main, ["policy", "--once"], env={"ENVOYGEO_CONFIG": ""})
    assert res.exit_code == 2
    assert "policy.envoy_rbac_file, policy.istio_file: set at least one output" in res.output
    help_text = CliRunner().invoke(main, ["policy", "--help"]).output
    for phrase in ("--dry-run", "--once", "expire_after_s", "allow list wins", "remote_ip",
                   "remoteIpBlocks", "policy.audit_index", "max_entries"):
        assert phrase in help_text, phrase


def test_a_failed_round_changes_nothing_and_once_exits_1(tmp_path: Path) -> None:
    """Elasticsearch down: one line saying why, no output file written, exit 1."""
    from click.testing import CliRunner

    from pipeline.cli import main

    cfg = tmp_path / "c.yaml"
    out = tmp_path / "rbac.json"
    cfg.write_text(yaml.safe_dump({
        "elasticsearch": {"hosts": ["http://127.0.0.1:9"], "request_timeout_s": 2},
        "policy": {"envoy_rbac_file": str(out)}}))
    res = CliRunner().invoke(main, ["policy", "-c", str(cfg), "--once"])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("policy: round failed, nothing changed: elasticsearch: ")
    assert "127.0.0.1:9" in res.output
    assert not out.exists()
