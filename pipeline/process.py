"""One record through the core stages: envelope -> access-log parser -> client IP ->
document. Shared by `envoygeo enrich`, the benchmarks and (later) the Kafka worker, so
the order of stages and the failure handling live in one place.
"""

from __future__ import annotations

from typing import Any

from pipeline.clientip import ClientIpResolver
from pipeline.decode.access_log import AccessLog
from pipeline.decode.envelope import Envelope, PartialJoiner, decode_envelope
from pipeline.decode.parser import LineParser
from pipeline.document import build_document, build_failure_document


class RecordProcessor:
    """Stateful only for partial-line joining; counts outcomes for summaries."""

    def __init__(self, parser: LineParser, resolver: ClientIpResolver) -> None:
        self.parser = parser
        self.resolver = resolver
        self.joiner = PartialJoiner()
        self.parsed = 0
        self.failed = 0

    def process(self, data: bytes | str) -> dict[str, Any] | None:
        """The document for this record, or None while a partial line is held back."""
        env = self.joiner.feed(decode_envelope(data))
        if env is None:
            return None
        return self.document(env)

    def flush(self) -> list[dict[str, Any]]:
        """Documents for partial lines still waiting at end of input."""
        return [self.document(env) for env in self.joiner.flush()]

    def document(self, env: Envelope) -> dict[str, Any]:
        if env.error is not None or env.payload is None:
            self.failed += 1
            return build_failure_document(env, env.error or "no access-log payload")
        try:
            log = self.parser.parse(env.payload)
        except Exception as e:  # noqa: BLE001 - a parser bug must not stop the stream
            self.failed += 1
            return build_failure_document(env, f"parser error: {e!r}")
        if type(log) is not AccessLog:
            self.failed += 1
            return build_failure_document(env, log.reason)  # type: ignore[union-attr]
        self.parsed += 1
        return build_document(env, log, self.resolver.resolve(log))
