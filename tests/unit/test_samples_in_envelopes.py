"""Every real sample line parses, bare and inside every envelope kind."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.clientip import ClientIpResolver
from pipeline.decode.parser import make_parser
from pipeline.process import RecordProcessor
from tests.unit.decode_samples import sample_lines

pytestmark = pytest.mark.unit

KUBE = {"pod_name": "gw-1", "namespace_name": "istio-system", "container_name": "istio-proxy"}

WRAPPERS: dict[str, Callable[[str], list[bytes]]] = {
    "bare": lambda line: [line.encode() + b"\n"],
    "fluent-bit": lambda line: [orjson.dumps({"@timestamp": 1795914780.665, "log": line,
                                              "stream": "stdout", "kubernetes": KUBE})],
    "fluent-bit-message": lambda line: [orjson.dumps(
        {"@timestamp": "2026-11-29T01:13:00.665Z", "message": line, "kubernetes": KUBE})],
    "fluentd": lambda line: [orjson.dumps({"message": line, "kubernetes": KUBE,
                                           "tag": "kube.istio-proxy"})],
    "docker": lambda line: [orjson.dumps({"log": line + "\n", "stream": "stdout",
                                          "time": "2026-11-29T01:13:00.665123456Z"})],
    "cri": lambda line: [f"2026-11-29T01:13:00.665123456Z stdout F {line}".encode()],
    "cri-partial": lambda line: [
        f"2026-11-29T01:13:00.665123456Z stdout P {line[:17]}".encode(),
        f"2026-11-29T01:13:00.665123456Z stdout P {line[17:40]}".encode(),
        f"2026-11-29T01:13:00.665123456Z stdout F {line[40:]}".encode()],
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_all_samples_in_envelope(wrapper: str) -> None:
    proc = RecordProcessor(make_parser("auto"), ClientIpResolver())
    docs = []
    lines = sample_lines()
    for _, line in lines:
        for record in WRAPPERS[wrapper](line):
            doc = proc.process(record)
            if doc is not None:
                docs.append(doc)
    docs.extend(proc.flush())
    assert proc.failed == 0, [d for d in docs if "error" in d]
    assert len(docs) == len(lines)
    for doc, (_, line) in zip(docs, lines, strict=True):
        assert doc["http"]["request"].get("id", "-") in line
        if "kubernetes" in wrapper or wrapper.startswith("fluent"):
            assert doc["kubernetes"] == KUBE
        if "downstream_remote_address" in doc["envoy"]:
            assert doc["source"]["ip"] in line


@given(st.lists(st.binary(max_size=200) | st.sampled_from(
    [line.encode() for _, line in sample_lines()]
    + [b"2026-11-29T01:13:00Z stdout P abc", b'{"log": "x"}', b"\xff"]), max_size=20))
@settings(max_examples=200, deadline=None)
def test_processor_never_raises_and_keeps_every_record(records: list[bytes]) -> None:
    proc = RecordProcessor(make_parser("auto"), ClientIpResolver())
    docs = [d for r in records if (d := proc.process(r)) is not None]
    docs.extend(proc.flush())
    for doc in docs:
        orjson.dumps(doc)  # every document serialises
    assert proc.parsed + proc.failed == len(docs)
