"""The forward server: Fluent Bit / Fluentd `forward` outputs in, one Kafka record per event out.

Delivery: a chunk that asks for an ack (`chunk` option) is answered `{"ack": chunk}` only
once Kafka has acknowledged every one of its records (idempotent producer, acks=all), so
the shipper's at-least-once guarantee holds end to end: whatever fails (Kafka fails a
record, the process dies, a limit is hit) leaves the chunk unacknowledged and the
shipper sends it again. A chunk that is refused also has its connection closed, so the
shipper notices at once instead of after its ack timeout. The one exception is a record
too large for Kafka ever to take: resending could not help, so it is dropped (logged,
counted) and the rest of the chunk acked.

The Kafka value is a record of Fluent Bit's kafka output (`timestamp_key @timestamp` as
epoch seconds first, then the record's keys), an envelope the worker reads without
configuration (`pipeline.decode.envelope`). With the compiled core built, the stream is
cut into frames by it (`_Connection._frames`), and Forward (Fluent Bit's default),
PackedForward (Fluentd) and CompressedPackedForward (`compress gzip`) frames are relayed
from their bytes (`native_relay_values`): each value is the `format msgpack` record,
sliced from the frame without decoding anything, because decoding with msgpack-python
and re-encoding as JSON was most of the relay's CPU. Everything else (Message mode, a
record the strict compiled reader leaves alone, no compiled core) is decoded here and
written as the `format json` record (`relay_value`). The worker's
compiled core reads both forms at about the same cost. The tag goes in a `fluent.tag`
header only when asked (`forward.tag_header`), as Fluent Bit's kafka output drops it too.

Bounded memory: one frame per connection is buffered (at most `max_chunk_bytes`, also
after gunzip), at most `max_inflight_chunks` chunks wait for their ack at once, and
frames sent without an ack request are bounded by the producer's queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import orjson
from confluent_kafka import KafkaError, KafkaException, Producer
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from pipeline.sinks.kafka import produce_waiting
from pipeline.sources.forward import (
    BAD_INPUT_REASONS,
    EventTime,
    ForwardError,
    Frame,
    Time,
    TooLarge,
    ack,
    decode_frame,
    forward_frame,
    helo,
    parse_ping,
    ping_ok,
    pong,
    unpack_one,
    unpacker,
    user_ok,
)

log = logging.getLogger("envoygeo.forward")

REFUSED_REASONS = ("too_large", "inflight_limit", "kafka_error", "draining")
TAG_HEADER = "fluent.tag"


class ForwardMetrics:
    """The forward server's metrics, in their own registry (as `pipeline.metrics`)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.connections = Counter("envoygeo_forward_connections",
                                   "Client connections accepted.", registry=r)
        self.connections_refused = Counter(
            "envoygeo_forward_connections_refused",
            "Connections closed at once because forward.max_connections were open.",
            registry=r)
        self.open_connections = Gauge("envoygeo_forward_open_connections",
                                      "Client connections open now.", registry=r)
        self.bytes_in = Counter("envoygeo_forward_bytes_in", "Bytes read from clients.",
                                registry=r)
        self.events_in = Counter("envoygeo_forward_events_received",
                                 "Events decoded, by event mode.", ["mode"], registry=r)
        self.events_relayed = Counter("envoygeo_forward_events_relayed",
                                      "Events Kafka acknowledged.", registry=r)
        self.events_failed = Counter(
            "envoygeo_forward_events_failed",
            "Events Kafka did not take (their chunk is not acked, so the shipper resends).",
            registry=r)
        self.events_too_large = Counter(
            "envoygeo_forward_events_too_large",
            "Events dropped because Kafka refuses a record that large (message.max.bytes); "
            "the rest of their chunk is relayed and acked.", registry=r)
        self.chunks_acked = Counter("envoygeo_forward_chunks_acked",
                                    "Chunks answered with an ack.", registry=r)
        self.chunks_refused = Counter(
            "envoygeo_forward_chunks_refused",
            "Frames not relayed (no ack, connection closed), by reason: too_large, "
            "inflight_limit, kafka_error, draining.", ["reason"], registry=r)
        self.bad_input = Counter(
            "envoygeo_forward_bad_input",
            "Connections closed on input the protocol does not allow, by reason.",
            ["reason"], registry=r)
        self.inflight = Gauge("envoygeo_forward_inflight_chunks",
                              "Chunks waiting for Kafka before their ack.", registry=r)
        for mode in ("Message", "Forward", "PackedForward", "CompressedPackedForward"):
            self.events_in.labels(mode)
        for reason in REFUSED_REASONS:
            self.chunks_refused.labels(reason)
        for reason in BAD_INPUT_REASONS:
            self.bad_input.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def native_frame_scan() -> Callable[..., tuple[int, int, int, int, int]] | None:
    """The compiled core's frame scan (`forward_frame_scan` in `native/src/forward.rs`),
    None when it is not built or switched off."""
    from pipeline import native

    if not native.available():
        return None
    return native._native.forward_frame_scan  # type: ignore[no-any-return]


def native_relay_values() -> Callable[[bytes], list[bytes] | None] | None:
    """The compiled core's relay of packed payloads (`native/src/forward.rs`), None when
    it is not built or switched off (ENVOYGEO_NATIVE=0)."""
    from pipeline import native

    if not native.available():
        return None
    return native._native.forward_relay_values  # type: ignore[no-any-return]


def relay_value(time_: Time, record: dict[Any, Any]) -> bytes:
    """Fluent Bit's kafka output JSON for one event: `@timestamp` (epoch seconds) first.
    The Python path; packed payloads take the compiled core's `format msgpack` values
    when it is built (`native_relay_values`)."""
    ts = time_.timestamp if type(time_) is EventTime else float(time_)  # type: ignore[arg-type]
    try:
        return orjson.dumps({"@timestamp": ts, **record}, default=_json_default,
                            option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        # A str with bytes that are not UTF-8 (kept by surrogateescape): replaced, so
        # the record is still relayed; the worker tags invalid UTF-8 of its own input.
        return orjson.dumps({"@timestamp": ts, **_valid_utf8(record)}, default=_json_default,
                            option=orjson.OPT_NON_STR_KEYS)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "timestamp"):  # EventTime, msgpack.Timestamp inside a record
        ts = value.timestamp
        return ts() if callable(ts) else ts
    return repr(value)


def _valid_utf8(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_valid_utf8(k): _valid_utf8(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_valid_utf8(v) for v in value]
    return value


class _Chunk:
    """One frame's records on their way to Kafka; done when every one is reported."""

    __slots__ = ("conn", "frame_mode", "chunk", "left", "total", "failed", "too_large",
                 "error", "_lock", "_done")

    def __init__(self, conn: _Connection, frame: Frame, done: Callable[[_Chunk], None]) -> None:
        self.conn = conn
        self.frame_mode = frame.mode
        self.chunk = frame.chunk
        self.total = self.left = frame.count
        self.failed = 0
        self.too_large = 0  # records Kafka can never take: dropped, not resent forever
        self.error: str | None = None
        self._lock = threading.Lock()
        self._done = done

    def delivered(self, err: Any, msg: Any) -> None:
        # Delivery reports come from the poll thread (or the loop thread while it waits
        # for room in the producer's queue): counted under a lock, finished on the loop.
        with self._lock:
            if err is not None:
                if isinstance(err, KafkaError) and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    self.too_large += 1
                else:
                    self.failed += 1
                    self.error = self.error or str(err)
            self.left -= 1
            last = self.left == 0
        if last:
            self._done(self)


@dataclass(slots=True)
class ServerOptions:
    host: str
    port: int
    topic: str
    max_chunk_bytes: int
    max_inflight_chunks: int
    max_connections: int
    shared_key: str | None = None
    self_hostname: str = ""
    tls: ssl.SSLContext | None = None
    users: dict[str, str] = field(default_factory=dict)  # username -> password
    udp_heartbeat: bool = False
    tag_header: bool = False


class ForwardServer:
    """The listening socket, its connections and the chunks in flight to Kafka."""

    def __init__(self, options: ServerOptions, producer: Producer,
                 metrics: ForwardMetrics | None = None) -> None:
        self.options = options
        self.producer = producer
        self.metrics = metrics or ForwardMetrics()
        self.self_hostname = options.self_hostname or socket.gethostname()
        self.inflight = 0
        self.relayed = self.acked = 0  # totals for the summary line
        self.draining = False
        self.kafka_ok = True
        self.port = options.port
        self._conns: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._headers_cache: dict[str, list[tuple[str, bytes]]] = {}
        # The compiled relay path for packed payloads (None: every event through
        # relay_value); frames decoded for relaying pass it to decode_frame.
        self.relay_values = native_relay_values()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _Connection(self), self.options.host, self.options.port,
            reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.options.udp_heartbeat:
            self._udp, _ = await self._loop.create_datagram_endpoint(
                _Heartbeat, local_addr=(self.options.host, self.port))

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def drain(self, grace_s: float) -> bool:
        """SIGTERM: stop accepting and reading, let the chunks in flight reach Kafka (and
        be acked), then close every connection. False if the grace ran out first."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.stop_reading()
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
            finished = True
        except TimeoutError:
            finished = False
        for conn in list(self._conns):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
        if self._udp is not None:
            self._udp.close()
        return finished

    # -- called by connections --

    def relay(self, conn: _Connection, frame: Frame) -> bool:
        """Hand a frame's events to Kafka; False (nothing produced) when refused."""
        m = self.metrics
        m.events_in.labels(frame.mode).inc(frame.count)
        if self.draining:
            return self._refuse(conn, frame, "draining", "the server is shutting down")
        # Only a chunk that waits for its ack counts as in flight: a frame sent without
        # one (fluent-logger's Message mode, Fluent Bit without Require_ack_response) has
        # nothing to wait for, could not be resent if refused, and its records are
        # bounded by the producer's queue (produce waits while it is full).
        acked = frame.chunk is not None
        if acked and self.inflight >= self.options.max_inflight_chunks:
            return self._refuse(conn, frame, "inflight_limit",
                                f"{self.inflight} chunks already wait for Kafka "
                                f"(forward.max_inflight_chunks)")
        chunk = _Chunk(conn, frame,
                       self._delivered_threadsafe if acked else self._unacked_threadsafe)
        if not frame.count:
            self._finish(chunk)
            return True
        if acked:
            self.inflight += 1
            m.inflight.set(self.inflight)
            self._idle.clear()
        headers = None
        if self.options.tag_header:  # ~0.8 µs a record in librdkafka, hence optional
            headers = self._headers_cache.get(frame.tag)
            if headers is None:
                if len(self._headers_cache) > 10000:
                    self._headers_cache.clear()
                headers = self._headers_cache[frame.tag] = [
                    (TAG_HEADER, frame.tag.encode("utf-8", "replace"))]
        topic, producer, report = self.options.topic, self.producer, chunk.delivered
        values = frame.values  # made by the compiled core, or one by one below
        items: list[Any] = values if values is not None else frame.entries
        # produce() with positional arguments (topic, value, key, partition -1: the
        # partitioner's choice, callback): ~1 µs a record less than keywords, which
        # confluent-kafka looks up by name on every call.
        produce = producer.produce
        for item in items:
            try:
                value = item if values is not None else relay_value(*item)
                try:  # the common case inline: ~0.2 µs a record less than the helper
                    if headers is None:
                        produce(topic, value, None, -1, report)
                    else:
                        produce(topic, value, on_delivery=report,
                                headers=headers)  # type: ignore[arg-type]  # list invariance
                except BufferError:  # the producer's queue is full: wait for room
                    produce_waiting(producer, topic, value, None, headers,
                                    on_delivery=report)
            except KafkaException as exc:  # e.g. a record over message.max.bytes
                report(exc.args[0] if exc.args else exc, None)
            except Exception as exc:
                report(exc, None)
        return True

    def _refuse(self, conn: _Connection, frame: Frame, reason: str, why: str) -> bool:
        self.metrics.chunks_refused.labels(reason).inc()
        log.warning("%s: refused a %s chunk of %d event(s) (tag %s): %s; no ack, closing the "
                    "connection so the client resends it", conn.peer, frame.mode,
                    frame.count, frame.tag, why,
                    extra={"fields": {"forward.refused": reason}})
        conn.close()
        return False

    def _delivered_threadsafe(self, chunk: _Chunk) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._finish_inflight, chunk)

    def _unacked_threadsafe(self, chunk: _Chunk) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._finish, chunk)

    def _finish_inflight(self, chunk: _Chunk) -> None:
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)
        if self.inflight == 0:
            self._idle.set()
        self._finish(chunk)

    def _finish(self, chunk: _Chunk) -> None:
        m = self.metrics
        relayed = chunk.total - chunk.failed - chunk.too_large
        m.events_relayed.inc(relayed)
        self.relayed += relayed
        if chunk.too_large:
            m.events_too_large.inc(chunk.too_large)
            log.warning("%s: dropped %d event(s) of a chunk larger than Kafka takes "
                        "(message.max.bytes, or the broker's limit); the rest is relayed, "
                        "so the chunk is not resent forever", chunk.conn.peer,
                        chunk.too_large, extra={"fields": {"forward.dropped": "too_large"}})
        if chunk.failed:
            self.kafka_ok = False
            m.events_failed.inc(chunk.failed)
            m.chunks_refused.labels("kafka_error").inc()
            if chunk.chunk is None:
                log.error("%s: Kafka did not take %d of the %d event(s) of a frame sent "
                          "without an ack request (%s); they are lost (the client cannot "
                          "resend: use require_ack_response)", chunk.conn.peer, chunk.failed,
                          chunk.total, chunk.error,
                          extra={"fields": {"forward.refused": "kafka_error"}})
                return
            log.error("%s: Kafka did not take %d of the %d event(s) of a chunk (%s); no ack, "
                      "closing the connection so the client resends it", chunk.conn.peer,
                      chunk.failed, chunk.total, chunk.error,
                      extra={"fields": {"forward.refused": "kafka_error"}})
            chunk.conn.close()
            return
        self.kafka_ok = True
        if chunk.chunk is not None:
            chunk.conn.write(ack(chunk.chunk))
            m.chunks_acked.inc()
            self.acked += 1

    def bad_input(self, conn: _Connection, reason: str, why: str) -> None:
        self.metrics.bad_input.labels(reason).inc()
        log.warning("%s: %s; closing the connection", conn.peer, why,
                    extra={"fields": {"forward.bad_input": reason}})

    def opened(self, conn: _Connection) -> bool:
        if len(self._conns) >= self.options.max_connections:
            self.metrics.connections_refused.inc()
            log.warning("%s: refused: %d connections open (forward.max_connections)",
                        conn.peer, len(self._conns))
            return False
        self._conns.add(conn)
        self.metrics.connections.inc()
        self.metrics.open_connections.set(len(self._conns))
        return True

    def closed(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        self.metrics.open_connections.set(len(self._conns))


class _Heartbeat(asyncio.DatagramProtocol):
    """Fluentd's `heartbeat_type udp`: a datagram on the forward port is answered with
    one 0x00 byte, as in_forward does."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.transport.sendto(b"\x00", addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP heartbeat: %s", exc)  # e.g. ICMP unreachable from a gone client


class _Connection(asyncio.Protocol):
    """One client: msgpack objects in, HELO/PONG/acks out."""

    def __init__(self, server: ForwardServer) -> None:
        self.server = server
        opts = server.options
        self.max_frame = opts.max_chunk_bytes
        # The stream buffer holds at most one frame plus one read.
        self.unpacker = unpacker(opts.max_chunk_bytes + 256 * 1024)
        self.fed = 0
        self.done = 0  # stream offset where the last whole object ended
        self.base = 0  # stream offset of the streaming decoder's first byte
        # Relaying with the compiled core, the stream is cut into frames by its scan
        # (`_frames`) so that Forward-mode frames never become Python objects; otherwise
        # (and from the first bytes the scan does not take) msgpack-python's decoder.
        self.scan = native_frame_scan() if server.relay_values is not None else None
        self.buf: bytearray | None = bytearray() if self.scan is not None else None
        self.resume = (0, 0, 0)  # the scan's place in an unfinished frame
        self.need = 0  # bytes the buffer must hold before scanning again helps
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.nonce: bytes | None = None  # set while the handshake is pending
        self.auth_salt = b""
        self.closing = False
        self.tls_task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self.server.opened(self):
            self.closing = True
            transport.abort()
            return
        if self.server.options.tls is not None:
            # TLS set up here rather than by create_server(ssl=...), which drops a failed
            # handshake (wrong client certificate, a plain-TCP client) without a word.
            self.tls_task = asyncio.ensure_future(self._start_tls(transport))
            return
        self._ready(transport)

    async def _start_tls(self, transport: asyncio.Transport) -> None:
        server = self.server
        assert server.options.tls is not None
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, self, server.options.tls, server_side=True,
                ssl_handshake_timeout=10)
        except Exception as exc:  # the handshake failed or timed out
            self.closing = True
            transport.abort()
            server.bad_input(self, "tls", f"TLS handshake failed: {exc!r}")
            server.closed(self)
            return
        if tls is None or self.closing:
            return
        self.transport = tls
        self._ready(tls)

    def _ready(self, transport: asyncio.Transport) -> None:
        if self.server.options.shared_key is not None:
            self.nonce = os.urandom(16)
            self.auth_salt = os.urandom(16) if self.server.options.users else b""
            transport.write(helo(self.nonce, self.auth_salt))

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.server.metrics.bytes_in.inc(len(data))
        self.fed += len(data)
        if self.buf is not None:
            self._frames(self.buf, data)
        else:
            self._unpack(data)

    def _unpack(self, data: bytes) -> None:
        """The stream through msgpack-python's streaming decoder, object by object."""
        try:
            self.unpacker.feed(data)
        except Exception:  # BufferFull: one frame larger than the limit
            self._too_large(f"a frame over {self.max_frame} bytes (forward.max_chunk_bytes)")
            return
        while not self.closing:
            try:
                obj = self.unpacker.unpack()
            except msgpack.OutOfData:
                return
            except Exception as exc:
                self._bad("malformed", f"malformed msgpack after byte {self.done}: {exc!r}")
                return
            end = self.base + self.unpacker.tell()
            size, self.done = end - self.done, end
            if size > self.max_frame:
                self._too_large(f"a frame of {size} bytes, over {self.max_frame} "
                                "(forward.max_chunk_bytes)")
                return
            self._handle(obj)

    def _frames(self, buf: bytearray, data: bytes) -> None:
        """The stream cut into frames by the compiled scan: a Forward-mode frame is
        relayed from its bytes (`forward_frame`), any other object decoded whole as
        `_unpack` would. The buffer holds one unfinished frame plus one read, as the
        streaming decoder's does; it is trimmed once per read, not once per frame."""
        assert self.scan is not None
        buf += data
        off = 0
        while not self.closing and off < len(buf) and len(buf) - off >= self.need:
            status, a, b, c, d = self.scan(buf, off, *self.resume)
            if status == 0:
                self.resume, self.need = (a, b, c), d
                break
            self.resume, self.need = (0, 0, 0), 0
            if status < 0:  # not msgpack, or nested too deep: msgpack-python's to say
                self.buf, self.base = None, self.done
                self._unpack(bytes(buf[off:]))
                return
            raw = bytes(buf[off:off + a])
            off += a
            self.done += a
            if a > self.max_frame:
                self._too_large(f"a frame of {a} bytes, over {self.max_frame} "
                                "(forward.max_chunk_bytes)")
                return
            if status == 2 and self.nonce is None:
                self._relay(forward_frame, raw, c, d, self.max_frame,
                            self.server.relay_values)
                continue
            try:
                obj = unpack_one(raw)
            except Exception as exc:
                self._bad("malformed", f"malformed msgpack after byte {self.done - a}: "
                                       f"{exc!r}")
                return
            self._handle(obj)
        del buf[:off]
        # The same bound as the streaming decoder's buffer; a frame whose header already
        # says it is larger is refused without waiting for its bytes.
        if not self.closing and (self.need > self.max_frame
                                 or len(buf) > self.max_frame + 256 * 1024):
            self._too_large(f"a frame over {self.max_frame} bytes (forward.max_chunk_bytes)")

    def _handle(self, obj: Any) -> None:
        if self.nonce is not None:
            self._handshake(obj)
            return
        self._relay(decode_frame, obj, self.max_frame, self.server.relay_values)

    def _relay(self, decode: Callable[..., Frame], *args: Any) -> None:
        try:
            frame = decode(*args)
        except TooLarge as exc:
            self._too_large(str(exc))
            return
        except ForwardError as exc:
            self._bad(exc.reason, str(exc))
            return
        self.server.relay(self, frame)

    def _handshake(self, obj: Any) -> None:
        server = self.server
        key = server.options.shared_key
        assert key is not None and self.nonce is not None
        try:
            ping = parse_ping(obj)
        except ForwardError as exc:
            self._bad(exc.reason, str(exc))
            return
        reason = ""
        if not ping_ok(ping, self.nonce, key):
            reason = "shared_key mismatch"
            why = f"client {ping.hostname!r} sent a wrong shared key"
        elif server.options.users and not user_ok(ping, self.auth_salt, server.options.users):
            reason = "username/password mismatch"
            why = f"client {ping.hostname!r} sent an unknown user or a wrong password " \
                  f"(username {ping.username!r})"
        self.write(pong(ping, self.nonce, key, server.self_hostname, not reason, reason))
        if not reason:
            self.nonce = None
            return
        self._bad("auth_failed", f"{why} (answered PONG false)")

    def _too_large(self, why: str) -> None:
        self.server.metrics.chunks_refused.labels("too_large").inc()
        log.warning("%s: refused %s; no ack, closing the connection", self.peer, why,
                    extra={"fields": {"forward.refused": "too_large"}})
        self.close()

    def _bad(self, reason: str, why: str) -> None:
        self.server.bad_input(self, reason, why)
        self.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def stop_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def close(self) -> None:
        """Close after what is written (a PONG false, acks) has gone out."""
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing and self.fed > self.done:
            self.server.bad_input(
                self, "disconnect_mid_frame",
                f"client disconnected mid-frame ({self.fed - self.done} bytes of "
                "an unfinished frame dropped; never acked, so an acking client resends it)")
        self.closing = True
        self.server.closed(self)


def server_tls(cert_file: Any, key_file: Any, ca_file: Any = None) -> ssl.SSLContext:
    """The listener's TLS context (TLS 1.2 or later); with `ca_file`, clients must
    present a certificate that CA signed. ValueError naming the file that does not load."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"forward.tls_cert_file/tls_key_file ({cert_file}, {key_file}) do "
                         f"not load: {exc}") from None
    if ca_file is not None:
        try:
            ctx.load_verify_locations(ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"forward.tls_ca_file ({ca_file}) does not load: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def serve_status(metrics: ForwardMetrics, server: ForwardServer, host: str,
                 port: int) -> Any:
    """/metrics, /healthz, /readyz through the worker's StatusServer (it only asks its
    metrics object for render())."""
    from pipeline.metrics import StatusServer

    def ready() -> tuple[bool, str]:
        if server.draining:
            return False, "draining"
        if not server.serving:
            return False, "not listening"
        if not server.kafka_ok:
            return False, "Kafka refused the last chunk's records"
        return True, f"listening on {server.port}, relaying to {server.options.topic}"

    status = StatusServer(metrics, host, port, ready)  # type: ignore[arg-type]
    status.start()
    return status


def heartbeat(status: Any, interval_s: float = 1.0) -> Callable[[], None]:
    """The loop's beat for /healthz; returns a stopper."""
    stop = threading.Event()
    loop = asyncio.get_running_loop()

    def tick() -> None:
        if not stop.is_set():
            status.beat()
            loop.call_later(interval_s, tick)

    tick()
    return stop.set
