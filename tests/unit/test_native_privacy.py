"""`privacy.client_ip` truncate and hash in the compiled core against the Python
reference: byte-identical documents under random prefixes, keys, policies, address
forms and X-Forwarded-For chains, and every comparison states how many records the
core wrote (`run_both(native=...)`), so it never compares Python with itself."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.bench.core import corpus
from pipeline.clientip import ClientIpPolicy, PrivacyPolicy
from pipeline.decode.envoy_format import compile_format
from pipeline.enrich.alerts import AlertRule
from pipeline.enrich.geoip import GeoIP
from tests.mmdb_fixtures import PLACES, write_asn, write_city
from tests.unit.test_native import _need_native, run_both  # noqa: F401 - autouse fixture
from tests.unit.test_native_clientip_geo import _TRUSTED, _address, _remote, _xff

pytestmark = pytest.mark.unit

KEY = b"0123456789abcdef-test-key"

# Every address field the core masks, plus an extra (custom header) that may be listed
# in privacy.extra_fields, and an upstream host that is never masked.
FORMAT = compile_format(
    "%DOWNSTREAM_REMOTE_ADDRESS%|%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%|%START_TIME%|"
    "%RESPONSE_CODE%|%UPSTREAM_HOST%|%REQ(X-REAL-IP)%|%REQ(X-FORWARDED-FOR)%\n")

_privacy = st.one_of(
    st.builds(lambda v4, v6, extra: PrivacyPolicy("truncate", v4, v6, None, extra),
              st.integers(0, 32), st.integers(0, 128),
              st.sampled_from([(), ("REQ(X-REAL-IP)",), ("req(x-real-ip)",)])),
    st.builds(lambda key, extra: PrivacyPolicy("hash", 24, 48, key, extra),
              st.binary(min_size=16, max_size=80),
              st.sampled_from([(), ("REQ(x-real-ip)",)])),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_remote, _address, _address, _xff, _xff), min_size=1, max_size=8),
       _privacy, st.lists(st.sampled_from(_TRUSTED), max_size=4, unique=True),
       st.integers(0, 3))
def test_masked_documents_identical(requests: list[tuple[str, str, str, str, str]],
                                    privacy: PrivacyPolicy, trusted: list[str],
                                    hops: int) -> None:
    records = [FORMAT.render({
        "DOWNSTREAM_REMOTE_ADDRESS": remote, "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": peer,
        "START_TIME": "2026-11-29T01:13:00.665Z", "RESPONSE_CODE": "200",
        "UPSTREAM_HOST": up, "REQ(X-REAL-IP)": real, "REQ(X-FORWARDED-FOR)": xff,
    }).encode() + b"\n" for remote, peer, up, real, xff in requests]
    docs, _, _ = run_both(records, batch=3, log_format=FORMAT.source, privacy=privacy,
                          policy=ClientIpPolicy(tuple(trusted), hops), native=len(records))
    for d in docs:
        doc = orjson.loads(d.document)
        assert "port" not in doc.get("source", {})
        if privacy.client_ip == "hash":
            assert "ip" not in doc.get("source", {})
            assert doc.get("source", True) != {}  # only GeoIP fills it: never `{}`
        event(f"{privacy.client_ip} source {'source' in doc} "
              f"related {len(doc.get('related', {}).get('ip', []))}")


@pytest.fixture(scope="module")
def geo(tmp_path_factory: pytest.TempPathFactory) -> GeoIP:
    d = tmp_path_factory.mktemp("mmdb")
    return GeoIP.open(city=write_city(d / "city.mmdb"), asn=write_asn(d / "asn.mmdb"),
                      cache_size=1000)


def _istio_line(client: str) -> bytes:
    return (f'[2026-11-29T01:13:00.665Z] "GET /a HTTP/1.1" 200 - via_upstream - "-" 0 20 3 '
            f'2 "-" "curl/8" "id-1" "shop.example.com" "10.0.7.2:8080" outbound|8080||shop '
            f"10.0.7.1:40000 10.0.0.5:8080 {client} - default\n").encode()


@pytest.mark.parametrize("privacy", [PrivacyPolicy("truncate", 8, 16),
                                     PrivacyPolicy("hash", hash_key=KEY)],
                         ids=["truncate", "hash"])
def test_geo_rates_alerts_identical_on_the_full_address(geo: GeoIP,
                                                        privacy: PrivacyPolicy) -> None:
    clients = [f"{ip}:1234" if ":" not in ip else f"[{ip}]:1234" for ip in PLACES]
    records = [_istio_line(c) for c in clients * 3 + ["10.1.2.3:5", "garbage"]]
    rule = AlertRule(name="burst", window_s=10, threshold=3)
    docs, alerts, e = run_both(records, batch=5, geo=geo, rules=[rule], privacy=privacy,
                               native=len(records))
    assert e.native_geo_status == "on"
    for d, client in zip(docs[:len(PLACES)], PLACES, strict=True):
        doc = orjson.loads(d.document)
        assert doc["source"]["geo"]["city_name"], client  # looked up on the full address
        assert client not in d.document.decode()
    # Counted per full address; the alerts carry it, for enforcement.
    assert sorted(a["source"]["ip"] for a in alerts) == sorted(PLACES)


@pytest.mark.parametrize("privacy", [PrivacyPolicy("truncate"),
                                     PrivacyPolicy("hash", hash_key=KEY)],
                         ids=["truncate", "hash"])
def test_bench_corpus_identical_and_native(privacy: PrivacyPolicy) -> None:
    records, ips = corpus(2000, 300)
    docs, _, e = run_both(records, batch=500, privacy=privacy,
                          policy=ClientIpPolicy(("10.0.0.0/8",)), native=2000)
    assert e._fast.handed_back == 0
    leaked = [ip for d, ip in zip(docs, ips, strict=True) if ip in d.document.decode()]
    # A truncated address may equal the full one only when its host bits were zero.
    assert all(ip.endswith(".0") for ip in leaked), leaked[:5]


def test_unparsed_lines_scrubbed_on_the_python_path(tmp_path: Path) -> None:
    """Unparsed lines are the Python path's in both enrichers: the core hands them back."""
    records = [_istio_line("198.51.100.9:1"), b"junk from 198.51.100.9 and [2001:db8::7]:1\n"]
    docs, _, e = run_both(records, privacy=PrivacyPolicy("truncate"), native=1)
    unparsed = orjson.loads(docs[1].document)
    assert unparsed["event"]["original"] == "junk from 198.51.100.0 and [2001:db8::]:1"
    assert "198.51.100.9" not in docs[0].document.decode()
