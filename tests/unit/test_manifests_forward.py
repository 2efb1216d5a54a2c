"""The forward-relay overlay (issue 13, item 4): `envoygeo forward` in relay mode behind a
Service, Fluent Bit (and the Fluentd variant) shipping to it with TLS, the shared key and
acks. Kubeconform runs over it with every overlay (test_manifests.py); here the pieces are
checked against each other and against envoygeo's own config models."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.unit.test_manifests import (
    K8S,
    _build,
    _docs,
    _env,
    _find,
    _secret_mounts,
    _worker_settings,
    tools,  # noqa: F401 - the session fixture
)

pytestmark = pytest.mark.unit

OVERLAY = "forward-relay"


@pytest.fixture(scope="module")
def docs(tools: dict[str, str]) -> list[dict[str, Any]]:  # noqa: F811
    return _docs(_build(tools, OVERLAY))


@pytest.fixture(scope="module")
def settings(docs: list[dict[str, Any]]) -> Any:
    """The forward process's settings as its pod sees them (secret files present)."""
    return _worker_settings(docs, "envoygeo-forward", "envoygeo-forward-config")


def _container(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (c,) = _find(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    return c


def _fluent_bit(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].startswith("fluent-bit-config-")]
    return yaml.safe_load(cm["data"]["fluent-bit.yaml"])  # type: ignore[no-any-return]


def test_the_forward_config_is_valid_relay_mode_with_tls_and_a_shared_key(
        settings: Any) -> None:
    fwd = settings.forward
    assert fwd.mode == "relay" and fwd.port == 24224
    # Read from the Secret volume (checked readable when the settings loaded in the pod's
    # view), never inline.
    assert fwd.shared_key is None
    assert str(fwd.shared_key_file).endswith("/etc/envoygeo/secrets/forward/shared-key")
    assert str(fwd.tls_cert_file).endswith("/etc/envoygeo/secrets/forward-tls/tls.crt")
    assert str(fwd.tls_key_file).endswith("/etc/envoygeo/secrets/forward-tls/tls.key")
    sec = settings.kafka.security
    assert (sec.protocol, sec.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert settings.kafka.topics == ["envoy-access-logs"]


def test_ports_probes_and_service_agree_with_the_config(docs: list[dict[str, Any]],
                                                        settings: Any) -> None:
    c = _container(docs, "Deployment", "envoygeo-forward")
    assert c["args"] == ["forward", "--config", "/etc/envoygeo/config.yaml"]
    ports = {(p["name"], p["protocol"]): p["containerPort"] for p in c["ports"]}
    assert ports[("forward", "TCP")] == ports[("heartbeat", "UDP")] == settings.forward.port
    assert ports[("metrics", "TCP")] == settings.forward.metrics_port
    assert settings.metrics.host == "0.0.0.0"  # the probes reach it from the kubelet
    assert (c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]) == (
        {"path": "/readyz", "port": "metrics"}, {"path": "/healthz", "port": "metrics"})
    svc = _find(docs, "Service", "envoygeo-forward")
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    assert by_name["forward"]["port"] == settings.forward.port
    assert by_name["forward"]["targetPort"] == "forward"
    assert by_name["heartbeat"]["protocol"] == "UDP"
    pod = _find(docs, "Deployment", "envoygeo-forward")["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.forward.shutdown_grace_s  # in-flight chunks acked before KILL
    pdb = _find(docs, "PodDisruptionBudget", "envoygeo-forward")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_secrets_come_from_secrets_never_a_configmap(docs: list[dict[str, Any]]) -> None:
    mounts = _secret_mounts(docs, "envoygeo-forward")
    assert {m: s["secretName"] for m, s in mounts.items()} == {
        "/etc/envoygeo/secrets/kafka": "envoygeo-kafka",
        "/etc/envoygeo/secrets/forward": "envoygeo-forward",
        "/etc/envoygeo/secrets/forward-tls": "envoygeo-forward-tls"}
    assert all(s["defaultMode"] == 0o440 for s in mounts.values())
    tls_keys = {i["key"] for i in mounts["/etc/envoygeo/secrets/forward-tls"]["items"]}
    assert tls_keys == {"tls.crt", "tls.key"}  # the CA's key is not the server's business
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for text in cm["data"].values():
            # A key may only name where the secret comes from (`${VAR}` from a Secret).
            assert not re.search(r"^\s*(shared_key|password|api_key):(?!\s*\$\{\w+\}\s*$)",
                                 text, re.M), text
    assert not any(d["kind"] == "Secret" for d in docs)  # referenced, never shipped
    assert not _container(docs, "Deployment", "envoygeo-forward").get("env")


def test_fluent_bit_ships_to_the_service_with_acks_tls_and_the_same_key(
        docs: list[dict[str, Any]], settings: Any) -> None:
    conf = _fluent_bit(docs)
    (out,) = conf["pipeline"]["outputs"]
    assert out["name"] == "forward"
    svc = _find(docs, "Service", "envoygeo-forward")
    assert out["host"] == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert out["port"] == settings.forward.port
    assert out["require_ack_response"] is True and out["retry_limit"] == "no_limits"
    assert out["tls"] is True and out["tls.verify"] is True
    assert out["tls.vhost"] == out["host"]
    # The key: the env variable the output reads, from the Secret key the server reads.
    assert out["shared_key"] == "${FORWARD_SHARED_KEY}"
    fb = _container(docs, "DaemonSet", "fluent-bit")
    ref = _env(fb)["FORWARD_SHARED_KEY"]["valueFrom"]["secretKeyRef"]
    fwd_secret = _secret_mounts(docs, "envoygeo-forward")["/etc/envoygeo/secrets/forward"]
    assert (ref["name"], ref["key"]) == (fwd_secret["secretName"],
                                         fwd_secret["items"][0]["key"])
    # The CA file: mounted from the server certificate's Secret, key ca.crt.
    pod = _find(docs, "DaemonSet", "fluent-bit")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in fb["volumeMounts"] if out["tls.ca_file"].startswith(m["mountPath"]))
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "envoygeo-forward-tls"
    assert [i["path"] for i in secret["items"]] == [out["tls.ca_file"].rsplit("/", 1)[1]]
    assert [i["key"] for i in secret["items"]] == ["ca.crt"]
    # Everything before the output is the Kafka variant's, unchanged.
    base = yaml.safe_load((K8S / "fluent-bit" / "fluent-bit.yaml").read_text())
    assert conf["service"] == base["service"]
    assert conf["pipeline"]["inputs"] == base["pipeline"]["inputs"]
    assert conf["pipeline"]["filters"] == base["pipeline"]["filters"]


def test_the_network_policy_admits_the_shippers_and_reaches_only_kafka(
        docs: list[dict[str, Any]], settings: Any) -> None:
    pol = _find(docs, "NetworkPolicy", "envoygeo-forward")["spec"]
    shippers = _find(docs, "DaemonSet", "fluent-bit")["metadata"]["namespace"]
    (fwd_in,) = [r for r in pol["ingress"] if {"protocol": "TCP", "port": settings.forward.port}
                 in r["ports"]]
    assert fwd_in["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": shippers}
    assert {"protocol": "UDP", "port": settings.forward.port} in fwd_in["ports"]  # heartbeat
    egress_ports = sorted(p["port"] for r in pol["egress"] for p in r["ports"])
    kafka_port = int(settings.kafka.bootstrap_servers.rsplit(":", 1)[1])
    assert egress_ports == sorted([53, 53, kafka_port])


def test_the_fluentd_variant_targets_the_same_service() -> None:
    text = (K8S / "fluentd" / "forward.conf").read_text()
    match = re.search(r"<match kube\.\*\*>\s*@type forward(.*?)</match>", text, re.S)
    assert match is not None
    out = match[1]
    assert re.search(r"require_ack_response true", out)
    assert re.search(r"transport tls", out) and re.search(r"tls_cert_path \S+ca\.crt", out)
    assert re.search(r"host envoygeo-forward\.envoygeo\.svc\s+port 24224", out)
    assert "shared_key \"#{ENV['FORWARD_SHARED_KEY']}\"" in out
    assert "retry_forever true" in out
    # Sources and filters are the Kafka variant's.
    base = (K8S / "fluentd" / "fluent.conf").read_text()
    first = base.index("<source>")
    assert text[text.index("<source>"):text.index("<match kube.**>\n  @type forward")] == \
        base[first:base.index("<match kube.**>\n  @type kafka2")]
