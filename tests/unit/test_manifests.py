"""deploy/kubernetes: every overlay builds with kustomize and passes kubeconform in strict
mode against Kubernetes 1.34 + Istio + KEDA + Prometheus-operator schemas generated
offline; the EnvoyFilter's listener filter and the access-log format pass
`envoy --mode validate`; the pieces agree with envoygeo's own config and parser."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import ConfigError, load_settings
from pipeline.decode.access_log import default_json_aliases, field_for_command
from pipeline.decode.envoy_format import Command, tokenize
from pipeline.decode.json_log import JsonLogParser
from pipeline.lab.stack import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
TOOLS = Path(os.environ.get("ENVOYGEO_TOOLS", Path.home() / ".cache" / "envoygeo"))
SCHEMAS = TOOLS / "kube-schemas"


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    """kubeconform, kustomize and the schemas; installed by the repo's script if absent."""
    bins = {name: str(TOOLS / "bin" / name) for name in ("kubeconform", "kustomize")}
    # Always: the script only rebuilds what is missing or whose sources changed (its
    # stamp), so a cache made before a CRD joined the list is brought up to date.
    proc = subprocess.run(["bash", str(K8S / "tools" / "install")], capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, f"tools/install failed:\n{proc.stdout}\n{proc.stderr}"
    return bins


def _build(tools: dict[str, str], overlay: str) -> str:
    proc = subprocess.run([tools["kustomize"], "build", str(K8S / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _kubeconform(tools: dict[str, str], manifests: str) -> subprocess.CompletedProcess[str]:
    # No -ignore-missing-schemas: a kind without a schema is an error, not a skip.
    return subprocess.run(
        [tools["kubeconform"], "-strict", "-summary", "-output", "json",
         "-schema-location",
         f"{SCHEMAS}/{{{{.Group}}}}/{{{{.ResourceKind}}}}_{{{{.ResourceAPIVersion}}}}.json",
         "-"], input=manifests, capture_output=True, text=True, timeout=120)


def _docs(manifests: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(manifests) if d]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_passes_kubeconform(tools: dict[str, str], overlay: str) -> None:
    manifests = _build(tools, overlay)
    proc = _kubeconform(tools, manifests)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)["summary"]
    assert summary["valid"] == len(_docs(manifests)) >= 15, summary
    assert summary["invalid"] == summary["errors"] == summary["skipped"] == 0


def test_kubeconform_schemas_are_strict(tools: dict[str, str]) -> None:
    """The negative case: a misspelt field in core and CRD kinds must fail."""
    docs = _docs(_build(tools, "keda"))
    deployment = _find(docs, "Deployment", "envoygeo")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    scaled = _find(docs, "ScaledObject", "envoygeo")
    scaled["spec"]["triggers"][0]["lagTreshold"] = "1"
    envoy_filter = _find(docs, "EnvoyFilter", "envoygeo-proxy-protocol")
    envoy_filter["spec"]["configPatches"][0]["applyTo"] = "LISTENER_FILTERS"
    proc = _kubeconform(tools, yaml.safe_dump_all([deployment, scaled, envoy_filter]))
    assert proc.returncode == 1
    out = proc.stdout
    assert "'readinessprobe' not allowed" in out and "'lagTreshold' not allowed" in out
    assert "at '/spec/configPatches/0/applyTo': value must be one of" in out
    assert json.loads(out)["summary"]["invalid"] == 3


def test_overlays_differ_where_they_should(tools: dict[str, str]) -> None:
    elb, nlb, keda, topo = (_docs(_build(tools, o)) for o in
                            ("aws-elb", "aws-nlb", "keda", "gateway-topology"))
    for docs in (elb, nlb, keda, topo):
        svc = _find(docs, "Service", "istio-ingressgateway")
        assert svc["spec"]["externalTrafficPolicy"] == "Local"
        assert svc["metadata"]["annotations"][
            "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"] == "*"
    nlb_ann = _find(nlb, "Service", "istio-ingressgateway")["metadata"]["annotations"]
    assert nlb_ann["service.beta.kubernetes.io/aws-load-balancer-type"] == "nlb"
    assert nlb_ann["service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"] \
        == "proxy_protocol_v2.enabled=true"
    assert "service.beta.kubernetes.io/aws-load-balancer-type" not in _find(
        elb, "Service", "istio-ingressgateway")["metadata"]["annotations"]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in keda}
    assert ("ScaledObject", "envoygeo") in kinds
    assert not any(k == "HorizontalPodAutoscaler" for k, _ in kinds)
    assert ("HorizontalPodAutoscaler", "envoygeo") in {(d["kind"], d["metadata"]["name"])
                                                       for d in elb}
    trigger = _find(keda, "ScaledObject", "envoygeo")["spec"]["triggers"][0]
    assert trigger["type"] == "kafka" and trigger["metadata"]["topic"] == "envoy-access-logs"
    # gateway-topology: Istio adds the filter from ProxyConfig; no EnvoyFilter.
    assert not any(d["kind"] == "EnvoyFilter" for d in topo)


def test_worker_deployment_matches_its_config(tools: dict[str, str]) -> None:
    docs = _docs(_build(tools, "aws-elb"))
    dep = _find(docs, "Deployment", "envoygeo")
    settings = _worker_settings(docs)
    pod = dep["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["ports"][0]["containerPort"] == settings.metrics.port == 9108
    assert worker["args"] == ["run", "--config", "/etc/envoygeo/config.yaml"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["enableServiceLinks"] is False  # no ENVOYGEO_METRICS_PORT=tcp://... noise
    assert worker["securityContext"]["readOnlyRootFilesystem"] is True
    assert worker["resources"]["requests"] and worker["resources"]["limits"]
    assert not [e for e in worker.get("env", []) if "valueFrom" in e]  # secrets are files
    assert settings.rates.backend == "redis" and "envoygeo-redis" in settings.rates.redis_url
    assert str(settings.geoip.city).startswith("/var/lib/geoip/")
    assert not any(d["kind"] == "CronJob" for d in docs)  # each pod refreshes its own


def test_credentials_come_from_secrets_never_the_configmap(tools: dict[str, str]) -> None:
    """Kafka SCRAM password and CA, the Elasticsearch CA and API key, the Redis password:
    each from a Secret (file or secretKeyRef); the ConfigMap holds none of them, and the
    Redis server demands the password the worker is given."""
    docs = _docs(_build(tools, "aws-nlb"))
    settings = _worker_settings(docs)
    sec = settings.kafka.security
    assert (sec.protocol, sec.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert str(sec.password_file).endswith("/etc/envoygeo/secrets/kafka/password")
    assert str(sec.ca_file).endswith("/etc/envoygeo/secrets/kafka/ca.crt")
    assert str(settings.elasticsearch.ca_certs).endswith(
        "/etc/envoygeo/secrets/elasticsearch/ca.crt")
    assert str(settings.elasticsearch.api_key_file).endswith(
        "/etc/envoygeo/secrets/elasticsearch/api-key")
    assert str(settings.rates.redis_password_file).endswith("/etc/envoygeo/secrets/redis/password")
    assert "@" not in settings.rates.redis_url  # no password in the URL
    mounts = _secret_mounts(docs)
    assert {s["secretName"] for s in mounts.values()} == {"envoygeo-kafka",
                                                         "envoygeo-elasticsearch",
                                                         "envoygeo-redis"}
    assert all(s["defaultMode"] == 0o440 for s in mounts.values())
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].startswith("envoygeo-config")]
    text = cm["data"]["config.yaml"]
    assert not re.search(r"^\s*(password|api_key|sasl\.password):", text, re.M), text
    redis = _find(docs, "Deployment", "envoygeo-redis")["spec"]["template"]["spec"]
    (server,) = redis["containers"]
    args = server["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = _env(server)
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "envoygeo-redis",
                                                                  "key": "password"}
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == "envoygeo-redis"
    assert not any(d["kind"] == "Secret" for d in docs)  # referenced, never shipped


def test_network_policy_allows_what_the_config_uses(tools: dict[str, str]) -> None:
    """The worker's egress: DNS, and the ports of Kafka, Elasticsearch and Redis as its
    config names them, HTTPS to public addresses (geoipupdate); nothing else. Redis
    admits the workers only."""
    docs = _docs(_build(tools, "aws-nlb"))
    settings = _worker_settings(docs)
    policy = _find(docs, "NetworkPolicy", "envoygeo")
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["spec"]["egress"]
                    for p in rule["ports"]}
    kafka_port = int(settings.kafka.bootstrap_servers.rsplit(":", 1)[1])
    es_port = int(settings.elasticsearch.hosts[0].rsplit(":", 1)[1])
    redis_port = int(settings.rates.redis_url.rsplit(":", 1)[1].split("/")[0])
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", kafka_port), ("TCP", es_port),
                            ("TCP", redis_port), ("TCP", 443)}
    https = next(r for r in policy["spec"]["egress"] if r["ports"][0]["port"] == 443)
    assert "10.0.0.0/8" in https["to"][0]["ipBlock"]["except"]
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == {settings.metrics.port}
    redis_policy = _find(docs, "NetworkPolicy", "envoygeo-redis")
    (rule,) = redis_policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "envoygeo"}}}]
    assert redis_policy["spec"]["egress"] == []


# -- scheduling: GeoIP without shared storage, readiness, the Helm-owned gateway -------

def _secret_mounts(docs: list[dict[str, Any]],
                   deployment: str = "envoygeo") -> dict[str, dict[str, Any]]:
    """mountPath -> the Secret volume the (one) container of `deployment` mounts there."""
    pod = _find(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]]["secret"] for m in worker["volumeMounts"]
            if "secret" in volumes[m["name"]]}


def _worker_settings(docs: list[dict[str, Any]], deployment: str = "envoygeo",
                     configmap: str = "envoygeo-config") -> Any:
    """The worker's settings as its pod sees them: environment variables from Secrets
    set (a placeholder per key), and every file path the config names under a Secret
    volume present (the Secret's keys, in a scratch copy of the mount). A path under no
    Secret mount, or a key the volume does not project, fails here as in the pod."""
    import tempfile

    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].startswith(configmap + "-")]
    text = cm["data"]["config.yaml"]
    pod = _find(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    saved = dict(os.environ)
    with tempfile.TemporaryDirectory() as scratch:
        for e in worker.get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                os.environ[e["name"]] = "secret-" + e["valueFrom"]["secretKeyRef"]["key"]
        for path in sorted(set(re.findall(r"(/etc/envoygeo/secrets/[\w./-]+)", text))):
            mounts = _secret_mounts(docs, deployment)
            mount = next((m for m in mounts if path.startswith(m + "/")), None)
            assert mount is not None, f"{path} is under no Secret volume mount"
            secret = mounts[mount]
            key = path[len(mount) + 1:]
            projected = [i["path"] for i in secret.get("items", [])]
            assert not projected or key in projected, f"{key} not projected from {secret}"
            target = Path(scratch + path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"placeholder {key}\n")
        try:
            return load_settings_from_text(text.replace("/etc/envoygeo/secrets/",
                                                        scratch + "/etc/envoygeo/secrets/"))
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_volume_needs_read_write_many(tools: dict[str, str], overlay: str) -> None:
    """EBS (the aws-* overlays) and most block storage cannot give ReadWriteMany: such a
    claim stays Pending and so does every pod mounting it. Nothing here needs one."""
    docs = _docs(_build(tools, overlay))
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert not [c["metadata"]["name"] for c in claims
                if "ReadWriteMany" in c["spec"].get("accessModes", [])]
    for d in docs:
        pod = d.get("spec", {}).get("template", {}).get("spec") or d.get(
            "spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
        for v in (pod or {}).get("volumes", []):
            assert "persistentVolumeClaim" not in v, (d["kind"], d["metadata"]["name"], v)


def test_each_pod_downloads_and_refreshes_its_own_geoip(tools: dict[str, str]) -> None:
    """An init container fills an emptyDir before the worker starts; a native sidecar
    (restartPolicy Always) refreshes it; both write where the worker's geoip.* paths
    point, with the editions those paths name and MaxMind credentials from a Secret."""
    docs = _docs(_build(tools, "aws-nlb"))
    settings = _worker_settings(docs)
    pod = _find(docs, "Deployment", "envoygeo")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (worker,) = pod["containers"]
    mounts = {m["name"]: m for m in worker["volumeMounts"]}
    db_dir = mounts["geoip"]["mountPath"]
    assert "emptyDir" in volumes["geoip"] and mounts["geoip"]["readOnly"] is True
    wanted = {Path(str(settings.geoip.city)).stem, Path(str(settings.geoip.asn)).stem}
    assert {str(Path(str(settings.geoip.city)).parent),
            str(Path(str(settings.geoip.asn)).parent)} == {db_dir}
    assert settings.geoip.check_interval_s > 0  # how the worker notices a refresh
    init, sidecar = pod["initContainers"]
    assert "restartPolicy" not in init  # runs once, to completion, before the worker
    assert sidecar["restartPolicy"] == "Always"  # native sidecar: keeps running
    for c in (init, sidecar):
        assert c["image"].startswith("ghcr.io/maxmind/geoipupdate:")
        env = _env(c)
        assert set(env["GEOIPUPDATE_EDITION_IDS"]["value"].split()) == wanted
        assert env["GEOIPUPDATE_DB_DIR"]["value"] == db_dir
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["geoip"] == db_dir
        for key in ("GEOIPUPDATE_ACCOUNT_ID", "GEOIPUPDATE_LICENSE_KEY"):
            assert "value" not in env[key]
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "envoygeo-maxmind"
        # read-only root FS: the entrypoint's config file goes to a writable volume
        conf_dir = str(Path(env["GEOIPUPDATE_CONF_FILE"]["value"]).parent)
        assert conf_dir in {m["mountPath"] for m in c["volumeMounts"]}
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert int(_env(init).get("GEOIPUPDATE_FREQUENCY", {"value": "0"})["value"]) == 0
    assert int(_env(sidecar)["GEOIPUPDATE_FREQUENCY"]["value"]) > 0


def test_readiness_survives_an_elasticsearch_outage() -> None:
    """/readyz is what the Deployment's readinessProbe asks. It stays 200 while
    Elasticsearch refuses writes or the worker holds no partition (it resumes on its
    own), so an outage does not take every pod out of service and the PDB
    (maxUnavailable 1) still lets nodes drain; 503 only before the consumer exists."""
    from types import SimpleNamespace

    from pipeline.worker import Worker

    sink = SimpleNamespace(writable=threading.Event(), last_error="connection refused",
                           action_head=lambda index: b"")
    worker = Worker(load_settings(), enricher=object(), sink=sink,  # type: ignore[arg-type]
                    side=object())  # type: ignore[arg-type]
    ok, why = worker._ready()
    assert not ok and "starting" in why
    worker.source = SimpleNamespace(assigned=[])  # type: ignore[assignment]
    ok, why = worker._ready()
    assert ok and "elasticsearch not accepting writes" in why and "connection refused" in why
    worker.source = SimpleNamespace(assigned=[("t", 0), ("t", 1)])  # type: ignore[assignment]
    sink.writable.set()
    assert worker._ready() == (True, "ok: 2 partition(s)")
    worker.stopping.set()
    assert worker._ready()[0] is False
    pdb = yaml.safe_load((K8S / "base" / "pdb.yaml").read_text())
    assert pdb["spec"]["maxUnavailable"] == 1
    readme = (K8S / "README.md").read_text()
    assert "## Readiness" in readme and "stays 200 while\nElasticsearch is down" in readme


# What `helm template istio-ingressgateway istio/gateway -n istio-system` renders, in
# the parts that matter here: Helm's ownership labels/annotations, the selector, the
# injection template and the chart's own pod annotations.
HELM_GATEWAY = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "istio-ingressgateway", "namespace": "istio-system",
                 "labels": {"app": "istio-ingressgateway", "istio": "ingressgateway",
                            "app.kubernetes.io/managed-by": "Helm",
                            "helm.sh/chart": "gateway-1.28.0"},
                 "annotations": {"meta.helm.sh/release-name": "istio-ingressgateway",
                                 "meta.helm.sh/release-namespace": "istio-system"}},
    "spec": {"selector": {"matchLabels": {"app": "istio-ingressgateway",
                                          "istio": "ingressgateway"}},
             "template": {"metadata": {
                 "annotations": {"inject.istio.io/templates": "gateway",
                                 "prometheus.io/port": "15020",
                                 "prometheus.io/scrape": "true"},
                 "labels": {"app": "istio-ingressgateway", "istio": "ingressgateway",
                            "sidecar.istio.io/inject": "true"}},
                 "spec": {"serviceAccountName": "istio-ingressgateway",
                          "containers": [{"name": "istio-proxy", "image": "auto"}]}}},
}


def test_gateway_topology_patches_the_owned_gateway(tools: dict[str, str],
                                                    tmp_path: Path) -> None:
    """The overlay creates no gateway Deployment (it would collide with the Helm-owned
    one); its patch, applied to the Helm-rendered gateway, adds only the ProxyConfig
    annotation and keeps everything the owner set; the Helm values say the same."""
    topo = _docs(_build(tools, "gateway-topology"))
    assert not [d["metadata"]["name"] for d in topo if d["kind"] == "Deployment"
                and d["metadata"].get("namespace") == "istio-system"]
    assert not any(d["kind"] == "Deployment" and d["metadata"]["name"] ==
                   "istio-ingressgateway" for d in topo)
    here = K8S / "overlays" / "gateway-topology"
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(HELM_GATEWAY))
    (tmp_path / "patch.yaml").write_text((here / "gateway-patch.yaml").read_text())
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["gateway.yaml"],
        "patches": [{"path": "patch.yaml", "target": {"kind": "Deployment",
                                                      "name": "istio-ingressgateway"}}]}))
    proc = subprocess.run([tools["kustomize"], "build", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (patched,) = _docs(proc.stdout)
    annotations = patched["spec"]["template"]["metadata"].pop("annotations")
    proxy_config = yaml.safe_load(annotations.pop("proxy.istio.io/config"))
    assert proxy_config["gatewayTopology"] == {"proxyProtocol": {}, "numTrustedProxies": 0}
    original = json.loads(json.dumps(HELM_GATEWAY))
    assert annotations == original["spec"]["template"]["metadata"].pop("annotations")
    assert patched == original  # selector, labels, Helm ownership, containers untouched
    values = yaml.safe_load((here / "gateway-values.yaml").read_text())
    patch = yaml.safe_load((here / "gateway-patch.yaml").read_text())
    assert values["podAnnotations"] == patch["spec"]["template"]["metadata"]["annotations"]
    assert set(patch["spec"]) == {"template"} and set(patch["spec"]["template"]) == {"metadata"}
    assert set(patch["spec"]["template"]["metadata"]) == {"annotations"}


def load_settings_from_text(text: str) -> Any:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"envoygeo-cm-{os.getpid()}.yaml"
    path.write_text(text)
    try:
        return load_settings(path)
    finally:
        path.unlink()


def test_config_rejects_a_misspelt_key() -> None:
    text = (K8S / "base" / "config.yaml").read_text()
    text = text.replace("check_interval_s", "check_intervall_s")
    with pytest.raises(ConfigError, match="geoip.check_intervall_s"):
        load_settings_from_text(text)


# -- Envoy: the listener filter and the access-log format ------------------------------

def _mesh_labels() -> dict[str, str]:
    mesh = yaml.safe_load((K8S / "istio" / "mesh-config.yaml").read_text())
    (provider,) = mesh["meshConfig"]["extensionProviders"]
    assert provider["envoyFileAccessLog"]["path"] == "/dev/stdout"
    labels: dict[str, str] = provider["envoyFileAccessLog"]["logFormat"]["labels"]
    return labels


def _envoy_bootstrap() -> dict[str, Any]:
    """Envoy config as Istio renders the gateway listener: the EnvoyFilter's filter
    inserted first, then tls_inspector; an HTTP connection manager logging JSON."""
    ef = yaml.safe_load((K8S / "istio" / "envoyfilter-proxy-protocol.yaml").read_text())
    (patch,) = ef["spec"]["configPatches"]
    assert (patch["applyTo"], patch["patch"]["operation"]) == ("LISTENER_FILTER",
                                                               "INSERT_FIRST")
    tls_inspector = {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3"
                 ".TlsInspector"}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gateway",
        # As Istio configures gateways (numTrustedProxies 0): the connection's address,
        # i.e. the PROXY header's client, is the remote address, not the XFF tail.
        "use_remote_address": True,
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3"
                     ".FileAccessLog",
            "path": "/dev/stdout",
            "log_format": {"json_format": _mesh_labels()}}}],
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {"static_resources": {"listeners": [{
        "name": "gateway_8080",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 18080}},
        "listener_filters": [patch["patch"]["value"], tls_inspector],
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }]}}


def test_envoy_validates_the_listener_filter_and_log_format(tmp_path: Path) -> None:
    bootstrap = _envoy_bootstrap()
    names = [f["name"] for f in bootstrap["static_resources"]["listeners"][0]
             ["listener_filters"]]
    assert names == ["envoy.filters.listener.proxy_protocol",
                     "envoy.filters.listener.tls_inspector"]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path),
                           "--log-level", "warn"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
    # The negative case: the removed pre-1.14 filter name is refused by Envoy 1.40.
    old = json.loads(json.dumps(bootstrap).replace(
        '"envoy.filters.listener.proxy_protocol"', '"envoy.listener.proxy_protocol"'))
    old["static_resources"]["listeners"][0]["listener_filters"][0].pop("typed_config")
    path.write_text(yaml.safe_dump(old))
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0


def test_access_log_format_is_what_envoygeo_parses() -> None:
    labels = _mesh_labels()
    for command in ("%DOWNSTREAM_REMOTE_ADDRESS%", "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%",
                    "%REQ(X-FORWARDED-FOR)%", "%START_TIME%", "%REQ(:METHOD)%",
                    "%RESPONSE_CODE%", "%BYTES_SENT%", "%DURATION%", "%REQ(USER-AGENT)%",
                    "%REQ(X-REQUEST-ID)%", "%REQ(:AUTHORITY)%", "%UPSTREAM_HOST%"):
        assert command in labels.values(), command
    aliases = default_json_aliases()
    for key, value in labels.items():
        (cmd,) = tokenize(value)
        assert isinstance(cmd, Command)
        spec = field_for_command(cmd.name, cmd.argument)
        assert spec is not None and aliases.get(key) == spec.name, (key, value)
    line = json.dumps({
        "start_time": "2026-11-29T02:00:00.123Z", "method": "GET", "path": "/x?y=1",
        "protocol": "HTTP/1.1", "response_code": "200", "response_flags": "-",
        "bytes_received": "0", "bytes_sent": "12", "duration": "3",
        "x_forwarded_for": "198.51.100.9", "user_agent": "curl/8", "request_id": "abc",
        "authority": "shop.example", "upstream_host": "10.1.2.3:8080",
        "downstream_remote_address": "203.0.113.7:51234",
        "downstream_direct_remote_address": "10.0.4.4:40000",
        "downstream_local_address": "10.0.9.9:8080"})
    parsed = JsonLogParser().parse(line)
    assert getattr(parsed, "downstream_remote_address", None) == "203.0.113.7:51234", parsed
    assert parsed.downstream_direct_remote_address == "10.0.4.4:40000"  # type: ignore[union-attr]
    assert parsed.response_code == 200  # type: ignore[union-attr]


def test_telemetry_uses_the_provider() -> None:
    tel = yaml.safe_load((K8S / "istio" / "telemetry-access-log.yaml").read_text())
    (provider,) = tel["spec"]["accessLogging"][0]["providers"]
    mesh = yaml.safe_load((K8S / "istio" / "mesh-config.yaml").read_text())
    assert provider["name"] == mesh["meshConfig"]["extensionProviders"][0]["name"]


# -- log shippers and image ------------------------------------------------------------

def test_fluent_bit_ships_what_envoygeo_reads() -> None:
    conf = yaml.safe_load((K8S / "fluent-bit" / "fluent-bit.yaml").read_text())
    (tail,) = conf["pipeline"]["inputs"]
    assert tail["path"] == "/var/log/containers/*istio-ingressgateway*_istio-proxy-*.log"
    assert tail["multiline.parser"] == "cri"
    assert [f["name"] for f in conf["pipeline"]["filters"]] == ["kubernetes", "record_modifier"]
    (out,) = conf["pipeline"]["outputs"]
    assert out["name"] == "kafka" and out["format"] == "json"
    assert out["timestamp_key"] == "@timestamp"
    assert [out["topics"]] == list(load_settings().kafka.topics)  # the default topic
    fluentd = (K8S / "fluentd" / "fluent.conf").read_text()
    assert "@type kafka2" in fluentd
    assert re.search(r"default_topic\s+envoy-access-logs", fluentd)
    assert "time_key @timestamp" in fluentd


def _size(text: str) -> int:
    """A Fluent Bit size (`64k`, `1M`, `32768`) in bytes."""
    m = re.fullmatch(r"(\d+)([kKmMgG]?)[bB]?", str(text))
    assert m is not None, text
    return int(m[1]) * 1024 ** " kmg".index(m[2].lower() or " ")


def test_fluent_bit_keeps_what_the_captures_showed_it_loses() -> None:
    """The facts of tests/data/fluent-bit-5.1.1: a physical line over buffer_max_size
    (default 32k) is dropped under skip_long_lines; iso8601 is cut to microseconds; a
    joined split line keeps the first chunk's `_p: "P"`."""
    conf = yaml.safe_load((K8S / "fluent-bit" / "fluent-bit.yaml").read_text())
    (tail,) = conf["pipeline"]["inputs"]
    limit = load_settings().limits.max_line_bytes
    if str(tail.get("skip_long_lines", "off")).lower() in ("on", "true"):
        # Every line the worker would index whole (and a margin for the CRI prefix) fits.
        assert _size(tail.get("buffer_max_size", "32k")) >= 2 * limit
    assert _size(tail.get("buffer_chunk_size", "32k")) <= _size(tail["buffer_max_size"])
    (out,) = conf["pipeline"]["outputs"]
    assert out.get("timestamp_format") == "iso8601_ns"
    modifier = next(f for f in conf["pipeline"]["filters"] if f["name"] == "record_modifier")
    assert modifier["remove_key"] == "_p" and modifier["match"] == tail["tag"]


def test_fluentd_keeps_what_a_split_line_needs() -> None:
    """Fluentd: nanosecond @timestamp; a line whose last chunk never comes is flushed to
    a label that ships it (an unlabelled concat timeout is an error event, lost); the
    P/F flag removed; no in_tail max_line_size below the worker's line limit."""
    fluentd = (K8S / "fluentd" / "fluent.conf").read_text()
    assert re.search(r"time_format %Y-%m-%dT%H:%M:%S\.%NZ", fluentd)
    timeout = re.search(r"timeout_label (@\w+)", fluentd)
    assert timeout is not None
    label = re.search(rf"<label {timeout[1]}>(.*?)</label>", fluentd, re.S)
    assert label is not None and "@type kafka2" in label[1]
    assert re.search(r"@type relabel\s+@label " + timeout[1], fluentd)
    assert re.search(r"remove_keys logtag", label[1])
    max_line = re.search(r"max_line_size (\d+)", fluentd)
    assert max_line is None or int(max_line[1]) >= load_settings().limits.max_line_bytes


def test_dockerfile_agrees_with_the_deployment(tools: dict[str, str]) -> None:
    """The image (deploy/Dockerfile, tested as an image by its own tests) runs as the
    user the pod's securityContext names and takes the Deployment's args as its CMD."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    pod = _find(_docs(_build(tools, "aws-elb")), "Deployment", "envoygeo")["spec"]["template"][
        "spec"]
    uid = pod["securityContext"]["runAsUser"]
    assert re.search(rf"^USER {uid}\b", text, re.M)
    assert 'ENTRYPOINT ["envoygeo"]' in text
    (worker,) = pod["containers"]
    assert f"CMD {json.dumps(worker['args'])}" in text
