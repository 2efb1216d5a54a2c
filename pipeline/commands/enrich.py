"""`envoygeo enrich`: access-log records in, one ECS JSON document per record out."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import click
import orjson

from pipeline import omit as omit_mod
from pipeline.clientip import ClientIpPolicy, ClientIpResolver, PrivacyPolicy
from pipeline.config import read_secret
from pipeline.decode.envoy_format import FormatError
from pipeline.decode.json_log import JsonKeysError, load_json_keys
from pipeline.decode.parser import make_parser
from pipeline.enrich.alerts import AlertRule
from pipeline.enrich.geoip import GeoIP, GeoIPReloadError
from pipeline.enrich.rates import RatesConfig
from pipeline.enricher import Enricher
from pipeline.process import MAX_FIELD_BYTES, MAX_LINE_BYTES, Limits, Processed, RecordProcessor

EPILOG = """\b
Input: one record per line, each in any envelope (detected per record):
  bare Envoy/Istio line, Envoy JSON line, Fluent Bit or Fluentd Kafka JSON
  ({"log"|"message": ..., "kubernetes": {...}}), Docker json-file, CRI
  ("<time> stdout F <line>"; P partials are joined). Blank lines are skipped.
  Partial lines produce one document for the joined line.

\b
--log-format: auto (default; JSON if the line starts with '{', else the Envoy,
  Istio and Istio 1.3-1.8 presets), envoy, istio, istio-legacy, json, or your
  Envoy format string, e.g.
    --log-format '[%START_TIME%] %REQ(:METHOD)% %DOWNSTREAM_REMOTE_ADDRESS% "%REQ(USER-AGENT)%"'

\b
Client IP: %DOWNSTREAM_REMOTE_ADDRESS% (the PROXY-protocol client when Envoy's
  proxy_protocol listener filter is on). X-Forwarded-For is consulted only when
  that address is in a --trusted-proxy CIDR, right to left, over at most
  --trusted-hops entries; the first untrusted entry is the client.
  Envoy's default format logs no address Envoy saw: if Envoy runs with
  use_remote_address: true it appended that address to X-Forwarded-For, and
  --envoy-use-remote-address takes the rightmost entry as it (then walks on).

\b
Limits: a line longer than --max-line-bytes is cut (tag envoygeo_line_truncated),
  a value longer than --max-field-bytes too (tag envoygeo_field_truncated, its
  name in envoygeo.truncated). Records with no time of their own get the time
  they were read as @timestamp (envoygeo.timestamp_source: ingest).

\b
Examples:
  envoygeo enrich access.log
  kubectl logs deploy/istio-ingressgateway | envoygeo enrich --log-format istio
  envoygeo enrich --trusted-proxy 10.0.0.0/8 --trusted-hops 2 lb-logs.txt
  envoygeo enrich --log-format envoy --envoy-use-remote-address default-format.log
  envoygeo enrich --log-format json \
      --json-keys 'client=downstream_remote_address,ua=user_agent' x.log
  envoygeo enrich --json-keys my-json-format.json x.log   # a json_format block works as is
  envoygeo enrich --geoip-city GeoLite2-City.mmdb --geoip-asn GeoLite2-ASN.mmdb \
      --rate-window 10 --rate-window 60 --alert burst:10:100 --alerts-out alerts.jsonl x.log
  envoygeo enrich --profile lean --omit user_agent x.log   # what lean documents hold

\b
Exit status: 0 every record parsed; 1 some records failed (they are still
written, tagged _envoygeo_parse_failure with error.message); 2 bad options
(e.g. a format string Envoy would reject). A summary goes to stderr.
"""


def _records(paths: tuple[str, ...]) -> Iterator[bytes]:
    streams: list[BinaryIO] = []
    for p in paths or ("-",):
        streams.append(sys.stdin.buffer if p == "-" else open(p, "rb"))  # noqa: SIM115
    try:
        for s in streams:
            for line in s:
                if line.strip():
                    yield line
    finally:
        for s in streams:
            if s is not sys.stdin.buffer:
                s.close()


def _alert_rule(spec: str) -> AlertRule:
    """`name:window_s:threshold` (as in --alert burst:10:100)."""
    try:
        name, window, threshold = spec.split(":")
        return AlertRule(name=name, window_s=int(window), threshold=int(threshold))
    except ValueError as e:
        raise click.BadParameter(f"{spec!r}: expected NAME:WINDOW_S:THRESHOLD ({e})",
                                 param_hint="--alert") from None


@click.command(epilog=EPILOG, context_settings={"max_content_width": 100})
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--log-format", default="auto", show_default=True, metavar="NAME|FORMAT",
              help="auto, envoy, istio, istio-legacy, json, or an Envoy format string.")
@click.option("--json-keys", default=None, metavar="FILE|JSON|k=v,...",
              help="Extra JSON key -> canonical field (or %COMMAND%) mapping for JSON logs.")
@click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="CIDR",
              help="Proxy/LB network whose X-Forwarded-For is believed. Repeatable.")
@click.option("--trusted-hops", default=1, show_default=True, type=click.IntRange(min=0),
              help="At most this many X-Forwarded-For entries (from the right) are examined.")
@click.option("--envoy-use-remote-address", is_flag=True, default=False,
              help="Envoy runs with use_remote_address: true: the rightmost X-Forwarded-For "
                   "entry is the address Envoy saw (client_ip.envoy_use_remote_address).")
@click.option("--privacy", "privacy_mode", type=click.Choice(["keep", "truncate", "hash"]),
              default="keep", show_default=True,
              help="What documents keep of client addresses (privacy.client_ip): truncate "
                   "to /24 and /48, or a keyed hash (--hash-key-file); GeoIP and rates "
                   "use the full address.")
@click.option("--hash-key-file", type=click.Path(exists=True, dir_okay=False),
              help="--privacy hash: file holding the HMAC key (at least 16 bytes).")
@click.option("--max-line-bytes", default=MAX_LINE_BYTES, show_default=True,
              type=click.IntRange(min=1024), help="Lines are cut to this many bytes (tagged).")
@click.option("--max-field-bytes", default=MAX_FIELD_BYTES, show_default=True,
              type=click.IntRange(min=1), help="Values are cut to this many bytes (tagged).")
@click.option("--geoip-city", type=click.Path(exists=True, dir_okay=False),
              help="City .mmdb (GeoIP2/GeoLite2, DB-IP Lite, or ip-location-db flat layout).")
@click.option("--geoip-country", type=click.Path(exists=True, dir_okay=False),
              help="Country .mmdb (fills what the City database lacks).")
@click.option("--geoip-asn", type=click.Path(exists=True, dir_okay=False), help="ASN .mmdb.")
@click.option("--rates/--no-rates", default=True, show_default=True,
              help="Per-IP request counts in trailing windows (in memory, by event time).")
@click.option("--rate-window", "rate_windows", multiple=True, type=click.IntRange(min=1),
              metavar="SECONDS", help="Window length; repeatable (default 10, 60, 300).")
@click.option("--lateness", default=60, show_default=True, type=click.IntRange(min=0),
              help="Seconds an event may arrive out of order and still be counted exactly.")
@click.option("--alert", "alert_specs", multiple=True, metavar="NAME:WINDOW_S:THRESHOLD",
              help="Alert rule, e.g. burst:10:100 (window must be a --rate-window).")
@click.option("--alerts-out", type=click.File("wb"), default=None,
              help="Write alert documents here (JSON lines); default: count only.")
@click.option("--profile", type=click.Choice(omit_mod.PROFILES), default="full",
              show_default=True, help="Which fields the documents carry (document.profile).")
@click.option("--omit", "omit", multiple=True, metavar="FIELD",
              help="Leave this field or object out too (document.omit); repeatable.")
def enrich(files: tuple[str, ...], log_format: str, json_keys: str | None,
           trusted_proxies: tuple[str, ...], trusted_hops: int,
           envoy_use_remote_address: bool, privacy_mode: str, hash_key_file: str | None,
           max_line_bytes: int, max_field_bytes: int,
           geoip_city: str | None,
           geoip_country: str | None, geoip_asn: str | None, rates: bool,
           rate_windows: tuple[int, ...], lateness: int, alert_specs: tuple[str, ...],
           alerts_out: BinaryIO | None, profile: omit_mod.Profile, omit: tuple[str, ...]) -> None:
    """Parse access-log records and print one ECS JSON document per record.

    With --geoip-* and rates (on by default) this is the whole enrichment of the
    worker, with no servers: GeoIP, per-IP rates (envoygeo.rate.<window>s) and alerts.
    """
    try:
        keys = load_json_keys(json_keys)
        parser = make_parser(log_format, keys)
        policy = ClientIpPolicy(tuple(trusted_proxies), trusted_hops, envoy_use_remote_address)
    except (FormatError, JsonKeysError) as e:
        raise click.BadParameter(str(e)) from e
    except ValueError as e:
        raise click.BadParameter(f"--trusted-proxy: {e}") from e
    try:
        limits = Limits(max_line_bytes, max_field_bytes)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-field-bytes") from e
    try:
        key = read_secret(Path(hash_key_file)).encode() if hash_key_file else None
        privacy = PrivacyPolicy(privacy_mode, hash_key=key)  # type: ignore[arg-type]
    except ValueError as e:
        raise click.BadParameter(str(e).replace("hash_key", "--hash-key-file"),
                                 param_hint="--privacy") from e
    rules = [_alert_rule(spec) for spec in alert_specs]
    refused = omit_mod.refusal(omit)
    if refused is not None:
        raise click.BadParameter(refused, param_hint="--omit")
    try:
        geoip = (GeoIP.open(geoip_city, geoip_country, geoip_asn)
                 if geoip_city or geoip_country or geoip_asn else None)
        rates_cfg = (RatesConfig(backend="memory", windows=rate_windows or (10, 60, 300),
                                 lateness_s=lateness) if rates else None)
        if rules and rates_cfg is None:
            raise ValueError("--alert needs --rates")
        enricher = Enricher.build(
            RecordProcessor(parser, ClientIpResolver(policy, privacy=privacy), limits),
            geoip, rates_cfg, rules, omit=omit_mod.paths(profile, omit))
    except (GeoIPReloadError, ValueError) as e:
        raise click.BadParameter(str(e)) from e
    out = sys.stdout.buffer
    dumps = orjson.dumps
    alerts_total = 0

    def emit(records: Sequence[Processed | None], alerts: list[dict[str, Any]]) -> None:
        nonlocal alerts_total
        for rec in records:
            if rec is not None:
                out.write(dumps(rec.doc) + b"\n")
        alerts_total += len(alerts)
        if alerts_out is not None:
            for alert in alerts:
                alerts_out.write(dumps(alert) + b"\n")

    # Chunks: the rate stage and alerts work per batch; output order is input order.
    chunk: list[bytes] = []
    for record in _records(files):
        chunk.append(record)
        if len(chunk) >= 1000:
            emit(*enricher.enrich_records(chunk, flush_partials=False))
            chunk = []
    if chunk:
        emit(*enricher.enrich_records(chunk, flush_partials=False))
    emit(*enricher.flush())
    out.flush()
    proc = enricher.processor
    total = proc.parsed + proc.failed
    extra = ""
    if geoip is not None:
        extra += f", GeoIP cache hits {geoip.hits}/{geoip.hits + geoip.misses}"
    if rates_cfg is not None:
        extra += f", {alerts_total} alerts"
    if enricher.lines_truncated or enricher.fields_truncated:
        extra += (f", {enricher.lines_truncated} lines cut to --max-line-bytes, "
                  f"{enricher.fields_truncated} with fields cut to --max-field-bytes")
    if note := enricher.no_remote_address_note():
        extra += f"; {note}"
    click.echo(f"envoygeo enrich: {total} records, {proc.parsed} parsed, {proc.failed} failed"
               + extra, err=True)
    sys.exit(1 if proc.failed else 0)
