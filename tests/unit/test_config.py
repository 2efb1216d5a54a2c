"""Configuration: file + environment, errors that name the key, secrets masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_settings, masked


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "envoygeo.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    s = load_settings(None)
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.elasticsearch.hosts == ["http://127.0.0.1:9200"]
    assert s.parse.unparsed == "index"


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "kafka:\n  bootstrap_servers: file:9092\n  group_id: from-file\n")
    monkeypatch.setenv("ENVOYGEO_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    s = load_settings(path)
    assert s.kafka.bootstrap_servers == "env:9092"
    assert s.kafka.group_id == "from-file"  # the rest of the section still comes from the file


def test_errors_name_every_bad_key(tmp_path: Path) -> None:
    path = _write(tmp_path, """
kafka:
  batch_max_records: 0
  topic_pattern: "envoy-.*"
elasticsearch:
  hosts: [localhost:9200]
  bulk_max_dcos: 10
client_ip:
  trusted_proxies: [10.0.0.0/8, "not-a-cidr"]
""")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    text = str(err.value)
    assert "kafka.batch_max_records" in text
    assert "kafka.topic_pattern" in text and "'^'" in text
    assert "elasticsearch.hosts" in text and "http://" in text
    assert "elasticsearch.bulk_max_dcos: unknown key" in text
    assert "client_ip.trusted_proxies.1" in text and "not-a-cidr" in text


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(_write(tmp_path, "kafka: [unclosed\n"))


def test_secrets_are_masked(tmp_path: Path) -> None:
    path = _write(tmp_path, """
elasticsearch:
  username: elastic
  password: hunter2
  api_key: abc123
kafka:
  librdkafka:
    security.protocol: SASL_SSL
    sasl.password: s3cret
""")
    shown = masked(load_settings(path))
    assert shown["elasticsearch"]["password"] == "***"
    assert shown["elasticsearch"]["api_key"] == "***"
    assert shown["elasticsearch"]["username"] == "elastic"
    assert shown["kafka"]["librdkafka"]["sasl.password"] == "***"
    assert shown["kafka"]["librdkafka"]["security.protocol"] == "SASL_SSL"
    assert "hunter2" not in repr(shown) and "s3cret" not in repr(shown)


def test_passwords_inside_urls_are_masked(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis URL or an Elasticsearch host carrying credentials (often templated from a
    Secret with ${VAR}) is shown with the password masked, in check-config's output and
    in the error naming a bad value."""
    monkeypatch.setenv("REDIS_PW", "s3cr3tpw")
    path = _write(tmp_path, """
elasticsearch:
  hosts: [https://elastic:hunter2@es.example:9200]
rates:
  redis_url: redis://envoygeo:${REDIS_PW}@redis.example:6379/0
""")
    shown = masked(load_settings(path))
    assert shown["elasticsearch"]["hosts"] == ["https://elastic:***@es.example:9200"]
    assert shown["rates"]["redis_url"] == "redis://envoygeo:***@redis.example:6379/0"
    assert "hunter2" not in repr(shown) and "s3cr3tpw" not in repr(shown)
    bad = _write(tmp_path, "metrics:\n  port: http://u:hunter2@x:1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(bad)
    assert "metrics.port" in str(err.value) and "hunter2" not in str(err.value)


@pytest.mark.parametrize("servers", ["kafka:notaport", "not a url", "a:9092,,b:9092", "k:0"])
def test_bad_bootstrap_servers_are_named(servers: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"ENVOYGEO_KAFKA__BOOTSTRAP_SERVERS": servers})
    assert "kafka.bootstrap_servers (from ENVOYGEO_KAFKA__BOOTSTRAP_SERVERS): " in str(err.value)


@pytest.mark.parametrize("servers", ["127.0.0.1:9092", "a:9092, b:9093", "SASL_SSL://k:9093",
                                     "[::1]:9092", "kafka"])
def test_bootstrap_servers_forms_librdkafka_reads(servers: str) -> None:
    assert load_settings(None, {"ENVOYGEO_KAFKA__BOOTSTRAP_SERVERS": servers}
                         ).kafka.bootstrap_servers == servers


def test_a_bad_secret_is_not_echoed(tmp_path: Path) -> None:
    path = _write(tmp_path, "elasticsearch:\n  password: [hunter2]\n  bulk_max_docs: many\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, {})
    text = str(err.value)
    assert "elasticsearch.password" in text and "hunter2" not in text
    assert "elasticsearch.bulk_max_docs: Input should be a valid integer" in text
    assert "(got 'many')" in text
