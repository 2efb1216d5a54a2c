"""Structured JSON logs on stderr: one object per line, ready for the same log pipeline."""

from __future__ import annotations

import logging
import sys
import time

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "@timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "log.level": record.levelname.lower(),
            "log.logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["error.stack_trace"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


# Loggers of the Elasticsearch client, and the highest of their levels that becomes
# DEBUG (dropped unless DEBUG is on). `transport` says INFO for every request ("POST
# http://...:9200/_bulk [status:200 duration:0.012s]"): hundreds of lines a minute that
# tell an operator nothing the metrics do not. `node_pool` says WARNING for every failed
# request ("Node ... has failed for 7 times in a row") and again, as a WARNING, when the
# node answers: the sink says the failure itself, with its cause and with back-off, and
# the worker says when fetching pauses and resumes. Their errors stay.
DEMOTED_LOGGERS = {"elastic_transport.transport": logging.INFO,
                   "elastic_transport.node_pool": logging.WARNING}


class Demote(logging.Filter):
    """Turns a record up to `up_to` into DEBUG, dropped unless DEBUG is enabled."""

    def __init__(self, up_to: int) -> None:
        super().__init__()
        self.up_to = up_to

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.DEBUG < record.levelno <= self.up_to:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(level: str = "INFO", json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name, up_to in DEMOTED_LOGGERS.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, Demote)]:
            logger.removeFilter(old)
        logger.addFilter(Demote(up_to))
