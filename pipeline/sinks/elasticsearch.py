"""Elasticsearch `_bulk` sink: index every item or hand back the ones Elasticsearch refuses.

The delivery contract lives here: an item leaves `write()` either indexed or in the
returned rejection list (a 4xx that retrying cannot fix: mapping or parse errors), so the
worker can dead-letter it before committing. Everything that may succeed later (429,
5xx, timeouts, a node that is down) is retried here, with exponential backoff and
jitter, and only the items that failed are sent again.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout, TransportError
from elasticsearch import ApiError, Elasticsearch
from elasticsearch.serializer import NdjsonSerializer, OrjsonSerializer

from pipeline.config import ElasticsearchSettings, url_without_password

log = logging.getLogger(__name__)

# Per-item statuses worth another try: overload and server-side trouble.
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})

# An id that needs no JSON escaping (printable ASCII without `"` and `\\`).
_PLAIN_ID = re.compile(r'[ !#-\[\]-~]*')


@dataclass(slots=True)
class BulkItem:
    """One document on its way to an index; `original` is what gets dead-lettered."""

    index: str
    doc_id: str
    source: bytes  # the JSON document, already serialised (orjson)
    original: bytes = b""
    position: str = ""  # "topic/partition/offset", for dead-letter headers and logs


@dataclass(slots=True)
class Rejection:
    item: BulkItem
    status: int
    reason: str


class SinkStopped(Exception):
    """Shutdown was requested while items were still unindexed; they stay uncommitted."""


class BulkBodySerializer(NdjsonSerializer):
    """NDJSON that is already bytes goes out as it is.

    The client's serializer copies every body into a bytearray and that into new bytes:
    two copies of a ~3 MB body per request, made while holding the GIL that the
    worker's enrichment thread needs too.
    """

    def dumps(self, data: Any) -> bytes:
        if isinstance(data, bytes) and data.endswith(b"\n"):
            return data
        return super().dumps(data)


_warned_unverified = False


def warn_unverified(settings: ElasticsearchSettings) -> None:
    """verify_certs: false is a choice to be seen: one warning per process."""
    global _warned_unverified
    if not _warned_unverified:
        _warned_unverified = True
        log.warning("elasticsearch.verify_certs is false: the certificates of %s are not "
                    "verified (anyone on the path can read and change the traffic)",
                    ", ".join(url_without_password(h) for h in settings.hosts))


def make_client(settings: ElasticsearchSettings) -> Elasticsearch:
    """The official client, with our retry policy instead of its own."""
    auth: dict[str, Any] = {}
    api_key = settings.api_key_value()
    if api_key is not None:
        auth["api_key"] = api_key
    elif settings.username is not None:
        auth["basic_auth"] = (settings.username, settings.password_value() or "")
    tls: dict[str, Any] = {}
    if settings.ca_certs is not None:
        tls["ca_certs"] = str(settings.ca_certs)
    if not settings.verify_certs:
        # Said once, in our log, instead of urllib3's warning on every request.
        tls.update(verify_certs=False, ssl_show_warn=False)
        warn_unverified(settings)
    return Elasticsearch(
        settings.hosts,
        request_timeout=settings.request_timeout_s,
        # The sink retries per item with backoff; client-level retries would resend
        # items that already succeeded and hide outages from our metrics.
        max_retries=0,
        retry_on_timeout=False,
        serializers={"application/json": OrjsonSerializer(),
                     "application/x-ndjson": BulkBodySerializer()},
        **auth,
        **tls,
    )


@dataclass(slots=True)
class EncodedBulk:
    """Items already in `_bulk` form: item j's action and source lines are
    `body[ends[j - 1]:ends[j]]` (from 0 for the first).

    Why: the worker's compiled path writes a batch's body in one go, so no Python object
    per document exists on the way to Elasticsearch; `describe(j)` builds item j's
    BulkItem only when Elasticsearch rejects it (for the dead-letter record).
    """

    body: bytes
    ends: list[int]
    describe: Callable[[int], BulkItem]

    def __len__(self) -> int:
        return len(self.ends)

    def lines(self, items: range | list[int]) -> bytes:
        """The body of some items, in the order given (a request, or a retry of one)."""
        body, ends = self.body, self.ends
        if isinstance(items, range) and items.step == 1:
            if not items:
                return b""
            start = ends[items.start - 1] if items.start else 0
            if start == 0 and items.stop == len(ends):
                return body
            return body[start:ends[items.stop - 1]]
        return b"".join(body[ends[j - 1] if j else 0:ends[j]] for j in items)


def action_head(op: bytes, index: str) -> bytes:
    """An action line up to its document id: `{"index":{"_index":"...","_id":`."""
    return b'{"' + op + b'":{"_index":' + orjson.dumps(index) + b',"_id":'


def encode_items(items: Sequence[BulkItem], op: bytes = b"index") -> EncodedBulk:
    """The NDJSON body of BulkItems, and where each item ends in it.

    Why not `orjson.dumps` per id: each call's result is a fresh bytes object that
    stays alive until the join, and keeping thousands of them alive measured ~3 us per
    item (allocator churn) against ~0.3 us for `str.encode`. Ids are JSON-safe as they
    are in practice (Kafka positions: topic names are `[a-zA-Z0-9._-]`), so they are
    quoted directly; anything else goes through orjson. The action head is built once
    per index, not per item.
    """
    parts: list[bytes] = []
    append = parts.append
    ends: list[int] = []
    end = 0
    heads: dict[str, bytes] = {}
    for item in items:
        head = heads.get(item.index)
        if head is None:
            head = heads[item.index] = action_head(op, item.index)
        doc_id = item.doc_id
        if _PLAIN_ID.fullmatch(doc_id):
            quoted = b'"' + doc_id.encode() + b'"}}\n'
        else:
            quoted = orjson.dumps(doc_id) + b"}}\n"
        append(head)
        append(quoted)
        append(item.source)
        append(b"\n")
        end += len(head) + len(quoted) + len(item.source) + 1
        ends.append(end)
    return EncodedBulk(b"".join(parts), ends, items.__getitem__)


class BulkObserver(Protocol):
    """What the sink reports as it goes (the worker's Metrics implements it)."""

    def on_bulk(self, seconds: float, docs: int, outcome: str, nbytes: int) -> None:
        """One request: its latency, documents, outcome (ok|partial|error), body bytes."""

    def on_item_errors(self, statuses: list[int]) -> None:
        """The error statuses of the items of one response (retried or rejected)."""

    def on_retry(self, items: int) -> None:
        """Items about to be sent again."""


class _Unobserved:
    def on_bulk(self, seconds: float, docs: int, outcome: str, nbytes: int) -> None:
        pass

    def on_item_errors(self, statuses: list[int]) -> None:
        pass

    def on_retry(self, items: int) -> None:
        pass


class ElasticsearchSink:
    """Writes batches of BulkItems; thread-safe (the client's connection pool is)."""

    def __init__(
        self,
        settings: ElasticsearchSettings,
        client: Elasticsearch | None = None,
        observer: BulkObserver | None = None,
    ) -> None:
        self.settings = settings
        self.client = client or make_client(settings)
        # Set while the last bulk request got through; the worker pauses fetching when not.
        self.writable = threading.Event()
        self.writable.set()
        self.last_error = ""
        self._observer: BulkObserver = observer or _Unobserved()
        # Data streams accept only `create`; a replayed record then answers 409, which
        # means "already indexed" because the id is derived from the Kafka position.
        self._op = b"create" if settings.data_stream else b"index"
        self._done_statuses = (409,) if settings.data_stream else ()

    def action_head(self, index: str) -> bytes:
        """This sink's action line up to the id, for bodies written elsewhere."""
        return action_head(self._op, index)

    def write(
        self, items: Sequence[BulkItem] | EncodedBulk, stop: threading.Event | None = None
    ) -> list[Rejection]:
        """Index all items; return the permanent rejections. Raises SinkStopped on shutdown.

        Items go out in requests of at most `bulk_max_docs` documents and about
        `bulk_max_bytes` bytes, in order; each request is retried on its own.
        """
        enc = items if isinstance(items, EncodedBulk) else encode_items(items, self._op)
        max_docs, max_bytes = self.settings.bulk_max_docs, self.settings.bulk_max_bytes
        n, ends = len(enc), enc.ends
        if n <= max_docs and len(enc.body) <= max_bytes:  # the usual case: one request
            return self._write_chunk(enc, range(n), stop) if n else []
        rejected: list[Rejection] = []
        first, chunk_start = 0, 0
        for j in range(n):
            if j > first and (j - first >= max_docs or ends[j] - chunk_start > max_bytes):
                rejected += self._write_chunk(enc, range(first, j), stop)
                first, chunk_start = j, ends[j - 1]
        rejected += self._write_chunk(enc, range(first, n), stop)
        return rejected

    def _write_chunk(
        self, enc: EncodedBulk, items: range, stop: threading.Event | None
    ) -> list[Rejection]:
        pending: range | list[int] = items
        rejected: list[Rejection] = []
        attempt = 0
        while pending:
            retry: list[int] = []
            started = time.perf_counter()
            body = enc.lines(pending)
            try:
                response = self.client.bulk(
                    # Typed as a list of dicts; a bytes body is sent as it is (NDJSON).
                    operations=body,  # type: ignore[arg-type]
                    filter_path="errors,items.*.status,items.*.error",
                )
            except (TransportConnectionError, ConnectionTimeout, TransportError) as exc:
                self._failed(failure_text(exc, self.settings), started, len(pending),
                             len(body))
                _release(exc)
                retry = list(pending)
            except ApiError as exc:
                # The whole request was refused: overload and server errors are worth
                # retrying; anything else (e.g. 413 too large) is a bug of ours that
                # retrying would turn into an endless loop, so it surfaces.
                if exc.meta.status not in RETRYABLE:
                    raise
                self._failed(f"HTTP {exc.meta.status}: {exc.message}", started, len(pending),
                             len(body))
                _release(exc)
                retry = list(pending)
            else:
                answer = response.body
                if answer.get("errors"):
                    statuses: list[int] = []
                    for j, result in zip(pending, answer["items"], strict=True):
                        outcome = next(iter(result.values()))
                        status = outcome.get("status", 200)
                        if status < 300 or status in self._done_statuses:
                            continue
                        statuses.append(status)
                        if status in RETRYABLE:
                            retry.append(j)
                        else:
                            rejected.append(Rejection(enc.describe(j), status,
                                                      _reason(outcome.get("error"))))
                    self._observer.on_item_errors(statuses)
                outcome_label = "partial" if retry else "ok"
                self._observer.on_bulk(time.perf_counter() - started, len(pending),
                                       outcome_label, len(body))
                if not retry:
                    self.writable.set()
                    self.last_error = ""
            if not retry:
                break
            pending = retry
            self._observer.on_retry(len(pending))
            delay = self._backoff(attempt)
            attempt += 1
            # Said at attempts 1, 2, 4, 8, ... (DEBUG between): an hour-long outage at
            # the 30 s backoff cap is ~8 lines per batch, not one per attempt.
            log.log(
                logging.WARNING if attempt & (attempt - 1) == 0 else logging.DEBUG,
                "bulk: %d item(s) to retry in %.2fs (attempt %d): %s",
                len(pending),
                delay,
                attempt,
                self.last_error or "per-item 429/5xx",
            )
            if stop is not None:
                if stop.wait(delay):
                    raise SinkStopped(f"{len(pending)} item(s) not indexed at shutdown")
            else:
                time.sleep(delay)
        return rejected

    def _failed(self, message: str, started: float, size: int, nbytes: int) -> None:
        self.writable.clear()
        self.last_error = message
        self._observer.on_bulk(time.perf_counter() - started, size, "error", nbytes)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter, so a fleet does not retry in lockstep."""
        ceiling = min(
            self.settings.retry_max_backoff_ms,
            self.settings.retry_initial_backoff_ms * (2 ** min(attempt, 20)),
        )
        return random.uniform(ceiling / 2, ceiling) / 1000.0

    def close(self) -> None:
        self.client.close()


def failure_text(exc: BaseException, settings: ElasticsearchSettings) -> str:
    """What a failed request says in the retry warnings and the worker's pause line. The
    client's own text is only "TLS error" / "Connection error"; the reason is at the
    bottom of its exception chain. A TLS failure is retried like any connection failure
    (a certificate may be fixed or rotated while the worker waits) and said in the words
    of `run`'s start-up check (expired, not for this host, untrusted CA); another
    failure gets its root cause (e.g. ConnectionRefusedError) in brackets."""
    from pipeline.service_errors import _chain, describe_elasticsearch_error, tls_refusal

    if tls_refusal(exc, settings.ca_certs) is not None:
        return describe_elasticsearch_error(exc, settings)
    text = f"{type(exc).__name__}: {exc}"
    root = _chain(exc)[-1]
    return text if root is exc else f"{text} ({type(root).__name__}: {root})"


def _release(exc: BaseException) -> None:
    """Drop the frames of a failed request so its body is freed now, not at the next GC.

    The client's exception chain (urllib3 -> elastic_transport) forms reference cycles
    through traceback frames whose locals hold the request body. The bodies are large
    bytes objects that do not count towards the collector's thresholds, so while
    Elasticsearch is down every retry left one behind: ~0.7 MB/s of growth per worker
    (found by the reliability suite's outage soak). Clearing the finished frames breaks
    the cycles and reference counting frees the body at once.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
        todo += [e.__cause__, e.__context__]


def _reason(error: Any) -> str:
    if isinstance(error, dict):
        text = f"{error.get('type', 'error')}: {error.get('reason', '')}"
        cause = error.get("caused_by")
        if isinstance(cause, dict):
            text += f" (caused by {cause.get('type')}: {cause.get('reason')})"
        return text
    return str(error)
