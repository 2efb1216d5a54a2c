from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.decode.access_log import FIELDS, AccessLog, LineError
from pipeline.decode.json_log import JsonKeysError, JsonLogParser, load_json_keys
from pipeline.decode.presets import ISTIO_JSON
from tests.unit.decode_samples import sample_lines

pytestmark = pytest.mark.unit

JSON_SAMPLES = [line for _, line in sample_lines() if line.startswith("{")]


@pytest.mark.parametrize("line", JSON_SAMPLES)
def test_istio_json_samples(line: str) -> None:
    log = JsonLogParser().parse(line)
    assert isinstance(log, AccessLog), log
    raw = json.loads(line)
    assert log.downstream_remote_address == raw["downstream_remote_address"]
    assert log.response_code == raw["response_code"]
    assert log.duration_ms == raw["duration"]
    assert log.upstream_service_time == int(raw["upstream_service_time"])
    assert log.start_time is not None
    assert log.extra == {}  # every Istio JSON key has a canonical field


def test_every_istio_json_key_is_a_default_alias() -> None:
    keys = {k.lower() for f in FIELDS for k in f.json_keys}
    assert set(ISTIO_JSON) <= keys


def test_envoy_json_format_typed_values_and_null() -> None:
    line = ('{"start_time":"2026-11-29T01:13:00.665Z","response_code":503,"bytes_sent":91,'
            '"duration":12,"user_agent":null,"route_name":null,"upstream_service_time":null,'
            '"x-forwarded-for":"1.2.3.4","grpc_status":null,"custom":{"a":1}}')
    log = JsonLogParser().parse(line)
    assert isinstance(log, AccessLog)
    assert (log.response_code, log.bytes_sent, log.duration_ms) == (503, 91, 12)
    assert log.user_agent is None and log.upstream_service_time is None
    assert log.x_forwarded_for == "1.2.3.4"
    assert log.extra == {"custom": {"a": 1}}


def test_custom_key_spellings() -> None:
    line = ('{"timestamp":1795914780.5,":authority":"example.com","user-agent":"ua/1",'
            '"x-request-id":"r1","Method":"PUT","status":"201","client_ip":"81.2.69.142"}')
    log = JsonLogParser().parse(line)
    assert isinstance(log, AccessLog)
    assert log.start_time == 1795914780.5 and log.authority == "example.com"
    assert log.user_agent == "ua/1" and log.request_id == "r1" and log.method == "PUT"
    assert log.response_code == 201 and log.downstream_remote_address == "81.2.69.142"


@pytest.mark.parametrize("spec", [
    '{"peer": "downstream_remote_address", "agent": "%REQ(USER-AGENT)%"}',
    "peer=downstream_remote_address, agent=user_agent",
])
def test_user_mapping_inline(spec: str) -> None:
    keys = load_json_keys(spec)
    log = JsonLogParser(keys).parse('{"peer":"[::1]:5","agent":"x","method":"GET"}')
    assert isinstance(log, AccessLog)
    assert log.downstream_remote_address == "[::1]:5" and log.user_agent == "x"


def test_user_mapping_from_json_format_file(tmp_path: Path) -> None:
    path = tmp_path / "fmt.json"
    path.write_text(json.dumps({"src": "%DOWNSTREAM_REMOTE_ADDRESS%",
                                "meta": "%DYNAMIC_METADATA(x:y)%"}))
    keys = load_json_keys(str(path))
    assert keys == {"src": "downstream_remote_address"}


@pytest.mark.parametrize("spec", ["a=nosuchfield", "{bad json", "a", '{"a": 1}', "a=%FOO%"])
def test_bad_user_mapping(spec: str) -> None:
    with pytest.raises((JsonKeysError, ValueError)):
        load_json_keys(spec)


@pytest.mark.parametrize("line", ["{", "[1,2]", "{}", '{"unrelated": 1}', "null"])
def test_not_an_access_log(line: str) -> None:
    assert isinstance(JsonLogParser().parse(line), LineError)


def test_nested_json_format_with_dotted_user_keys() -> None:
    keys = load_json_keys({"http": {"ua": "%REQ(USER-AGENT)%", "status": "%RESPONSE_CODE%"},
                           "peer": "%DOWNSTREAM_REMOTE_ADDRESS%"})
    assert keys == {"http.ua": "user_agent", "http.status": "response_code",
                    "peer": "downstream_remote_address"}
    line = ('{"http":{"ua":"curl/8","status":404},"peer":"81.2.69.142:1",'
            '"other":{"x":1}}')
    log = JsonLogParser(keys).parse(line)
    assert isinstance(log, AccessLog)
    assert (log.user_agent, log.response_code) == ("curl/8", 404)
    assert log.extra == {"other": {"x": 1}}
