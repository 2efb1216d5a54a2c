"""`privacy.client_ip`: the indexed document keeps a truncated or keyed-hash client
address, while GeoIP, rates and alerts use the full one (the Python reference path;
tests/unit/test_native_privacy.py holds the compiled core to it)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from click.testing import CliRunner

import pipeline.enricher as enricher_mod
from pipeline.cli import main
from pipeline.clientip import ClientIpPolicy, ClientIpResolver, PrivacyPolicy
from pipeline.config import ConfigError, load_settings
from pipeline.decode.parser import make_parser
from pipeline.enrich.alerts import AlertRule
from pipeline.enrich.geoip import GeoIP
from pipeline.enrich.rates import RatesConfig
from pipeline.enricher import Enricher
from pipeline.process import RecordProcessor
from tests.mmdb_fixtures import expected, write_asn, write_city
from tests.unit.test_schema import document_validator

pytestmark = pytest.mark.unit

KEY = b"k3y-for-tests-0123456789"
TS = "2026-11-29T01:13:00.665Z"


def istio(client: str, xff: str = "-", peer: str | None = None, ts: str = TS) -> bytes:
    """An Istio line; `peer` appended as DOWNSTREAM_DIRECT_REMOTE_ADDRESS needs a custom
    format, so it goes in via `custom` below instead."""
    return (f'[{ts}] "GET /a?b=1 HTTP/1.1" 200 - via_upstream - "-" 0 20 3 2 "{xff}" '
            f'"curl/8" "id-1" "shop.example.com" "10.0.7.2:8080" outbound|8080||shop '
            f"10.0.7.1:40000 10.0.0.5:8080 {client} - default\n").encode()


CUSTOM = ("[%START_TIME%] %RESPONSE_CODE% %DOWNSTREAM_REMOTE_ADDRESS% "
          "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS% \"%REQ(X-FORWARDED-FOR)%\" "
          "\"%REQ(X-REAL-IP)%\" %UPSTREAM_HOST%\n")


def custom(remote: str, direct: str, xff: str, real: str, up: str = "10.0.7.2:8080") -> bytes:
    return f'[{TS}] 200 {remote} {direct} "{xff}" "{real}" {up}\n'.encode()


@pytest.fixture(autouse=True)
def _pinned_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enricher_mod, "_ingested_now", lambda: "2026-11-29T05:00:00.000Z")


def enricher(privacy: PrivacyPolicy, *, log_format: str = "istio", geo: GeoIP | None = None,
             trusted: tuple[str, ...] = (), rules: tuple[AlertRule, ...] = ()) -> Enricher:
    resolver = ClientIpResolver(ClientIpPolicy(trusted, 2), privacy=privacy)
    return Enricher.build(RecordProcessor(make_parser(log_format), resolver), geo,
                          RatesConfig(windows=(10, 60), lateness_s=5), rules, native=False)


def docs_of(e: Enricher, records: list[bytes]) -> tuple[list[dict[str, Any]], list[Any]]:
    out, alerts = e.enrich_batch(records)
    return [orjson.loads(d.document) for d in out if d.document is not None], alerts


def hmac_hex(ip: str) -> str:
    return hmac.new(KEY, ip.encode(), hashlib.sha256).hexdigest()[:32]


# -- the mask --

@pytest.mark.parametrize(("ip", "v4", "v6", "shown"), [
    ("203.0.113.77", 24, 48, "203.0.113.0"),
    ("203.0.113.77", 16, 48, "203.0.0.0"),
    ("203.0.113.77", 32, 48, "203.0.113.77"),
    ("203.0.113.77", 0, 48, "0.0.0.0"),
    ("2001:db8:1234:5678::1", 24, 48, "2001:db8:1234::"),
    ("2001:db8:1234:5678::1", 24, 64, "2001:db8:1234:5678::"),
    ("2001:db8:1234:5678::1", 24, 0, "::"),
])
def test_truncate_zeroes_the_host_bits(ip: str, v4: int, v6: int, shown: str) -> None:
    mask = ClientIpResolver(privacy=PrivacyPolicy("truncate", v4, v6)).mask
    assert mask is not None and mask.ip(ip) == shown
    net = ipaddress.ip_network(f"{ip}/{v4 if '.' in ip else v6}", strict=False)
    assert ipaddress.ip_address(shown) == net.network_address


def test_hash_is_the_keyed_hmac_and_depends_on_the_key() -> None:
    mask = ClientIpResolver(privacy=PrivacyPolicy("hash", hash_key=KEY)).mask
    assert mask is not None and mask.hashed
    assert mask.ip("203.0.113.7") == hmac_hex("203.0.113.7")
    assert mask.ip("203.0.113.7") != hashlib.sha256(b"203.0.113.7").hexdigest()[:32]
    other = ClientIpResolver(privacy=PrivacyPolicy("hash", hash_key=KEY + b"x")).mask
    assert other is not None and other.ip("203.0.113.7") != mask.ip("203.0.113.7")


def test_policy_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="hash_key of at least 16"):
        PrivacyPolicy("hash", hash_key=b"short")
    with pytest.raises(ValueError, match="hash_key of at least 16"):
        PrivacyPolicy("hash")
    with pytest.raises(ValueError, match="truncate_ipv4_prefix"):
        PrivacyPolicy("truncate", 33)
    assert ClientIpResolver().mask is None  # keep: nothing is masked, nothing costs


def test_entries_fields_and_free_text() -> None:
    mask = ClientIpResolver(privacy=PrivacyPolicy("truncate")).mask
    assert mask is not None
    assert mask.entries("198.51.100.9, junk,[2001:db8:5:6::1]:443,::ffff:8.8.4.4") == (
        "198.51.100.0, -, 2001:db8:5::, 8.8.4.0")
    assert mask.entries("") == "" and mask.entries(None) is None
    assert mask.field("[2001:db8:5:6::1]:443") == "2001:db8:5::"
    assert mask.field("198.51.100.9:5555") == "198.51.100.0"
    assert mask.field("-") is None and mask.field("garbage") is None
    line = ('[2026-11-29T01:13:00.665Z] "GET / HTTP/1.1" 200 ip=198.51.100.9:443 '
            '[2001:db8:5:6::1]:80 ::ffff:8.8.4.4 x203.0.113.9 v1.2.3.4.5 01.2.3.4')
    assert mask.scrub(line) == (
        '[2026-11-29T01:13:00.665Z] "GET / HTTP/1.1" 200 ip=198.51.100.0:443 '
        '[2001:db8:5::]:80 8.8.4.0 x203.0.113.0 v1.2.3.4.5 01.2.3.4')


# -- documents --

def _strings(node: Any) -> list[str]:
    """Every string and key in a JSON value."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (k, *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


CLIENTS = ("198.51.100.9", "2001:db8:5:6::1", "203.0.113.250", "192.0.2.33")


def _leaks(doc: dict[str, Any]) -> list[str]:
    text = orjson.dumps(doc).decode()
    return [ip for ip in CLIENTS if ip in text]


def test_truncate_masks_every_client_field_and_keeps_upstream() -> None:
    e = enricher(PrivacyPolicy("truncate", extra_fields=("REQ(x-real-ip)",)),
                 log_format=CUSTOM, trusted=("192.0.2.0/24",))
    [doc], _ = docs_of(e, [custom("192.0.2.33:4444", "[2001:db8:5:6::1]:80",
                                  "198.51.100.9, 203.0.113.250", "198.51.100.9")])
    assert _leaks(doc) == []
    assert doc["source"] == {"ip": "203.0.113.0"}  # no port
    assert doc["envoygeo"]["ip_source"] == "x_forwarded_for"
    envoy = doc["envoy"]
    assert envoy["x_forwarded_for"] == "198.51.100.0, 203.0.113.0"
    assert envoy["downstream_remote_address"] == "192.0.2.0"
    assert envoy["downstream_direct_remote_address"] == "2001:db8:5::"
    assert envoy["extra"] == {"REQ(X-REAL-IP)": "198.51.100.0"}  # listed without case
    assert doc["related"]["ip"] == ["192.0.2.0", "2001:db8:5::", "198.51.100.0",
                                    "203.0.113.0", "10.0.7.2"]
    assert "client_id" not in doc["envoygeo"]
    assert list(document_validator().iter_errors(doc)) == []


def test_hash_leaves_no_address_and_a_client_id() -> None:
    e = enricher(PrivacyPolicy("hash", hash_key=KEY), log_format=CUSTOM)
    [doc], _ = docs_of(e, [custom("198.51.100.9:4444", "198.51.100.9:4444", "-",
                                  "203.0.113.250")])
    # Only the extras listed in extra_fields are masked: this one is not listed.
    assert _leaks(doc) == ["203.0.113.250"]
    assert doc["envoy"]["extra"] == {"REQ(X-REAL-IP)": "203.0.113.250"}
    assert "source" not in doc  # no GeoIP here: no empty object
    assert doc["envoygeo"]["client_id"] == hmac_hex("198.51.100.9")
    # The logged remote address was the client's: client_id says it, once.
    assert "downstream_remote_address" not in doc["envoy"]
    assert doc["related"] == {"ip": ["10.0.7.2"]}  # upstream only: a hash is no `ip`
    assert list(document_validator().iter_errors(doc)) == []  # schemas/ knows client_id


def test_geo_rates_and_alerts_use_the_full_address(tmp_path: Path) -> None:
    geo = GeoIP.open(city=write_city(tmp_path / "c.mmdb"), asn=write_asn(tmp_path / "a.mmdb"))
    # /8: 81.0.0.0 is outside the database's 81.2.69.0/24, so a filled source.geo can
    # only come from the full address.
    rule = AlertRule(name="burst", window_s=10, threshold=3)
    for privacy in (PrivacyPolicy("truncate", 8, 16), PrivacyPolicy("hash", hash_key=KEY)):
        e = enricher(privacy, geo=geo, rules=(rule,))
        records = [istio("81.2.69.160:1"), istio("81.2.69.161:1"), istio("81.2.69.160:2"),
                   istio("81.2.69.160:3")]
        docs, alerts = docs_of(e, records)
        want = expected("81.2.69.160")
        for d in docs:
            assert {k: d["source"][k] for k in want} == want
            assert "81.2.69.16" not in orjson.dumps(d).decode()
        # Counted per full address: .160 three times, .161 once (one /8, one /16).
        assert [d["envoygeo"]["rate"]["10s"] for d in docs] == [1, 1, 2, 3]
        # Alerts keep the address: enforcement blocks it.
        assert [a["source"]["ip"] for a in alerts] == ["81.2.69.160"]


def test_unparsed_lines_are_scrubbed() -> None:
    e = enricher(PrivacyPolicy("truncate"))
    out, _ = e.enrich_batch([b"not an access log from 198.51.100.9 or [2001:db8:5:6::1]:8\n"])
    [result] = out
    assert result.error is not None and result.document is not None
    doc = orjson.loads(result.document)
    assert doc["event"]["original"] == "not an access log from 198.51.100.0 or [2001:db8:5::]:8"
    assert _leaks(doc) == []


def test_keep_is_unchanged() -> None:
    e = enricher(PrivacyPolicy())
    [doc], _ = docs_of(e, [istio("198.51.100.9:4444")])
    assert doc["source"] == {"ip": "198.51.100.9", "port": 4444}
    assert "downstream_remote_address" not in doc["envoy"]  # it is source.ip:source.port


# -- configuration --

def test_config_validates_and_names_the_keys(tmp_path: Path) -> None:
    def problems(env: dict[str, str]) -> str:
        with pytest.raises(ConfigError) as exc:
            load_settings(None, env)
        return str(exc.value)

    assert "privacy: client_ip hash needs hash_key or hash_key_file" in problems(
        {"ENVOYGEO_PRIVACY__CLIENT_IP": "hash"})
    short = problems({"ENVOYGEO_PRIVACY__CLIENT_IP": "hash",
                      "ENVOYGEO_PRIVACY__HASH_KEY": "tooshort-secret"})
    assert "hash_key must be at least 16 bytes" in short and "tooshort-secret" not in short
    assert "only used with client_ip: hash" in problems({"ENVOYGEO_PRIVACY__HASH_KEY": "x" * 20})
    assert "privacy.truncate_ipv6_prefix" in problems(
        {"ENVOYGEO_PRIVACY__TRUNCATE_IPV6_PREFIX": "129"})
    assert "privacy.client_ip" in problems({"ENVOYGEO_PRIVACY__CLIENT_IP": "anonymise"})
    assert "privacy.hash_key_file (from ENVOYGEO_PRIVACY__HASH_KEY_FILE): cannot read" in problems(
        {"ENVOYGEO_PRIVACY__CLIENT_IP": "hash",
         "ENVOYGEO_PRIVACY__HASH_KEY_FILE": str(tmp_path / "missing")})
    key_file = tmp_path / "key"
    key_file.write_text(KEY.decode() + "\n")
    s = load_settings(None, {"ENVOYGEO_PRIVACY__CLIENT_IP": "hash",
                             "ENVOYGEO_PRIVACY__HASH_KEY_FILE": str(key_file)})
    assert s.privacy.policy().hash_key == KEY  # the trailing newline is not the key


def test_check_config_masks_the_key(tmp_path: Path) -> None:
    secret = "a-hash-key-nobody-may-see"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"privacy": {"client_ip": "hash", "hash_key": secret,
                                                  "truncate_ipv4_prefix": 16}}))
    result = CliRunner().invoke(main, ["check-config", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    shown = yaml.safe_load(result.output)["privacy"]
    assert shown["client_ip"] == "hash" and shown["hash_key"] == "***"
    assert shown["truncate_ipv4_prefix"] == 16


def test_worker_enricher_takes_the_section(tmp_path: Path) -> None:
    s = load_settings(None, {"ENVOYGEO_PRIVACY__CLIENT_IP": "truncate",
                             "ENVOYGEO_GEOIP__CITY": "", "ENVOYGEO_RATES__ENABLED": "false"})
    e = Enricher.from_settings(s)
    assert e.processor.resolver.mask is not None
    [doc], _ = docs_of(e, [istio("198.51.100.9:4444")])
    assert doc["source"]["ip"] == "198.51.100.0"


def test_enrich_command_takes_the_choice(tmp_path: Path) -> None:
    line = istio("198.51.100.9:4444", xff="203.0.113.250, 198.51.100.9")
    truncated = CliRunner().invoke(main, ["enrich", "--log-format", "istio", "--privacy",
                                          "truncate"], input=line)
    assert truncated.exit_code == 0, truncated.output
    doc = orjson.loads(truncated.stdout_bytes)
    assert doc["source"]["ip"] == "198.51.100.0" and _leaks(doc) == []
    key = tmp_path / "key"
    key.write_bytes(KEY + b"\n")
    hashed = CliRunner().invoke(main, ["enrich", "--log-format", "istio", "--privacy", "hash",
                                       "--hash-key-file", str(key)], input=line)
    assert hashed.exit_code == 0, hashed.output
    assert orjson.loads(hashed.stdout_bytes)["envoygeo"]["client_id"] == hmac_hex("198.51.100.9")
    no_key = CliRunner().invoke(main, ["enrich", "--privacy", "hash"], input=line)
    assert no_key.exit_code == 2
    assert "--hash-key-file of at least 16 bytes" in no_key.output


def test_dashboards_built_for_hash_group_on_the_pseudonym(tmp_path: Path) -> None:
    """Under hash the log index has no source.ip: the top-client panels, the map's
    tooltip and the Kibana rule read envoygeo.client_id, and validate accepts them."""
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"privacy": {"client_ip": "hash",
                                                  "hash_key_file": str(key_file)}}))
    out = tmp_path / "dash"
    built = CliRunner().invoke(main, ["dashboards", "build", "-c", str(config), "--out",
                                      str(out)])
    assert built.exit_code == 0, built.output
    files = sorted(p for p in out.rglob("*") if p.suffix in (".ndjson", ".json")
                   and "grafana" not in p.parts)
    assert files
    checked = CliRunner().invoke(main, ["dashboards", "validate", "-c", str(config),
                                        *map(str, files)])
    assert checked.exit_code == 0, checked.output
    kibana_objects = (out / "kibana" / "envoygeo.ndjson").read_text()
    rule = (out / "kibana" / "rules" / "per-ip-rate.json").read_text()
    osd = (out / "opensearch-dashboards" / "envoygeo.ndjson").read_text()
    for text in (kibana_objects, rule, osd):
        assert "envoygeo.client_id" in text
    assert json.loads(rule)["rule"]["params"]["termField"] == "envoygeo.client_id"
    # The alerts index keeps source.ip (full addresses): its views still read it.
    assert "source.ip" in kibana_objects and "source.ip" in osd
