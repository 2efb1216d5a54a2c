"""The compiled fast path on custom format strings, and per record beside split lines.

Lines of a custom format may start with a digit (`%START_TIME%`, an IPv4 client,
a status code), like a CRI record does. The core must write them all, while every
CRI or Docker json-file record still goes to the Python path and its partial-line
joiner in record order. Each comparison states how many records ran native.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pipeline.bench.core import CUSTOM_FORMATS, custom_corpus
from pipeline.decode.envelope import _CRI
from pipeline.decode.envoy_format import compile_format
from tests.unit.test_native import _bulk_both, _need_native, make_enricher, run_both  # noqa: F401
from tests.unit.test_samples_in_envelopes import WRAPPERS

pytestmark = pytest.mark.unit

FORMATS = {
    **CUSTOM_FORMATS,
    "code_first": ('%RESPONSE_CODE% %DURATION% %START_TIME% %REQ(:METHOD)% %REQ(:AUTHORITY)% '
                   '%REQ(:PATH)% %DOWNSTREAM_REMOTE_ADDRESS% "%REQ(USER-AGENT)%"\n'),
    "tabs": ("%START_TIME%\t%DOWNSTREAM_REMOTE_ADDRESS%\t%REQ(:METHOD)%\t%REQ(:PATH)%\t"
             "%RESPONSE_CODE%\t%UPSTREAM_CLUSTER%\t%REQ(X-FORWARDED-FOR)%\n"),
    "pipes": ("ts=%START_TIME%|client=%DOWNSTREAM_REMOTE_ADDRESS%|"
              "peer=%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%|code=%RESPONSE_CODE%|"
              "ua=%REQ(USER-AGENT)%\n"),
}
START_TIME = CUSTOM_FORMATS["start_time"]


@pytest.mark.parametrize("envelope", ["bare", "fluent-bit"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_custom_formats_identical_and_native(name: str, envelope: str) -> None:
    records = custom_corpus(FORMATS[name], 300, 60, seed=7, envelope=envelope)
    if name != "pipes":  # the lines start with a digit (~90% IPv4 clients for "address")
        first = [orjson.loads(r)["log"] if envelope == "fluent-bit" else r.decode()
                 for r in records]
        assert sum(line[0].isdigit() for line in first) > 250
    docs, _, _ = run_both(records, batch=64, log_format=FORMATS[name], native=len(records))
    doc = orjson.loads(docs[0].document)
    assert doc["source"]["ip"] and doc["event"]["dataset"] == "envoygeo.access"


def _bare(line: str) -> bytes:
    return line.encode() + b"\n"


def _cri(tag: str, text: str, stream: str = "stdout") -> bytes:
    return f"2026-11-29T01:13:00.665123456Z {stream} {tag} {text}".encode()


def _split_lines_mix() -> tuple[list[bytes], int]:
    """Bare `%START_TIME%` lines around CRI and Docker json-file pieces of split lines,
    and how many records the core must write (batches of 4 or the whole list)."""
    lines = [r.decode().rstrip("\n") for r in custom_corpus(START_TIME, 30, 10, envelope="bare")]
    # (record, written by the core)
    mix: list[tuple[bytes, bool]] = [
        (_bare(lines[0]), True),
        (_cri("P", lines[1][:30]), False),  # a CRI line split in three, bare lines between:
        (_bare(lines[2]), True),  # another stream (none), so they stay native
        (_cri("P", lines[1][30:60]), False),
        (_bare(lines[3]), True),
        (_cri("F", lines[1][60:]), False),
        (_cri("F", lines[4]), False),  # a whole CRI line
        (_bare(lines[5]), True),
        (orjson.dumps({"log": lines[6][:25]}), False),  # Docker json-file, no "\n": open,
        (_bare(lines[7]), False),  # ... and this bare line (no stream either) continues it:
        (_bare(lines[8]), True),  # the joiner takes it, the core hands it back
        (_bare(lines[9]), True),
        (orjson.dumps({"log": lines[10][:20], "stream": "stdout"}), False),  # open on stdout
        (_bare(lines[11]), True),  # not stdout: passes
        (_cri("F", lines[10][20:]), False),  # a CRI piece on stdout closes it
        (_bare(lines[12]), True),
        # a line of this format indistinguishable from CRI: Python's, as CRI, on both paths
        (_bare("2026-11-29T01:13:00.665Z stdout F " + lines[13]), False),
        (_bare(lines[14].replace("GET", "GÉT")), False),  # non-ASCII: the Python path
        (_bare(lines[15]), True),
        (_cri("P", lines[16][:40], "stderr"), False),  # open at the end of the batch:
        (_bare(lines[17]), True),  # flushed with it (both paths)
    ]
    return [r for r, _ in mix], sum(n for _, n in mix)


@pytest.mark.parametrize("batch", [4, 100])
def test_split_lines_among_bare_digit_lines_identical(batch: int) -> None:
    records, native = _split_lines_mix()
    docs, _, e = run_both(records, batch=batch, log_format=START_TIME, native=native)
    assert e._fast.handed_back == len(records) - native
    joined = orjson.loads(docs[14].document)  # the Docker piece + the CRI piece
    assert joined["source"]["ip"] and "envelope_joined_partials" in joined["tags"]
    assert docs[8].document is None  # held back, then joined into the next record


def test_split_lines_identical_in_bulk_bodies() -> None:
    records, native = _split_lines_mix()
    _, _, e = _bulk_both(records * 3, drop_errors=True, batch=len(records),
                         log_format=START_TIME)
    assert e.records_native == 3 * native


def test_a_line_left_open_before_the_batch_is_continued_exactly() -> None:
    """`envoygeo enrich` keeps split lines open across its chunks (flush_partials=False);
    a batch after that starts with the joiner holding a piece."""
    lines = [r.decode().rstrip("\n") for r in custom_corpus(START_TIME, 6, 6, envelope="bare")]
    before = [orjson.dumps({"log": lines[0][:30]})]  # open, no stream
    batch = [_bare(lines[1]), _cri("F", lines[2]), _bare(lines[3]), _bare(lines[4])]
    outs = []
    for use_native in (True, False):
        e = make_enricher(use_native=use_native, log_format=START_TIME)
        held, _ = e.enrich_records(before, flush_partials=False)
        assert held == [None]
        docs, alerts = e.enrich_batch(batch)
        outs.append((docs, alerts, e.records_native))
    assert outs[0][:2] == outs[1][:2]
    # lines[1] continues the open line (handed back); the CRI record is Python's
    assert outs[0][2] == 2 and outs[1][2] == 0
    assert "envelope_joined_partials" in orjson.loads(outs[0][0][0].document)["tags"]


def test_cri_detection_is_the_reference_regex() -> None:
    """Digit-first lines the core must leave to Python (CRI, per `_CRI.fullmatch`) and
    ones it must take: each alone, so the count says which way each went."""
    fmt = compile_format("%REQ(X-T)% %REQ(X-A)% %REQ(X-B)% %RESPONSE_CODE%\n")
    cases = [
        ("2026-11-29T01:13:00Z stdout F 200", False),
        ("2026-11-29T01:13:00Z stderr P 200", False),
        ("2026-11-29T01:13:00Z stdout F", False),  # nothing after F: CRI all the same
        ("2026-11-29T1 stdout P 200", False),
        ("2026-11-29T01:13:00Z stdout X 200", True),  # not F/P: a line of this format
        ("2026-11-29T01:13:00Z stdoutx F 200", True),
        ("2026-11-29T01:13:00Z stdout FP 200", True),
        ("2026-11-29T stdout F 200", True),  # an empty time after T
        ("2026-11-29t01:13:00Z stdout F 200", True),
        ("2026-1-29T01:13:00Z stdout F 200", True),
        ("20261-11-29T01:13:00Z stdout F 200", True),
    ]
    for line, native in cases:
        if native:
            assert fmt.match(line, lenient=False) is not None, line
        run_both([_bare(line)], batch=1, log_format=fmt.source, native=int(native))


# Lines near the CRI shape (each part right or slightly wrong), and random ones.
def _mostly(right: str, *wrong: str) -> st.SearchStrategy[str]:
    """One part of a CRI line: right two times in three, else one of the near misses."""
    return st.sampled_from([right] * 2 * len(wrong) + list(wrong))


_NEAR_CRI = st.builds(
    lambda *parts: "".join(parts),
    _mostly("2026-11-29T01:13:00.5Z", "2026-11-29T", "2026-11-29Tx", "2026-1-29T0",
            "2026-11-29t0", "20261-11-29T0", "2026-11-29T0\x1c", "2026-11-29T0:"),
    _mostly(" ", "  ", "\t", "\x1c", ""),
    _mostly("stdout", "stderr", "stdoutx", "std", ""),
    _mostly(" ", "  ", "\t", ""),
    _mostly("F", "P", "FP", "X", ""),
    _mostly(" GET /", "", " ", "x", " \t", "\x1c"))
_RANDOM_DIGIT_FIRST = st.builds(
    lambda first, rest: first + "".join(rest), st.sampled_from("0123456789"),
    st.lists(st.sampled_from(["2026-11-29T01:13:00.5Z", "0", "-", "T", " ", "stdout", "F",
                              "P", "\t", "\x1c", ":", "x", "GET /"]), max_size=8))


@settings(max_examples=300, deadline=None)
@given(st.lists(_NEAR_CRI | _RANDOM_DIGIT_FIRST, min_size=1, max_size=6),
       st.sampled_from(["bare", "fluent-bit"]))
def test_cri_detection_matches_the_reference_regex(texts: list[str], envelope: str) -> None:
    """Lines that start with a digit, of a format any line matches: the core writes
    exactly the lines the reference's CRI regex (the oracle) does not claim, except
    one that continues a split line (a `P` piece before it, same stream, same batch)."""
    records = [_bare(t) if envelope == "bare" else WRAPPERS["fluent-bit"](t)[0] for t in texts]
    batch, native, cri = 4, 0, 0
    for start in range(0, len(texts), batch):
        open_line = False  # each batch ends with its open lines flushed
        for t in texts[start:start + batch]:
            m = _CRI.fullmatch(t)
            if m is not None:
                cri += 1
                open_line = m.group(3) == "P"
            elif open_line and envelope == "fluent-bit":  # one pod and stream: joined
                open_line = False
            else:  # bare lines have no stream: they never continue a CRI line
                native += 1
    event(f"CRI lines: {min(cri, 1)}")
    run_both(records, batch=batch, log_format="%REQ(X-A)%", native=native)
