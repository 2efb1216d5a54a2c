"""The worker's metrics follow Prometheus conventions, its logs say what an operator needs
and no more: counters end in _total and only grow, labels come from fixed sets, the
README lists what /metrics exports, the sink reports bytes/retries/item errors, the
Elasticsearch client's request lines are DEBUG, a pause is news only when it is."""

from __future__ import annotations

import io
import logging
import re
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import yaml
from elastic_transport import ConnectionError as TransportConnectionError
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from pipeline import worker as worker_mod
from pipeline.config import ElasticsearchSettings, load_settings
from pipeline.enricher import Enricher
from pipeline.logs import setup_logging
from pipeline.metrics import UNPARSED_REASON_LABELS, Metrics, unparsed_reason
from pipeline.sinks.elasticsearch import BulkItem, ElasticsearchSink
from pipeline.worker import Worker
from tests.unit.test_es_sink import ScriptedClient

ROOT = Path(__file__).resolve().parents[2]


def families(m: Metrics) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def samples(m: Metrics) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_counters_end_in_total_and_no_created_series() -> None:
    m = Metrics(native=True)
    text = m.render().decode()
    assert "_created" not in text
    counters = [f for f in text_string_to_metric_families(text) if f.type == "counter"]
    assert len(counters) >= 12
    for fam in counters:
        for s in fam.samples:
            assert s.name.endswith("_total"), s.name
    # The two that used to be gauges.
    kinds = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert kinds["envoygeo_geoip_cache_lookups"] == "counter"
    assert kinds["envoygeo_geoip_reload_failures"] == "counter"


def test_build_info_and_process_collectors() -> None:
    s = samples(Metrics(native=False))
    info = [k for k in s if k.startswith("envoygeo_build_info{")]
    assert len(info) == 1 and 'native="false"' in info[0] and 'version="0.1.0"' in info[0]
    assert s[info[0]] == 1
    assert "process_cpu_seconds_total" in s and "process_resident_memory_bytes" in s
    assert any(k.startswith("python_info{") for k in s)
    assert any(k.startswith("python_gc_collections_total{") for k in s)


@pytest.mark.parametrize(("enricher", "native"), [
    (SimpleNamespace(native_status="on"), "true"),
    (SimpleNamespace(native_status="off: ENVOYGEO_NATIVE=0"), "false"),
    (object(), "false"),  # an enricher that does not say: not the compiled core
])
def test_build_info_native_is_true_or_false(enricher: object, native: str) -> None:
    """The worker sets `native` from its enricher; the label is never anything else."""
    worker = Worker(load_settings(), enricher=enricher, sink=SimpleNamespace(  # type: ignore[arg-type]
        action_head=lambda index: b""), side=object())  # type: ignore[arg-type]
    info = [k for k in samples(worker.metrics) if k.startswith("envoygeo_build_info{")]
    assert len(info) == 1 and f'native="{native}"' in info[0], info


def test_catch_up_only_adds_growth() -> None:
    m = Metrics()
    m.catch_up(m.geoip_cache, 10, "hit")
    m.catch_up(m.geoip_cache, 10, "hit")  # nothing new
    m.catch_up(m.geoip_cache, 7, "hit")  # a smaller total (a rebuilt stage) never subtracts
    m.catch_up(m.geoip_cache, 25, "hit")
    m.catch_up(m.geoip_reload_failures, 2)
    s = samples(m)
    assert s['envoygeo_geoip_cache_lookups_total{result="hit"}'] == 25
    assert s['envoygeo_geoip_cache_lookups_total{result="miss"}'] == 0
    assert s["envoygeo_geoip_reload_failures_total"] == 2


def test_unparsed_reasons_of_real_failures_are_fixed_labels() -> None:
    """The reasons the parsers and the envelope decoder really give map to named labels
    (the label used to be the error's first 40 characters: unbounded)."""
    auto = Enricher.from_settings(load_settings())
    lines = [b"this is not an access log", b'{"not": "an access log"}', b"{broken json", b""]
    out, _ = auto.enrich_batch(lines)
    fixed = load_settings().model_copy(update={"parse": load_settings().parse.model_copy(
        update={"log_format": "istio"})})
    out_fixed, _ = Enricher.from_settings(fixed).enrich_batch([b"this is not an access log"])
    errors = [r.error for r in out + out_fixed]
    assert all(errors), out
    assert [unparsed_reason(e) for e in errors if e] == [
        "unknown_format", "not_an_access_log", "invalid_json", "empty_record",
        "format_mismatch"], errors
    assert unparsed_reason("something new") == "other"
    assert set(map(unparsed_reason, filter(None, errors))) <= set(UNPARSED_REASON_LABELS)


def test_fixed_label_series_exist_at_zero() -> None:
    s = samples(Metrics())
    for path in ("native", "python"):
        assert s[f'envoygeo_records_processed_total{{path="{path}"}}'] == 0
    for reason in UNPARSED_REASON_LABELS:
        assert s[f'envoygeo_records_unparsed_total{{reason="{reason}"}}'] == 0
    for stage in ("parse", "index"):
        assert s[f'envoygeo_records_dead_lettered_total{{stage="{stage}"}}'] == 0


def test_sink_reports_bytes_retries_and_item_errors() -> None:
    m = Metrics()
    # A 429 and a 400 item, the 429 resent; that request fails, and is sent again.
    client = ScriptedClient([{"id1": 429, "id2": 400},
                             TransportConnectionError("refused"), {}])
    sink = ElasticsearchSink(
        ElasticsearchSettings(retry_initial_backoff_ms=1, retry_max_backoff_ms=2),
        client=client, observer=m)  # type: ignore[arg-type]
    items = [BulkItem("idx", f"id{i}", b'{"a":%d}' % i, b"raw", f"t/0/{i}") for i in range(3)]
    rejected = sink.write(items)
    assert [r.status for r in rejected] == [400]
    assert client.calls == [["id0", "id1", "id2"], ["id1"], ["id1"]]
    s = samples(m)
    assert s['envoygeo_es_item_errors_total{status="429"}'] == 1
    assert s['envoygeo_es_item_errors_total{status="400"}'] == 1
    assert s["envoygeo_es_retries_total"] == 2
    assert s["envoygeo_es_item_retries_total"] == 2
    first = sum(len(b'{"index":{"_index":"idx","_id":"idX"}}\n{"a":0}\n') for _ in range(3))
    retry = len(b'{"index":{"_index":"idx","_id":"id1"}}\n{"a":1}\n')
    assert s["envoygeo_es_bytes_out_total"] == first + 2 * retry
    assert s['envoygeo_bulk_seconds_count{outcome="partial"}'] == 1
    assert s['envoygeo_bulk_seconds_count{outcome="error"}'] == 1
    assert s['envoygeo_bulk_seconds_count{outcome="ok"}'] == 1


def test_readme_lists_every_exported_metric() -> None:
    """The README's metrics table is the operator's reference: every envoygeo_* family
    the worker exports is in it with its labels, and it names nothing that is not."""
    m = Metrics(native=True)
    exported: dict[str, set[str]] = {}
    for metric in vars(m).values():
        if isinstance(metric, MetricWrapperBase) and metric._name.startswith("envoygeo_"):
            suffix = {"counter": "_total", "info": "_info"}.get(metric._type or "", "")
            exported[metric._name + suffix] = set(metric._labelnames)
    # An Info's labels are its keys, not label names.
    exported["envoygeo_build_info"] = {"version", "native", "python"}
    assert "envoygeo_build_info" in exported and len(exported) >= 20
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Metrics"):]
    section = section[:section.index("\n## ")]
    rows = re.findall(r"^\| `(envoygeo_\w+)(?:\{([^}]*)\})?` \|", section, re.M)
    listed = {name: set(filter(None, (x.strip() for x in (labels or "").split(","))))
              for name, labels in rows}
    assert listed == exported


def _stub_worker() -> Worker:
    sink = SimpleNamespace(writable=threading.Event(), last_error="",
                           action_head=lambda index: b"")
    sink.writable.set()
    worker = Worker(load_settings(), enricher=object(), sink=sink,  # type: ignore[arg-type]
                    side=object())  # type: ignore[arg-type]

    class Source:
        paused = False
        assigned: list[Any] = []

        def pause(self) -> None:
            self.paused = True

        def resume(self) -> None:
            self.paused = False

    worker.source = Source()  # type: ignore[assignment]
    return worker


def test_short_backpressure_pause_is_not_a_warning(caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    worker = _stub_worker()
    caplog.set_level(logging.DEBUG, logger="envoygeo.worker")
    clock = [1000.0]
    monkeypatch.setattr(worker_mod.time, "monotonic", lambda: clock[0])
    worker._pause()
    clock[0] += 0.3
    worker._pause()
    worker._resume()
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]
    assert worker.metrics.paused._value.get() == 0  # type: ignore[attr-defined]

    # A bulk request out for STALL_WARN_S: said once, and the resume is said too.
    caplog.clear()
    worker._pause()
    clock[0] += worker_mod.STALL_WARN_S + 1
    worker._pause()
    worker._pause()
    worker._resume()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        "paused fetching for 11s: the oldest batch is still being delivered"), warnings
    assert any(r.levelno == logging.INFO and "resumed fetching after 11.0s" in r.getMessage()
               for r in caplog.records)

    # Elasticsearch refusing writes: said at once, with its error.
    caplog.clear()
    worker.sink.writable.clear()
    worker.sink.last_error = "ConnectionError: refused"  # type: ignore[misc]
    worker._pause()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["paused fetching: Elasticsearch is not accepting writes "
                        "(ConnectionError: refused); resuming when it does"]


def test_progress_rate_is_over_the_last_interval(caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    worker = _stub_worker()
    caplog.set_level(logging.INFO, logger="envoygeo.worker")
    clock = [worker.progress.started]
    monkeypatch.setattr(worker_mod.time, "monotonic", lambda: clock[0])
    worker.progress.last_at = clock[0]
    clock[0] += 10
    worker.progress.records_in = 10000  # 1000/s for 10 s
    worker._log_progress()
    clock[0] += 10
    worker.progress.records_in += 100  # then 10/s: the line must show the drop
    worker._log_progress()
    worker._log_progress(final=True)
    lines = [r.getMessage() for r in caplog.records]
    assert "1000 rec/s over the last 10s" in lines[0]
    assert "10 rec/s over the last 10s" in lines[1]
    assert "505 rec/s average over 20s" in lines[2] and lines[2].startswith("summary: ")
    assert caplog.records[1].fields["records_per_s"] == 10.0  # type: ignore[attr-defined]


def test_elasticsearch_client_request_lines_are_debug() -> None:
    stream = io.StringIO()
    setup_logging("INFO")
    root = logging.getLogger()
    handler = root.handlers[0]
    handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        transport = logging.getLogger("elastic_transport.transport")
        transport.info("POST http://127.0.0.1:9200/_bulk [status:200 duration:0.010s]")
        transport.warning("node failed")
        assert [orjson.loads(line)["message"] for line in stream.getvalue().splitlines()] == [
            "node failed"]
        setup_logging("DEBUG")
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        transport.info("POST again")
        last = orjson.loads(stream.getvalue().splitlines()[-1])
        assert last["message"] == "POST again" and last["log.level"] == "debug"
    finally:
        setup_logging("INFO")


def exported_series(m: Metrics) -> set[str]:
    """Every series name /metrics can carry, labelled families without children included."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "info": ("_info",), "gauge": ("",)}
    names: set[str] = set()
    for fam in m.registry.collect():
        names.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
        names.update(s.name for s in fam.samples)
    return names


_PROMQL_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<sel>\{(?:"(?:[^"\\]|\\.)*"|[^}"])*\})'
    r"|(?P<range>\[[^\]]*\])"
    r"|(?P<num>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|(?P<id>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<op>.))")
_LABEL_LIST = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _LABEL_LIST | {"bool", "and", "or", "unless", "offset"}


def promql_selectors(expr: str) -> list[tuple[str, str]]:
    """Every metric a PromQL expression reads, with its `{...}` matchers ("" if none).

    A small tokenizer, not a regex on a name prefix: functions and aggregations are the
    identifiers followed by `(`, `by` or `without`; label names are inside `by (...)` and
    friends or inside the matchers; any other identifier (`up`, a typo) is a metric."""
    tokens = [(m.lastgroup, m.group(m.lastgroup or "")) for m in _PROMQL_TOKEN.finditer(expr)]
    out: list[tuple[str, str]] = []
    labels = False
    for i, (kind, text) in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if labels:
            labels = text != ")"
        elif kind == "id" and text in _LABEL_LIST:
            labels = nxt[1] == "("
        elif kind == "id" and text not in _KEYWORDS and nxt[1] not in ("(", "by", "without"):
            out.append((text, nxt[1] if nxt[0] == "sel" else ""))
    return out


def test_promql_selectors() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"$job", x="y}"}'
            '[$__rate_interval]))) / on (instance) group_left (v) b_info > bool 1e-9 or up')
    assert promql_selectors(expr) == [("a_bucket", '{job=~"$job", x="y}"}'),
                                      ("b_info", ""), ("up", "")]


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    path = ROOT / "dashboards" / "grafana" / "envoygeo-worker.json"
    dash = orjson.loads(path.read_bytes())
    assert dash["schemaVersion"] >= 36 and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    exported = exported_series(Metrics(native=True))
    used: set[str] = set()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b((?:envoygeo|process|python)_[a-z_]+)\b", target["expr"]))
            assert names, target["expr"]
            missing = names - exported
            assert not missing, f"{panel['title']}: {missing} not exported"
            used |= names
    # Parsed, not matched by prefix: every metric any query reads is exported, and each
    # one is scoped to the dashboard's `job` variable (a query without it would mix in
    # other jobs' series and ignore the selector the operator picked).
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids)), ids
    for panel in dash["panels"]:
        for target in panel["targets"]:
            selectors = promql_selectors(target["expr"])
            assert selectors, target["expr"]
            for name, matchers in selectors:
                assert name in exported, f"{panel['title']}: {name} is not exported"
                assert 'job=~"$job"' in matchers, f"{panel['title']}: {name}{matchers}"
    assert variables["job"]["query"] == "label_values(envoygeo_build_info, job)"
    # Every envoygeo family appears somewhere on the dashboard.
    families = {n for n in exported if n.startswith("envoygeo_")}
    by_family = {re.sub(r"_(total|bucket|sum|count|info)$", "", n) for n in families}
    shown = {re.sub(r"_(total|bucket|sum|count|info)$", "", n) for n in used}
    assert by_family - shown == set(), by_family - shown


def test_prometheus_rules_read_only_exported_metrics_of_the_worker_job() -> None:
    """deploy/kubernetes/base/prometheusrule.yaml: every expression parses into selectors,
    each an exported series (or `up`) scoped to the job the ServiceMonitor gives the
    worker (the metrics Service's name), and every alert says what to look at."""
    k8s = ROOT / "deploy" / "kubernetes" / "base"
    service = yaml.safe_load((k8s / "service-metrics.yaml").read_text())
    job = f'job="{service["metadata"]["name"]}"'
    rule = yaml.safe_load((k8s / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert "prometheusrule.yaml" in (k8s / "kustomization.yaml").read_text()
    exported = exported_series(Metrics(native=True)) | {"up"}
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(alerts) >= 8
    for r in alerts:
        selectors = promql_selectors(r["expr"])
        assert selectors, r["alert"]
        for name, matchers in selectors:
            assert name in exported, f"{r['alert']}: {name} is not exported"
            assert job in matchers, f"{r['alert']}: {name}{matchers} not scoped to {job}"
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
    names = {n for r in alerts for n, _ in promql_selectors(r["expr"])}
    for family in ("envoygeo_records_dead_lettered_total", "envoygeo_plugin_errors_total",
                   "envoygeo_consumer_lag", "envoygeo_paused"):
        assert family in names
