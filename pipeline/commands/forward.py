"""`envoygeo forward`: the Fluent Forward protocol server (mode relay: into Kafka; mode
direct: enriched and indexed into Elasticsearch in this process)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from pipeline.commands.worker import _load, config_option

log = logging.getLogger("envoygeo.forward")


@click.command()
@config_option
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--plain-logs", is_flag=True, help="Human-readable logs instead of JSON lines.")
def forward(config_path: Path | None, log_level: str, plain_logs: bool) -> None:
    """Receive logs from Fluent Bit / Fluentd `forward` outputs: relay them to Kafka
    (forward.mode: relay, the default) or index them into Elasticsearch (direct).

    \b
    Listens on forward.host:forward.port (24224) for Fluent Forward protocol v1:
    Message, Forward, PackedForward and CompressedPackedForward (gzip) modes,
    EventTime and integer times, the shared_key handshake with optional users
    (forward.shared_key, forward.users), TLS and client certificates
    (forward.tls_cert_file, tls_key_file, tls_ca_file), Fluentd's UDP heartbeat.
    relay: each event becomes one Kafka record on forward.topic (default: the
    worker's first topic) in Fluent Bit's kafka output JSON, which `envoygeo run`
    reads. direct (small setups without Kafka): each chunk is enriched as the worker
    does (same code: parse, client IP, GeoIP, rates and alerts) and indexed into
    elasticsearch.index; unparsable lines (parse.unparsed: dead_letter) and
    rejected documents go to forward.dead_letter_index. No replay and no scaling
    out: pick relay when a worker fleet or Kafka's retention is wanted.

    \b
    Delivery: a chunk sent with an ack request (Fluent Bit require_ack_response on,
    Fluentd require_ack_response true) is acked only after Kafka acknowledged every
    record of it (idempotent producer, acks=all), or in direct mode after
    Elasticsearch acknowledged every document (ids from the chunk id and the
    event's place in it: a resent chunk overwrites itself). A chunk over
    forward.max_chunk_bytes, or beyond forward.max_inflight_chunks waiting, is not
    acked and its connection is closed: the shipper resends it. While
    Elasticsearch is down (direct) chunks wait unacked, bulk requests are retried
    with backoff and /readyz answers 503.
    SIGTERM/SIGINT: stop accepting, let in-flight chunks be delivered and acked,
    exit 0 within forward.shutdown_grace_s.
    Metrics: http://<metrics.host>:<forward.metrics_port>/metrics, /healthz, /readyz.

    \b
    Examples:
      envoygeo setup -c config.yaml && envoygeo forward -c config.yaml
      # direct mode: templates only, no Kafka
      envoygeo setup --no-topics -c config.yaml
      ENVOYGEO_FORWARD__MODE=direct envoygeo forward -c config.yaml

    \b
    Exit status: 2 the configuration is invalid; 3 relay: Kafka cannot be reached
    (within 10 s), refuses this client (a wrong password, an untrusted, expired or
    wrong-host certificate, a missing client certificate: one line naming the cause,
    within seconds) or the topic does not exist (`envoygeo setup` creates it);
    direct: Elasticsearch cannot be reached, refuses the credentials or lacks the
    index templates, or Redis (rates.backend: redis) refuses, as for `envoygeo run`.
    """
    stop: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))

    from confluent_kafka import Producer

    from pipeline.kafka_log import kafka_logger
    from pipeline.kafka_security import KafkaUnavailable, RefusalLog, list_topics
    from pipeline.logs import setup_logging
    from pipeline.sources.forward_server import ForwardMetrics, ForwardServer, server_tls

    settings = _load(config_path)
    setup_logging(log_level, json=not plain_logs)
    fwd, k = settings.forward, settings.kafka
    tls = None
    if fwd.tls_cert_file is not None:
        try:
            tls = server_tls(fwd.tls_cert_file, fwd.tls_key_file, fwd.tls_ca_file)
        except ValueError as exc:
            click.echo(f"envoygeo forward: {exc}", err=True)
            sys.exit(2)
    if fwd.mode == "direct":
        sys.exit(_direct(settings, tls, stop))
    topic = fwd.topic or k.topics[0]
    # Refusals (a wrong password, an untrusted or expired certificate) end the start in
    # seconds with one line, as for `run` and `setup`, instead of the 10 s wait and
    # librdkafka's retry storm in the log.
    refusals = RefusalLog(forward=kafka_logger())
    producer = Producer(producer_config(settings), logger=refusals)
    try:
        meta = list_topics(producer, refusals, k, topic, within_s=10)
        err = meta.topics[topic].error if topic in meta.topics else None
    except KafkaUnavailable as exc:
        click.echo(f"envoygeo forward: {exc}" if exc.refused else
                   f"envoygeo forward: cannot reach Kafka at {k.bootstrap_servers}: {exc}",
                   err=True)
        sys.exit(3)
    refusals.started()
    if err is not None:
        click.echo(f"envoygeo forward: Kafka topic {topic!r}: {err.str()}; run `envoygeo "
                   "setup` (it creates the source topics) or set forward.topic", err=True)
        sys.exit(3)
    server = ForwardServer(_options(settings, topic, tls), producer, ForwardMetrics())
    sys.exit(asyncio.run(_serve(server, producer, settings, stop)))


def producer_config(settings: Any) -> dict[str, Any]:
    """The relay's producer: idempotent (a retried batch is not written twice), acks=all
    (an ack means the record is replicated), with the brokers and security of
    `kafka` (`kafka.security`, and the connection keys of `kafka.librdkafka`) as every
    Kafka client of the project."""
    from pipeline.kafka_security import client_config

    return client_config(
        settings.kafka,
        **{
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "batch.size": 1024 * 1024,
            "compression.type": "lz4",
            "delivery.timeout.ms": 30000,
            # Bounds what frames sent without an ack request can queue (chunks with one
            # are bounded by forward.max_inflight_chunks): produce() waits while it is full.
            "queue.buffering.max.kbytes": 256 * 1024,
        })


def _options(settings: Any, topic: str, tls: Any) -> Any:
    """The server's options from `forward:` (both modes)."""
    from pipeline.sources.forward_server import ServerOptions

    fwd = settings.forward
    return ServerOptions(
        host=fwd.host, port=fwd.port, topic=topic, max_chunk_bytes=fwd.max_chunk_bytes,
        max_inflight_chunks=fwd.max_inflight_chunks, max_connections=fwd.max_connections,
        shared_key=fwd.shared_key_value(),
        self_hostname=fwd.self_hostname or "", tls=tls,
        users={u.username: u.password.get_secret_value() for u in fwd.users},
        udp_heartbeat=fwd.udp_heartbeat, tag_header=fwd.tag_header)


def _direct(settings: Any, tls: Any, stop: list[str]) -> int:
    """Mode direct: the worker's start-up checks (Elasticsearch answers and has the
    index templates, Redis answers), its Enricher and Elasticsearch sink, no Kafka."""
    from pipeline.commands.worker import _redis_refusal
    from pipeline.enricher import Enricher
    from pipeline.preflight import local_problems
    from pipeline.service_errors import describe_elasticsearch_error
    from pipeline.setup import missing_templates
    from pipeline.sinks.elasticsearch import ElasticsearchSink, make_client
    from pipeline.sources.forward_direct import DirectServer

    problems = [p for p in local_problems(settings) if not p[0].startswith("kafka")]
    if problems:
        from pipeline.config import explain

        click.echo(f"envoygeo forward: {explain(problems)}", err=True)
        return 2
    try:
        with make_client(settings.elasticsearch) as es:
            missing = missing_templates(es, settings)
    except Exception as exc:  # unreachable or refusing cluster: one line, exit 3
        click.echo(f"envoygeo forward: "
                   f"{describe_elasticsearch_error(exc, settings.elasticsearch)}", err=True)
        return 3
    if missing:
        click.echo(f"envoygeo forward: no envoygeo index template covers "
                   f"{', '.join(missing)}; run `envoygeo setup --no-topics` first", err=True)
        return 3
    refused = _redis_refusal(settings)
    if refused:
        click.echo(f"envoygeo forward: {refused}", err=True)
        return 3
    try:
        server = DirectServer(_options(settings, "", tls), settings,
                              lambda: Enricher.from_settings(settings),
                              ElasticsearchSink(settings.elasticsearch))
    except Exception as exc:
        click.echo(f"envoygeo forward: cannot start enrichment: {exc}", err=True)
        return 2
    try:
        return asyncio.run(_serve(server, None, settings, stop))
    finally:
        server.close()


async def _serve(server: Any, producer: Any, settings: Any, stop: list[str]) -> int:
    """Listen until SIGTERM/SIGINT, then drain. `producer` None: mode direct."""
    import threading

    from pipeline.sources.forward_server import heartbeat, serve_status

    fwd = settings.forward
    direct = producer is None
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def request_stop(name: str) -> None:
        stop.append(name)
        stopped.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, signal.Signals(sig).name)
    if stop:
        stopped.set()
    polling = threading.Event()

    def poll() -> None:  # delivery reports, off the event loop
        while not polling.is_set():
            producer.poll(0.1)

    poller = None
    if not direct:
        poller = threading.Thread(target=poll, name="kafka-delivery", daemon=True)
        poller.start()
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", fwd.host, fwd.port, exc.strerror)
        polling.set()
        return 3
    status = None
    stop_beat = None
    if fwd.metrics_port:
        if direct:
            from pipeline.sources.forward_direct import serve_direct_status

            status = serve_direct_status(server, settings.metrics.host, fwd.metrics_port)
        else:
            status = serve_status(server.metrics, server, settings.metrics.host,
                                  fwd.metrics_port)
        stop_beat = heartbeat(status)
    target = (f"indexing into Elasticsearch index {settings.elasticsearch.index} at "
              f"{', '.join(settings.elasticsearch.hosts)} (mode direct, native core "
              f"{server.enricher.native_status})" if direct else
              f"relaying to Kafka topic {server.options.topic} at "
              f"{settings.kafka.bootstrap_servers}")
    log.info("forward: listening on %s:%d (Fluent Forward protocol v1%s%s), %s; metrics "
             "on %s", fwd.host, server.port,
             "" if fwd.tls_cert_file is None else
             (", TLS with client certificates" if fwd.tls_ca_file else ", TLS"),
             (", shared_key and user handshake" if fwd.users else ", shared_key handshake")
             if fwd.shared_key or fwd.shared_key_file else "", target,
             f"{settings.metrics.host}:{status.port}" if status else "off",
             extra={"fields": {"forward.port": server.port, "forward.mode": fwd.mode}})
    await stopped.wait()
    log.info("forward: %s: draining (no new connections; in-flight chunks get %.0fs)",
             stop[0], fwd.shutdown_grace_s)
    finished = await server.drain(fwd.shutdown_grace_s)
    polling.set()
    left = 0
    if poller is not None:
        poller.join()
        left = producer.flush(max(1.0, fwd.shutdown_grace_s / 2))
    if stop_beat is not None:
        stop_beat()
    if direct:
        done = (f"{server.indexed} event(s) indexed, {server.dead_lettered} dead-lettered, "
                f"{server.unparsed} unparsed, {server.alerts} alert(s)")
    else:
        done = f"{server.relayed} event(s) relayed"
    log.info("forward: stopped: %s, %d chunk(s) acked%s%s", done, server.acked,
             "" if finished else "; the grace ran out with chunks still in flight (not acked,"
                                 " the clients resend them)",
             f"; {left} record(s) still unsent" if left else "")
    if status is not None:
        status.close()
    return 0
