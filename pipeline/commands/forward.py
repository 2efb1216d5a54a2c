"""`envoygeo forward`: the Fluent Forward protocol server (relay mode: into Kafka)."""

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
    """Receive logs from Fluent Bit / Fluentd `forward` outputs and relay them to Kafka.

    \b
    Listens on forward.host:forward.port (24224) for Fluent Forward protocol v1:
    Message, Forward, PackedForward and CompressedPackedForward (gzip) modes,
    EventTime and integer times, the shared_key handshake with optional users
    (forward.shared_key, forward.users), TLS and client certificates
    (forward.tls_cert_file, tls_key_file, tls_ca_file), Fluentd's UDP heartbeat.
    Each event becomes one Kafka record on forward.topic (default: the worker's
    first topic) in Fluent Bit's kafka output JSON, which `envoygeo run` reads.

    \b
    Delivery: a chunk sent with an ack request (Fluent Bit require_ack_response on,
    Fluentd require_ack_response true) is acked only after Kafka acknowledged every
    record of it (idempotent producer, acks=all). A chunk over
    forward.max_chunk_bytes, or beyond forward.max_inflight_chunks waiting for
    Kafka, is not acked and its connection is closed: the shipper resends it.
    SIGTERM/SIGINT: stop accepting, let in-flight chunks reach Kafka and be acked,
    flush, exit 0 within forward.shutdown_grace_s.
    Metrics: http://<metrics.host>:<forward.metrics_port>/metrics, /healthz, /readyz.

    \b
    Example:
      envoygeo setup -c config.yaml && envoygeo forward -c config.yaml

    \b
    Exit status: 2 the configuration is invalid; 3 Kafka cannot be reached (within
    10 s), refuses this client (a wrong password, an untrusted, expired or wrong-host
    certificate, a missing client certificate: one line naming the cause, within
    seconds) or the topic does not exist (`envoygeo setup` creates it).
    """
    stop: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))

    from confluent_kafka import Producer

    from pipeline.kafka_log import kafka_logger
    from pipeline.kafka_security import KafkaUnavailable, RefusalLog, list_topics
    from pipeline.logs import setup_logging
    from pipeline.sources.forward_server import (
        ForwardMetrics,
        ForwardServer,
        ServerOptions,
        server_tls,
    )

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
    metrics = ForwardMetrics()
    server = ForwardServer(ServerOptions(
        host=fwd.host, port=fwd.port, topic=topic, max_chunk_bytes=fwd.max_chunk_bytes,
        max_inflight_chunks=fwd.max_inflight_chunks, max_connections=fwd.max_connections,
        shared_key=fwd.shared_key.get_secret_value() if fwd.shared_key else None,
        self_hostname=fwd.self_hostname or "", tls=tls,
        users={u.username: u.password.get_secret_value() for u in fwd.users},
        udp_heartbeat=fwd.udp_heartbeat, tag_header=fwd.tag_header),
        producer, metrics)
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


async def _serve(server: Any, producer: Any, settings: Any, stop: list[str]) -> int:
    import threading

    from pipeline.sources.forward_server import heartbeat, serve_status

    fwd = settings.forward
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
        status = serve_status(server.metrics, server, settings.metrics.host, fwd.metrics_port)
        stop_beat = heartbeat(status)
    log.info("forward: listening on %s:%d (Fluent Forward protocol v1%s%s), relaying to "
             "Kafka topic %s at %s; metrics on %s", fwd.host, server.port,
             "" if fwd.tls_cert_file is None else
             (", TLS with client certificates" if fwd.tls_ca_file else ", TLS"),
             (", shared_key and user handshake" if fwd.users else ", shared_key handshake")
             if fwd.shared_key else "", server.options.topic,
             settings.kafka.bootstrap_servers,
             f"{settings.metrics.host}:{status.port}" if status else "off",
             extra={"fields": {"forward.port": server.port}})
    await stopped.wait()
    log.info("forward: %s: draining (no new connections; in-flight chunks get %.0fs)",
             stop[0], fwd.shutdown_grace_s)
    finished = await server.drain(fwd.shutdown_grace_s)
    polling.set()
    poller.join()
    left = producer.flush(max(1.0, fwd.shutdown_grace_s / 2))
    if stop_beat is not None:
        stop_beat()
    log.info("forward: stopped: %d event(s) relayed, %d chunk(s) acked%s%s",
             server.relayed, server.acked,
             "" if finished else "; the grace ran out with chunks still in flight (not acked,"
                                 " the clients resend them)",
             f"; {left} record(s) still unsent" if left else "")
    if status is not None:
        status.close()
    return 0
