"""`envoygeo enrich`: access-log records in, one ECS JSON document per record out."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import BinaryIO

import click
import orjson

from pipeline.clientip import ClientIpPolicy, ClientIpResolver
from pipeline.decode.envoy_format import FormatError
from pipeline.decode.json_log import JsonKeysError, load_json_keys
from pipeline.decode.parser import make_parser
from pipeline.process import RecordProcessor

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

\b
Examples:
  envoygeo enrich access.log
  kubectl logs deploy/istio-ingressgateway | envoygeo enrich --log-format istio
  envoygeo enrich --trusted-proxy 10.0.0.0/8 --trusted-hops 2 lb-logs.txt
  envoygeo enrich --log-format json \
      --json-keys 'client=downstream_remote_address,ua=user_agent' x.log
  envoygeo enrich --json-keys my-json-format.json x.log   # a json_format block works as is

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
def enrich(files: tuple[str, ...], log_format: str, json_keys: str | None,
           trusted_proxies: tuple[str, ...], trusted_hops: int) -> None:
    """Parse access-log records and print one ECS JSON document per record."""
    try:
        keys = load_json_keys(json_keys)
        parser = make_parser(log_format, keys)
        policy = ClientIpPolicy(tuple(trusted_proxies), trusted_hops)
    except (FormatError, JsonKeysError) as e:
        raise click.BadParameter(str(e)) from e
    except ValueError as e:
        raise click.BadParameter(f"--trusted-proxy: {e}") from e
    proc = RecordProcessor(parser, ClientIpResolver(policy))
    out = sys.stdout.buffer
    dumps = orjson.dumps
    for record in _records(files):
        doc = proc.process(record)
        if doc is not None:
            out.write(dumps(doc) + b"\n")
    for doc in proc.flush():
        out.write(dumps(doc) + b"\n")
    out.flush()
    total = proc.parsed + proc.failed
    click.echo(f"envoygeo enrich: {total} records, {proc.parsed} parsed, {proc.failed} failed",
               err=True)
    sys.exit(1 if proc.failed else 0)
