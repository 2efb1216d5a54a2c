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


# Loggers of the Elasticsearch client that say something at INFO for every request
# ("POST http://...:9200/_bulk [status:200 duration:0.012s]"): hundreds of lines a
# minute that tell an operator nothing the metrics do not. Their INFO becomes DEBUG;
# their warnings (a node failing, a retry) stay.
CHATTY_INFO_LOGGERS = ("elastic_transport.transport", "elastic_transport.node_pool")


class DemoteInfo(logging.Filter):
    """Turns an INFO record into DEBUG, dropped unless DEBUG is enabled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO:
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
    for name in CHATTY_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DemoteInfo) for f in logger.filters):
            logger.addFilter(DemoteInfo())
