from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.decode.access_log import AccessLog, LineError
from pipeline.decode.envoy_format import FormatError, compile_format, tokenize
from pipeline.decode.parser import AutoParser, make_parser
from pipeline.decode.presets import ENVOY_DEFAULT, ISTIO_DEFAULT, ISTIO_LEGACY, TEXT_PRESETS
from tests.unit.decode_samples import sample_lines

pytestmark = pytest.mark.unit

TEXT_SAMPLES = [line for _, line in sample_lines() if not line.startswith("{")]


def parse(fmt: str, line: str) -> AccessLog:
    result = compile_format(fmt).parse(line)
    assert isinstance(result, AccessLog), result
    return result


# --- presets on real lines ---------------------------------------------------------


def test_envoy_preset_on_docs_line() -> None:
    line = ('[2016-04-15T20:17:00.310Z] "POST /api/v1/locations HTTP/2" 204 - 154 0 226 100 '
            '"10.0.35.28" "nsq2http" "cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2" "locations" '
            '"tcp://10.0.2.1:80"')
    log = parse(ENVOY_DEFAULT, line)
    assert log.start_time == pytest.approx(1460751420.310)
    assert (log.method, log.path, log.protocol) == ("POST", "/api/v1/locations", "HTTP/2")
    assert (log.response_code, log.response_flags) == (204, None)
    assert (log.bytes_received, log.bytes_sent, log.duration_ms) == (154, 0, 226)
    assert log.upstream_service_time == 100
    assert log.x_forwarded_for == "10.0.35.28" and log.user_agent == "nsq2http"
    assert log.authority == "locations" and log.upstream_host == "tcp://10.0.2.1:80"


def test_istio_preset_on_envoy_140_line() -> None:
    line = next(x for x in TEXT_SAMPLES if "setsrc6" in x and "via_upstream" in x)
    log = parse(ISTIO_DEFAULT, line)
    assert log.downstream_remote_address == "[2001:4860:4860::8888]:36400"
    assert log.downstream_local_address == "[::ffff:127.0.0.1]:18002"
    assert log.response_code_details == "via_upstream"
    assert log.upstream_cluster == "upstream"
    assert log.upstream_local_address == "127.0.0.1:59746"


def test_istio_tcp_line() -> None:
    line = next(x for x in TEXT_SAMPLES if '"- - -"' in x)
    log = parse(ISTIO_DEFAULT, line)
    assert log.method is None and log.response_code == 0
    assert (log.bytes_received, log.bytes_sent) == (33, 206)
    assert log.downstream_remote_address == "175.16.199.5:40002"


def test_istio_legacy_with_mixer_status() -> None:
    line = ('[2020-03-01T10:00:00.000Z] "GET /productpage HTTP/1.1" 200 - "-" "-" 0 5183 32 31 '
            '"81.2.69.142" "Mozilla/5.0 (X11; Linux x86_64)" "a1b2" "bookinfo.example" '
            '"10.1.2.3:9080" outbound|9080||productpage.default.svc.cluster.local '
            "10.1.0.5:41234 10.1.0.5:8080 81.2.69.142:5321 - -")
    log = parse(ISTIO_LEGACY, line)
    assert log.user_agent == "Mozilla/5.0 (X11; Linux x86_64)"
    assert log.downstream_remote_address == "81.2.69.142:5321"
    assert "DYNAMIC_METADATA(istio.mixer:status)" not in log.extra  # "-" is absent
    line2 = line.replace('200 - "-"', '200 - "UNAVAILABLE:no healthy upstream"')
    log2 = parse(ISTIO_LEGACY, line2)
    assert log2.extra["DYNAMIC_METADATA(istio.mixer:status)"] == "UNAVAILABLE:no healthy upstream"


@pytest.mark.parametrize("line", TEXT_SAMPLES)
def test_every_text_sample_parses_with_auto(line: str) -> None:
    result = AutoParser().parse(line)
    assert isinstance(result, AccessLog), result
    assert result.log_format in TEXT_PRESETS


def test_auto_prefers_last_winner_and_reports_failure() -> None:
    p = make_parser("auto")
    assert isinstance(p.parse(TEXT_SAMPLES[0]), AccessLog)
    bad = p.parse("hello world")
    assert isinstance(bad, LineError) and "no known format" in bad.reason


# --- operators -----------------------------------------------------------------------


def test_quoted_values_with_spaces_and_quotes() -> None:
    fmt = '"%REQ(USER-AGENT)%" "%REQ(X-CUSTOM)%" %RESPONSE_CODE%'
    log = parse(fmt, '"Mozilla/5.0 (say \\"hi\\") x" "abc def" 200')
    assert log.user_agent == 'Mozilla/5.0 (say \\"hi\\") x'
    assert log.extra["REQ(X-CUSTOM)"] == "abc def" and log.response_code == 200
    # Envoy writes quotes raw; the literal that follows still delimits the field.
    log2 = parse(fmt, '"a "quoted" agent" "id" 404')
    assert log2.user_agent == 'a "quoted" agent' and log2.response_code == 404


def test_header_synonyms_case_and_max_length() -> None:
    fmt = ("%REQUEST_HEADER(user-agent):10% %RESPONSE_HEADER(X-Envoy-Upstream-Service-Time)% "
           "%TRAILER(grpc-status)% %RESPONSE_TRAILER(x-t)% %RESP(content-type)%")
    log = parse(fmt, "curl/8.4.0 12 0 - text/plain")
    assert log.user_agent == "curl/8.4.0" and log.upstream_service_time == 12
    assert log.extra == {"TRAILER(grpc-status)": "0", "RESP(content-type)": "text/plain"}


def test_alternative_header_path() -> None:
    log = parse("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %REQ(:AUTHORITY)%", "/a?b=1 example.com")
    assert log.path == "/a?b=1" and log.authority == "example.com"


def test_addresses_with_and_without_port() -> None:
    fmt = ("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% "
           "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_PORT%")
    log = parse(fmt, "[2001:db8::1]:443 2001:db8::1 10.0.0.1:5555 10.0.0.2:8443 8443")
    assert log.downstream_remote_address == "[2001:db8::1]:443"
    assert log.downstream_direct_remote_address == "10.0.0.1:5555"
    assert log.downstream_local_address == "10.0.0.2:8443"
    assert log.extra["DOWNSTREAM_LOCAL_PORT"] == 8443


def test_numeric_operators_and_absent_values() -> None:
    fmt = ("%BYTES_RECEIVED% %BYTES_SENT% %DURATION% %REQUEST_DURATION% %RESPONSE_CODE% "
           "%UPSTREAM_REQUEST_ATTEMPT_COUNT% %ROUTE_NAME%")
    log = parse(fmt, "10 20 30 - 503 2 -")
    assert (log.bytes_received, log.bytes_sent, log.duration_ms, log.response_code) == (
        10, 20, 30, 503)
    assert "REQUEST_DURATION" not in log.extra
    assert log.extra["UPSTREAM_REQUEST_ATTEMPT_COUNT"] == 2 and log.route_name is None
    assert isinstance(compile_format(fmt).parse("x 20 30 - 503 2 -"), LineError)


def test_dynamic_metadata_goes_to_extra() -> None:
    log = parse("%DYNAMIC_METADATA(envoy.lb:canary)% %FILTER_STATE(a.b):5%", "true 12345")
    assert log.extra == {"DYNAMIC_METADATA(envoy.lb:canary)": "true",
                         "FILTER_STATE(a.b)": "12345"}


@pytest.mark.parametrize(("fmt", "value", "expected"), [
    ("%START_TIME%", "2026-11-29T01:13:00.665Z", 1795914780.665),
    ("%START_TIME%", "2026-11-29T01:13:00Z", 1795914780.0),
    ("%START_TIME(%s)%", "1795914780", 1795914780.0),
    ("%START_TIME(%Y/%m/%d %H:%M:%S)%", "2026/11/29 01:13:00", 1795914780.0),
    ("%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%", "2026-11-29T01:13:00.665Z", 1795914780.665),
    ("%START_TIME(%d/%b/%Y:%H:%M:%S %z)%", "29/Nov/2026:02:13:00 +0100", 1795914780.0),
    ("%START_TIME(%Y-%m-%dT%H:%M:%E3SZ)%", "2026-11-29T01:13:00.665Z", 1795914780.665),
])
def test_start_time_variants(fmt: str, value: str, expected: float) -> None:
    assert parse(fmt + " %PROTOCOL%", value + " HTTP/1.1").start_time == pytest.approx(expected)


def test_format_trailing_newline_is_ignored() -> None:
    assert parse("%PROTOCOL%\n", "HTTP/2\n").protocol == "HTTP/2"
    assert parse("%PROTOCOL%\\n", "HTTP/2").protocol == "HTTP/2"


# --- rejected formats ----------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "position", "words"), [
    ("%FOO%", 0, "unknown command"),
    ("x %REQ(:PATH)% %BOGUS_THING%", 15, "unknown command"),
    ("[%START_TIME%] %RESPONSE_CODE", 15, "unterminated"),
    ("%REQ(:PATH):abc%", 0, "max length"),
    ("%REQ%", 0, "needs an argument"),
    ("%RESPONSE_CODE(x)%", 0, "takes no argument"),
    ("%RESPONSE_CODE%:5", -1, None),  # literal ':5' after a command is fine
    ("%BYTES_SENT:5%", 0, "max length"),
    ("%REQ(A?B?C)%", 0, "more than one alternative"),
    ("%REQ(:PATH%", 0, "unterminated '('"),
    ("%req(:path)%", 0, "command name"),
    ("", 0, "empty"),
])
def test_bad_formats_rejected_with_position(fmt: str, position: int, words: str | None) -> None:
    if words is None:
        compile_format(fmt)
        return
    with pytest.raises(FormatError) as e:
        compile_format(fmt)
    assert e.value.position == position
    assert words in str(e.value) and f"position {position}" in str(e.value)


def test_tokenize_keeps_literals() -> None:
    segs = tokenize('a "%REQ(X)%" b')
    assert segs[0] == 'a "' and segs[2] == '" b'


# --- properties ----------------------------------------------------------------------

# Commands with a value generator each; generated values avoid what the literal
# separators use, which is what Envoy guarantees for these fields in practice.
_word = st.text(alphabet=string.ascii_letters + string.digits + "._/-:", min_size=1,
                max_size=12).filter(lambda s: s != "-")
_COMMANDS = {
    "%RESPONSE_CODE%": st.integers(100, 599).map(str),
    "%BYTES_SENT%": st.integers(0, 10**9).map(str),
    "%DURATION%": st.integers(0, 10**6).map(str),
    "%PROTOCOL%": st.sampled_from(["HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/3"]),
    "%UPSTREAM_CLUSTER%": _word,
    "%DOWNSTREAM_REMOTE_ADDRESS%": st.ip_addresses(v=4).map(lambda a: f"{a}:1234"),
    # Free text with spaces is only unambiguous between delimiters, as Envoy's own
    # formats quote it.
    '"%REQ(USER-AGENT)%"': st.text(alphabet=string.ascii_letters + " ()/;.", min_size=1,
                                 max_size=20).filter(lambda s: s.strip() == s and s != "-"),
    "%REQ(X-REQUEST-ID)%": st.uuids().map(str),
    "%REQ(:AUTHORITY)%": _word,
    "%START_TIME%": st.integers(0, 4 * 10**12).map(
        lambda ms: __import__("datetime").datetime.fromtimestamp(
            ms / 1000, __import__("datetime").UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        + f"{ms % 1000:03d}Z"),
}
_SEPARATORS = st.sampled_from([" ", " | ", '" "', "] [", ", ", "\t", " -- "])


@st.composite
def format_and_values(draw: st.DrawFn) -> tuple[str, dict[str, str]]:
    cmds = draw(st.lists(st.sampled_from(sorted(_COMMANDS)), min_size=1, max_size=8,
                         unique=True))
    parts, values = [], {}
    for i, c in enumerate(cmds):
        if i:
            parts.append(draw(_SEPARATORS))
        parts.append(c)
        values[c] = draw(_COMMANDS[c])
    quote = draw(st.booleans())
    fmt = "".join(parts)
    return (f'"{fmt}"' if quote else fmt), values


@given(format_and_values())
@settings(max_examples=400, deadline=None)
def test_round_trip_generated_formats(fv: tuple[str, dict[str, str]]) -> None:
    fmt, values = fv
    compiled = compile_format(fmt)
    by_key = {k.strip('"'): v for k, v in values.items()}
    rendered = compiled.render({c.key: by_key[f"%{c.key}%"] for c in compiled.commands()})
    log = compiled.parse(rendered)
    assert isinstance(log, AccessLog), (fmt, rendered, log)
    expect = {
        "%RESPONSE_CODE%": ("response_code", int),
        "%BYTES_SENT%": ("bytes_sent", int),
        "%DURATION%": ("duration_ms", int),
        "%PROTOCOL%": ("protocol", str),
        "%UPSTREAM_CLUSTER%": ("upstream_cluster", str),
        "%DOWNSTREAM_REMOTE_ADDRESS%": ("downstream_remote_address", str),
        '"%REQ(USER-AGENT)%"': ("user_agent", str),
        "%REQ(X-REQUEST-ID)%": ("request_id", str),
        "%REQ(:AUTHORITY)%": ("authority", str),
    }
    for cmd, raw in values.items():
        if cmd == "%START_TIME%":
            assert log.start_time is not None
            assert abs(log.start_time - compile_format("%START_TIME%").parse(raw).start_time
                       ) < 1e-6  # type: ignore[union-attr]
            continue
        attr, typ = expect[cmd]
        assert getattr(log, attr) == typ(raw), (fmt, rendered, cmd)


_PARSERS = [make_parser(n) for n in ("auto", "envoy", "istio", "istio-legacy", "json")]
_MUTATIONS = st.sampled_from(["delete", "insert", "replace", "truncate", "dup"])


@given(st.sampled_from(TEXT_SAMPLES + [line for _, line in sample_lines()
                                        if line.startswith("{")]),
       st.lists(st.tuples(_MUTATIONS, st.integers(0, 10**4), st.characters()), max_size=5))
@settings(max_examples=400, deadline=None)
def test_mutated_real_lines_never_raise(line: str, edits: list[tuple[str, int, str]]) -> None:
    for op, pos, ch in edits:
        i = pos % (len(line) + 1)
        if op == "delete":
            line = line[:i] + line[i + 1:]
        elif op == "insert":
            line = line[:i] + ch + line[i:]
        elif op == "replace":
            line = line[:i] + ch + line[i + 1:]
        elif op == "truncate":
            line = line[:i]
        else:
            line = line[:i] + line[i:] + line[i:]
    for parser in _PARSERS:
        result = parser.parse(line)
        assert isinstance(result, AccessLog | LineError)


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_arbitrary_text_never_raises(text: str) -> None:
    result = make_parser("auto").parse(text)
    assert isinstance(result, AccessLog | LineError)


@pytest.mark.parametrize("junk", [
    '[2026-11-29T01:13:00.665Z] "GET / HTTP/1.1" 200 - ' + "a " * 8000,
    '[2026-11-29T01:13:00.665Z] "GET / HTTP/1.1" 200 - ' + '"a" ' * 2000,
    '[2026-11-29T01:13:00.665Z] "GET / HTTP/1.1" 200 - ' + '" " ' * 6 + "a " * 6000,
])
def test_adversarial_lines_fail_without_backtracking_blowup(junk: str) -> None:
    # Used to take seconds per line (polynomial backtracking); now a few milliseconds.
    assert isinstance(make_parser("auto").parse(junk), LineError)


def test_format_error_points_at_the_command() -> None:
    with pytest.raises(FormatError) as e:
        compile_format('[%START_TIME%] "%REQ(:METHOD)%" %RESPONSE_CODE %BYTES_SENT%\n')
    lines = str(e.value).splitlines()
    assert "must be closed by '%'" in lines[0]
    assert lines[2].index("^") == lines[1].index("%RESPONSE_CODE")


def test_misspelt_preset_name_is_rejected() -> None:
    with pytest.raises(FormatError, match="presets are: auto, envoy, istio, istio-legacy, json"):
        make_parser("istio_legacy")


def test_double_percent_is_a_literal_percent() -> None:
    compiled = compile_format("%RESPONSE_CODE% 100%% done")
    assert compiled.render({"RESPONSE_CODE": "200"}) == "200 100% done"
    assert parse("%RESPONSE_CODE% 100%% done", "200 100% done").response_code == 200
