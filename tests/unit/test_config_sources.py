"""Where values come from: ${VAR} in the YAML, ENVOYGEO_* variables, lists as text.

Each test passes its own `environ`, so the machine's environment cannot leak in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, Settings, load_settings
from pipeline.config_sources import field_shape


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "envoygeo.yaml"
    path.write_text(text)
    return path


def _error(path: Path | None, environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ)
    return str(err.value)


# -- lists from the environment: JSON or commas, for every list-typed key --------------

def test_comma_separated_and_json_lists_from_environment() -> None:
    s = load_settings(None, {
        "ENVOYGEO_ELASTICSEARCH__HOSTS": "https://a:9200",
        "ENVOYGEO_KAFKA__TOPICS": "envoy-a, envoy-b",
        "ENVOYGEO_CLIENT_IP__TRUSTED_PROXIES": '["10.0.0.0/8", "192.168.0.0/16"]',
        "ENVOYGEO_RATES__WINDOWS": "60,10",
    })
    assert s.elasticsearch.hosts == ["https://a:9200"]
    assert s.kafka.topics == ["envoy-a", "envoy-b"]
    assert s.client_ip.trusted_proxies == ["10.0.0.0/8", "192.168.0.0/16"]
    assert s.rates.windows == (10, 60)


def test_every_list_key_accepts_commas(tmp_path: Path) -> None:
    """Generic, by field type: a list key added tomorrow takes commas too. (Plugin names
    must be installed plugins, and ip_lists needs its section: given in a file.)"""
    lists = []
    for section, field in Settings.model_fields.items():
        shape, model, _ = field_shape(field.annotation)
        assert shape == "model"
        for key, sub in model.model_fields.items():
            kind, item, _ = field_shape(sub.annotation)
            if kind == "list" and item in (str, int):
                lists.append((section, key, item))
    assert ("kafka", "topics", str) in lists and ("rates", "windows", int) in lists
    for section, key, item in lists:
        value = "10.0.0.0/8,10.1.0.0/16" if key == "trusted_proxies" else (
            "http://a:9200,http://b:9200" if key == "hosts" else "10,60" if item is int
            else "kubernetes,user_agent" if (section, key) == ("document", "omit")
            else "a,b")
        path = None
        if (section, key) == ("plugins", "enabled"):
            value = "user_agent,ip_lists"
            (tmp_path / "deny.txt").write_text("192.0.2.0/24\n")
            path = _write(tmp_path, f"plugins:\n  ip_lists:\n    lists:\n      deny: "
                                    f"[{tmp_path / 'deny.txt'}]\n")
        s = load_settings(path, {f"ENVOYGEO_{section}__{key}".upper(): value})
        got = getattr(getattr(s, section), key)
        assert len(got) == 2, (section, key, got)


def test_lists_from_yaml_text_and_empty_values(tmp_path: Path) -> None:
    path = _write(tmp_path, "kafka:\n  topics: a,b\nclient_ip:\n  trusted_proxies: ''\n")
    s = load_settings(path, {"ENVOYGEO_ELASTICSEARCH__CA_CERTS": ""})
    assert s.kafka.topics == ["a", "b"]
    assert s.client_ip.trusted_proxies == []
    assert s.elasticsearch.ca_certs is None  # an empty value unsets an optional key


def test_empty_section_and_single_number_list(tmp_path: Path) -> None:
    path = _write(tmp_path, "geoip:\n  # city: /var/lib/geoip/City.mmdb\nrates:\n  windows: 60\n")
    s = load_settings(path, {})
    assert s.geoip.city is None and s.rates.windows == (60,)


def test_bad_json_list_names_key_and_variable() -> None:
    text = _error(None, {"ENVOYGEO_KAFKA__TOPICS": '["a", '})
    assert "kafka.topics (from ENVOYGEO_KAFKA__TOPICS): expects a JSON list" in text
    text = _error(None, {"ENVOYGEO_ELASTICSEARCH__HOSTS": "https://a:9200,a:9200"})
    assert "elasticsearch.hosts (from ENVOYGEO_ELASTICSEARCH__HOSTS): 'a:9200' must start" \
        in text
    assert "Traceback" not in text and "pydantic" not in text


def test_mappings_and_sections_take_json_and_merge(tmp_path: Path) -> None:
    path = _write(tmp_path, "kafka:\n  group_id: g\n  librdkafka:\n    client.id: x\n")
    s = load_settings(path, {
        "ENVOYGEO_KAFKA__LIBRDKAFKA__SASL.PASSWORD": "pw",
        "ENVOYGEO_KAFKA__LIBRDKAFKA": '{"security.protocol": "SASL_SSL"}',
        "ENVOYGEO_METRICS": '{"port": 9999}',
    })
    assert s.kafka.librdkafka == {"client.id": "x", "security.protocol": "SASL_SSL",
                                  "sasl.password": "pw"}
    assert s.kafka.group_id == "g" and s.metrics.port == 9999
    assert "rates.alerts (from ENVOYGEO_RATES__ALERTS): expects a JSON list of objects" in _error(
        None, {"ENVOYGEO_RATES__ALERTS": "burst"})


# -- misspelt variables are errors, with the right name suggested ----------------------

def test_misspelt_section_key_and_single_underscore() -> None:
    text = _error(None, {
        "ENVOYGEO_ELASTICSERCH__HOSTS": "https://a:9200",
        "ENVOYGEO_KAFKA__TOPICZ": "a",
        "ENVOYGEO_KAFKA_GROUP_ID": "g",
        "ENVOYGEO_KAFKA__TOPICS__X": "a",
    })
    assert ("ENVOYGEO_ELASTICSERCH__HOSTS: the configuration has no section 'elasticserch' "
            "(did you mean ENVOYGEO_ELASTICSEARCH__HOSTS?)") in text
    assert "ENVOYGEO_KAFKA__TOPICZ: section kafka has no key 'topicz' " \
           "(did you mean ENVOYGEO_KAFKA__TOPICS?)" in text
    assert "ENVOYGEO_KAFKA_GROUP_ID: not a setting" in text
    assert "did you mean ENVOYGEO_KAFKA__GROUP_ID?" in text
    assert "ENVOYGEO_KAFKA__TOPICS__X: kafka.topics is a single value" in text


def test_other_envoygeo_variables_are_left_alone() -> None:
    s = load_settings(None, {"ENVOYGEO_CONFIG": "/x.yaml", "ENVOYGEO_NATIVE": "0",
                             "ENVOYGEO_TEST_KAFKA": "127.0.0.1:9092"})
    assert s.kafka.topics == ["envoy-access-logs"]


def test_kubernetes_service_links_are_not_settings() -> None:
    """deploy/kubernetes has a Service `envoygeo-metrics`; Kubernetes then sets these in
    every pod of the namespace. ENVOYGEO_METRICS_PORT must not read as metrics.port."""
    links = {"ENVOYGEO_METRICS_PORT": "tcp://10.96.0.7:9108",
             "ENVOYGEO_METRICS_PORT_9108_TCP": "tcp://10.96.0.7:9108",
             "ENVOYGEO_METRICS_PORT_9108_TCP_PORT": "9108",
             "ENVOYGEO_METRICS_SERVICE_HOST": "10.96.0.7",
             "ENVOYGEO_METRICS_SERVICE_PORT": "9108"}
    assert load_settings(None, links).metrics.port == 9108


def test_unknown_yaml_key_gets_a_suggestion(tmp_path: Path) -> None:
    text = _error(_write(tmp_path, "elasticsearch:\n  hots: [http://a:9200]\nkafak: {}\n"
                                   "rates:\n  alerts:\n    - {name: b, windw_s: 10, "
                                   "threshold: 5, window_s: 10}\n"), {})
    assert "elasticsearch.hots: unknown key (did you mean hosts?)" in text
    assert "kafak: unknown key (did you mean kafka?)" in text
    assert "rates.alerts.0.windw_s: unknown key (did you mean window_s?)" in text


# -- ${VAR} in the YAML ----------------------------------------------------------------

def test_variables_expand_with_defaults_and_escapes(tmp_path: Path) -> None:
    path = _write(tmp_path, """
kafka:
  bootstrap_servers: ${BROKERS}
  group_id: ${GROUP:-envoygeo-${NOT_EXPANDED}
  topics: ${TOPICS:-envoy-a,envoy-b}
  librdkafka:
    sasl.password: "pa$$word-${SECRET}"
elasticsearch:
  hosts: ["${ES_URL-http://fallback:9200}"]
  index: ${EMPTY:-logs}
  alerts_index: ${EMPTY-alerts}
metrics:
  port: ${PORT}
""")
    s = load_settings(path, {"BROKERS": "k0:9092,k1:9092", "SECRET": "s3", "PORT": "9200",
                             "EMPTY": ""})
    assert s.kafka.bootstrap_servers == "k0:9092,k1:9092"
    assert s.kafka.group_id == "envoygeo-${NOT_EXPANDED"  # defaults are literal text
    assert s.kafka.topics == ["envoy-a", "envoy-b"]
    assert s.kafka.librdkafka["sasl.password"] == "pa$word-s3"
    assert s.elasticsearch.hosts == ["http://fallback:9200"]
    assert s.elasticsearch.index == "logs"  # :- also replaces an empty value
    assert s.elasticsearch.alerts_index == ""  # - only an unset one
    assert s.metrics.port == 9200


def test_unset_variable_names_variable_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "metrics:\n  port: ${METRICS_PORT}\n"
                            "client_ip:\n  trusted_proxies: [10.0.0.0/8, '${LB_CIDR}']\n"
                            "parse:\n  log_format: 'cost $5 ${oops'\n")
    text = _error(path, {})
    assert "metrics.port: environment variable METRICS_PORT is not set" in text
    assert "client_ip.trusted_proxies.1: environment variable LB_CIDR is not set" in text
    assert "parse.log_format: '${' is not a ${VAR}" in text
    # One message per problem: no derived "not a valid integer" for the same key.
    assert text.count("metrics.port") == 1


def test_environment_still_wins_over_expanded_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "kafka:\n  group_id: ${GROUP:-from-file}\n")
    assert load_settings(path, {"ENVOYGEO_KAFKA__GROUP_ID": "env"}).kafka.group_id == "env"
    assert load_settings(path, {}).kafka.group_id == "from-file"
