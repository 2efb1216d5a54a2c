"""`envoygeo bench core --fluent-bit-formats`: what each Fluent Bit kafka output format
costs the worker per record.

The same Istio corpus is written in each `out_kafka` format as Fluent Bit 5.1.1 writes
it (`format json` with `timestamp_format` double / iso8601 / iso8601_ns, `format
msgpack`, `format raw` with `raw_log_key log`; layouts as in the captures of
tests/data/fluent-bit-5.1.1), so the differences are the envelope's alone. Formats are
interleaved within each run (drift on a shared machine hits all alike); medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from datetime import UTC, datetime

import click
import msgpack
import orjson

from pipeline import native as native_mod
from pipeline.decode.envelope import decode_envelope


def _iso(ts: float, digits: int) -> str:
    ns = round(ts * 1e9)
    sec, frac = divmod(ns, 10**9)
    head = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{head}.{str(frac).rjust(9, '0')[:digits]}Z"


def _json_with(stamp: Callable[[float], object]) -> Callable[[dict[str, object]], bytes]:
    def encode(rec: dict[str, object]) -> bytes:
        ts = rec["@timestamp"]
        assert isinstance(ts, float)
        return orjson.dumps({**rec, "@timestamp": stamp(ts)})
    return encode


# format name -> Fluent Bit record (as a dict, `@timestamp` an epoch float) -> value bytes
FORMATS: dict[str, Callable[[dict[str, object]], bytes]] = {
    "json (double)": _json_with(lambda ts: ts),
    "json iso8601": _json_with(lambda ts: _iso(ts, 6)),
    "json iso8601_ns": _json_with(lambda ts: _iso(ts, 9)),
    "msgpack": lambda rec: msgpack.packb(rec, use_bin_type=True),
    "raw": lambda rec: str(rec["log"]).encode(),
}


def in_every_format(records: list[bytes]) -> dict[str, list[bytes]]:
    """The corpus's Fluent Bit JSON records re-encoded in each kafka output format."""
    parsed = [orjson.loads(r) for r in records]
    return {name: [encode(rec) for rec in parsed] for name, encode in FORMATS.items()}


def decode_us(values: list[bytes]) -> float:
    """Wall µs per record of the Python envelope decoder alone."""
    from pipeline.bench.core import _time
    return _time(lambda: [decode_envelope(v) for v in values]) * 1e6 / len(values)


def envelope_section(records: list[bytes], runs: int, batch: int, cache_size: int,
                     geoip_path: str) -> None:
    """Per format: decode µs (Python), and CPU µs per record of decode + parse + client IP
    + document on each path, with the share the compiled core wrote."""
    from pipeline.bench.core import run_custom
    corpora = in_every_format(records)
    paths = [True, False] if native_mod.available() else [False]
    decode: dict[str, list[float]] = {f: [] for f in corpora}
    core: dict[tuple[str, bool], list[dict[str, float]]] = {}
    for i in range(runs):
        for name, values in corpora.items():
            decode[name].append(decode_us(values))
            for native in paths:
                core.setdefault((name, native), []).append(
                    run_custom(values, "auto", geoip_path, batch, cache_size, native,
                               full=False))
        click.echo(f"run {i + 1}/{runs} done", err=True)
    n = len(records)
    click.echo(f"Fluent Bit kafka output formats, {n} records each, median of {runs}:")
    click.echo(f"  {'format':<16} {'decode (py)':>12}   "
               + "   ".join(f"{'native' if p else 'python'} core CPU µs (share)" for p in paths))
    base = statistics.median(r["cpu_us"] for r in core[("json (double)", paths[0])])
    for name in corpora:
        cells = []
        for native in paths:
            rs = core[(name, native)]
            cpu = statistics.median(r["cpu_us"] for r in rs)
            share = statistics.median(r["native_share"] for r in rs)
            cells.append(f"{cpu:>8.2f} ({share:>6.1%})")
        added = statistics.median(r["cpu_us"] for r in core[(name, paths[0])]) - base
        click.echo(f"  {name:<16} {statistics.median(decode[name]):>9.2f} µs   "
                   + "   ".join(f"{c:>29}" for c in cells)
                   + f"   {added:+6.2f} µs vs json (double), {'native' if paths[0] else 'python'}")
