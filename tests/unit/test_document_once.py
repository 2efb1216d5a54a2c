"""Documents as small as their meaning (issue 15): no value under two names, no empty
objects, on both paths (the compiled core must write every one of these records).

Each case says why the logged field is kept or left out: it is left out only when
`source`/`destination`/`http.version` already hold exactly what the line said.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pipeline.clientip import ClientIpPolicy
from pipeline.decode.envoy_format import compile_format
from pipeline.document import renders_endpoint
from tests.unit.test_native import _need_native, run_both  # noqa: F401 - autouse fixture

FORMAT = compile_format(
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    '%RESPONSE_CODE% %BYTES_SENT% "%REQ(X-FORWARDED-FOR)%" '
    '%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS%\n')


def line(protocol: str, remote: str, local: str, xff: str = "-", method: str = "GET",
         status: str = "200", sent: str = "5") -> bytes:
    return (f'[2026-11-29T01:13:00.665Z] "{method} /x {protocol}" {status} {sent} "{xff}" '
            f"{remote} {local}\n").encode()


def docs(records: list[bytes], **kw: Any) -> list[dict[str, Any]]:
    out, _, _ = run_both(records, log_format=FORMAT.source, native=len(records), **kw)
    return [orjson.loads(d.document) for d in out]


@pytest.mark.parametrize(("text", "host", "port", "same"), [
    ("81.2.69.142:5321", "81.2.69.142", 5321, True),
    ("81.2.69.142", "81.2.69.142", None, True),
    ("[2001:db8::1]:443", "2001:db8::1", 443, True),
    ("2001:db8::1", "2001:db8::1", None, True),
    ("[::ffff:81.2.69.142]:5", "81.2.69.142", 5, False),  # the mapped form says more
    ("81.2.69.142:05", "81.2.69.142", 5, False),  # a port written otherwise is kept
    ("81.2.69.142:5", "81.2.69.143", 5, False),
    ("81.2.69.142:5", "81.2.69.142", None, False),
    ("[2001:db8::1]443", "2001:db8::1", 443, False),
])
def test_renders_endpoint(text: str, host: str, port: int | None, same: bool) -> None:
    assert renders_endpoint(text, host, port) is same


def test_peer_client_is_written_once() -> None:
    [v4, v6] = docs([line("HTTP/1.1", "81.2.69.142:5321", "10.0.0.2:8443"),
                     line("HTTP/2", "[2001:db8::1]:443", "[2001:db8::2]:8443")])
    assert v4["source"] == {"ip": "81.2.69.142", "port": 5321}
    assert v4["destination"] == {"ip": "10.0.0.2", "port": 8443}
    assert v4["http"]["version"] == "1.1" and v6["http"]["version"] == "2"
    for d in (v4, v6):
        for name in ("downstream_remote_address", "downstream_local_address", "protocol"):
            assert name not in d["envoy"], name
        assert "address" not in d["source"]
    assert v6["source"] == {"ip": "2001:db8::1", "port": 443}


def test_what_says_more_is_kept() -> None:
    trusted = ClientIpPolicy(("10.0.0.0/8",), 1)
    xff, mapped, tcp = docs([
        line("HTTP/1.1", "10.1.2.3:40000", "10.0.0.2:8443", xff="81.2.69.142"),
        line("HTTP/1.1", "[::ffff:81.2.69.142]:5", "[::ffff:10.0.0.2]:8443"),
        line("-", "81.2.69.142:5", "10.0.0.2:8443", method="-", status="0", sent="-"),
    ], policy=trusted)
    # The client came from X-Forwarded-For: the peer address is other information.
    assert xff["source"]["ip"] == "81.2.69.142"
    assert xff["envoy"]["downstream_remote_address"] == "10.1.2.3:40000"
    # IPv4-mapped: source/destination hold the IPv4 form; the logged form stays.
    assert mapped["source"] == {"ip": "81.2.69.142", "port": 5}
    assert mapped["envoy"]["downstream_remote_address"] == "[::ffff:81.2.69.142]:5"
    assert mapped["envoy"]["downstream_local_address"] == "[::ffff:10.0.0.2]:8443"
    # A TCP proxy line: no request/response, so no `http` at all (no empty objects).
    assert "http" not in tcp
    assert tcp["source"] == {"ip": "81.2.69.142", "port": 5}


def test_no_empty_objects_anywhere() -> None:
    records = [line(p, r, loc, method=m, status=s, sent=b)
               for p in ("HTTP/1.1", "-") for r in ("81.2.69.142:1", "-")
               for loc in ("10.0.0.2:1", "-") for m, s, b in (("GET", "200", "5"),
                                                              ("-", "0", "-"))]

    def empties(value: Any, path: str = "") -> list[str]:
        if isinstance(value, dict):
            found = [path] if not value else []
            for k, v in value.items():
                found += empties(v, f"{path}.{k}")
            return found
        return []

    out = docs(records)
    assert len(out) == len(records) == 16
    assert [p for d in out for p in empties(d)] == []
    assert any("http" not in d for d in out) and any("source" not in d for d in out)
