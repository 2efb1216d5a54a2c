"""`envoygeo bench parse`: lines/s of each access-log format, and of the core stages.

Single-threaded and pinned to one CPU, because a worker process is one core: the
figure multiplies by the number of worker processes. Lines are generated from the
same format strings the parsers are compiled from, with a realistic address pool
(a few thousand clients, some IPv6) so the client-IP cache sees a normal hit rate.
"""

from __future__ import annotations

import os
import random
import statistics
import time
import uuid
from collections.abc import Callable, Sequence

import click
import orjson

from pipeline.clientip import ClientIpPolicy, ClientIpResolver
from pipeline.decode.access_log import AccessLog
from pipeline.decode.envelope import decode_envelope
from pipeline.decode.envoy_format import compile_format
from pipeline.decode.parser import make_parser
from pipeline.decode.presets import ISTIO_JSON, TEXT_PRESETS
from pipeline.process import RecordProcessor

AGENTS = ("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
          "curl/8.4.0", "Go-http-client/1.1", "okhttp/4.12.0")


def _values(rng: random.Random, clients: Sequence[str]) -> dict[str, str | None]:
    ms = 1795914780000 + rng.randrange(3_600_000)
    secs, frac = divmod(ms, 1000)
    client = rng.choice(clients)
    remote = f"[{client}]:{rng.randrange(1024, 65535)}" if ":" in client else \
        f"{client}:{rng.randrange(1024, 65535)}"
    return {
        "START_TIME": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:03d}Z",
        "REQ(:METHOD)": rng.choice(("GET", "GET", "GET", "POST", "PUT")),
        "REQ(X-ENVOY-ORIGINAL-PATH?:PATH)": f"/api/v1/items/{rng.randrange(10**6)}?page=2",
        "PROTOCOL": rng.choice(("HTTP/1.1", "HTTP/2")),
        "RESPONSE_CODE": rng.choice(("200", "200", "200", "304", "404", "503")),
        "RESPONSE_FLAGS": rng.choice(("-", "-", "-", "UF,URX")),
        "RESPONSE_CODE_DETAILS": "via_upstream",
        "CONNECTION_TERMINATION_DETAILS": None,
        "UPSTREAM_TRANSPORT_FAILURE_REASON": None,
        "BYTES_RECEIVED": str(rng.randrange(2000)),
        "BYTES_SENT": str(rng.randrange(200000)),
        "DURATION": str(rng.randrange(2000)),
        "RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)": str(rng.randrange(2000)),
        "REQ(X-FORWARDED-FOR)": client,
        "REQ(USER-AGENT)": rng.choice(AGENTS),
        "REQ(X-REQUEST-ID)": str(uuid.UUID(int=rng.getrandbits(128))),
        "REQ(:AUTHORITY)": "shop.example.com",
        "UPSTREAM_HOST": f"10.44.{rng.randrange(4)}.{rng.randrange(1, 250)}:8080",
        "UPSTREAM_CLUSTER": "outbound|8080||shop.default.svc.cluster.local",
        "UPSTREAM_CLUSTER_RAW": "outbound|8080||shop.default.svc.cluster.local",
        "UPSTREAM_LOCAL_ADDRESS": f"10.44.9.9:{rng.randrange(30000, 60000)}",
        "DOWNSTREAM_LOCAL_ADDRESS": "10.44.9.9:8443",
        "DOWNSTREAM_REMOTE_ADDRESS": remote,
        "REQUESTED_SERVER_NAME": "shop.example.com",
        "ROUTE_NAME": "default",
        "DYNAMIC_METADATA(istio.mixer:status)": None,
    }


def _json_line(values: dict[str, str | None]) -> str:
    typed: dict[str, object] = {}
    for key, cmd in ISTIO_JSON.items():
        v = values.get(cmd.strip("%"))
        typed[key] = int(v) if v is not None and v.isdigit() and key != "upstream_service_time" \
            else v
    return orjson.dumps(typed).decode()


def generate(kind: str, n: int, seed: int = 1) -> list[str]:
    """n lines of `kind` (a text preset name, "json" or "mix")."""
    rng = random.Random(seed)
    clients = [f"{rng.randrange(1, 223)}.{rng.randrange(256)}.{rng.randrange(256)}."
               f"{rng.randrange(1, 255)}" for _ in range(4000)]
    clients += [f"2a02:{rng.randrange(65536):x}::{rng.randrange(65536):x}" for _ in range(1000)]
    renderers: dict[str, Callable[[dict[str, str | None]], str]] = {
        name: compile_format(fmt, name).render for name, fmt in TEXT_PRESETS.items()}
    renderers["json"] = _json_line
    kinds = list(renderers) if kind == "mix" else [kind]
    return [renderers[rng.choice(kinds)](_values(rng, clients)) for _ in range(n)]


def _median_rate(fn: Callable[[], int], runs: int) -> float:
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        count = fn()
        rates.append(count / (time.perf_counter() - t0))
    return statistics.median(rates)


def _pin_one_cpu() -> str:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError):
        return "not pinned"


@click.command()
@click.option("--lines", "n", default=100_000, show_default=True, help="Lines per run.")
@click.option("--runs", default=5, show_default=True, help="Runs per figure (median).")
def command(n: int, runs: int) -> None:
    """Lines/s per format and for envelope+parse+client-IP, one core, median of runs."""
    click.echo(f"envoygeo bench parse: {n} lines x {runs} runs, {_pin_one_cpu()}")
    for kind in (*TEXT_PRESETS, "json"):
        lines = generate(kind, n)
        parser = make_parser(kind)

        def run(lines: list[str] = lines, parse: Callable = parser.parse) -> int:
            ok = 0
            for line in lines:
                if type(parse(line)) is AccessLog:
                    ok += 1
            assert ok == len(lines), f"{len(lines) - ok} generated lines failed to parse"
            return ok

        click.echo(f"  {kind:<28} {_median_rate(run, runs):>10,.0f} lines/s")

    # auto: a real stream is one format (the last winner is tried first); a random
    # per-line mix of all four is its worst case.
    for label, lines in (("auto (istio stream)", generate("istio", n, seed=3)),
                         ("auto (random mix of 4)", generate("mix", n))):
        auto = make_parser("auto")

        def run_auto(lines: list[str] = lines, parse: Callable = auto.parse) -> int:
            return sum(type(parse(x)) is AccessLog for x in lines)

        click.echo(f"  {label:<28} {_median_rate(run_auto, runs):>10,.0f} lines/s")

    # Core stages as a worker runs them: Fluent Bit envelopes around Istio lines.
    records = [orjson.dumps({"@timestamp": 1795914780.5, "log": line, "stream": "stdout",
                             "kubernetes": {"pod_name": "gw-1", "namespace_name": "istio-system",
                                            "container_name": "istio-proxy"}})
               for line in generate("istio", n, seed=2)]
    policy = ClientIpPolicy(("10.0.0.0/8",), 2)

    def stages() -> int:
        parser, resolver = make_parser("auto"), ClientIpResolver(policy)
        for rec in records:
            env = decode_envelope(rec)
            log = parser.parse(env.payload or "")
            resolver.resolve(log)  # type: ignore[arg-type]
        return len(records)

    def full() -> int:
        proc = RecordProcessor(make_parser("auto"), ClientIpResolver(policy))
        dumps = orjson.dumps
        for rec in records:
            dumps(proc.process(rec))
        return len(records)

    click.echo(f"  {'envelope+parse+clientip':<28} {_median_rate(stages, runs):>10,.0f} records/s")
    click.echo(f"  {'  + ECS document + orjson':<28} {_median_rate(full, runs):>10,.0f} records/s")
