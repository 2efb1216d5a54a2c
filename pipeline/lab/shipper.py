"""A stand-in for Fluent Bit: tail a log file, produce each line to Kafka as Fluent Bit would.

Fluent Bit cannot be installed here, so this writes records in the exact shape of its
kafka output (`format json`, `timestamp_key @timestamp` as epoch seconds) after the
tail input with the CRI parser and the kubernetes filter: the runtime's fields
(`time`, `stream`, `_p`), the line in `log`, and the pod metadata in `kubernetes`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

from pipeline.kafka_log import kafka_logger
from pipeline.sinks.kafka import produce_waiting

DEFAULT_KUBERNETES: dict[str, Any] = {
    "pod_name": "istio-ingressgateway-7d9f8c6b5-x2x9k",
    "namespace_name": "istio-system",
    "pod_id": "0b1f3c1e-58a4-4d0e-9a52-1d5f3f3c9e21",
    "labels": {"app": "istio-ingressgateway", "istio": "ingressgateway"},
    "host": "ip-10-0-1-23.ec2.internal",
    "container_name": "istio-proxy",
    "docker_id": "4f1d5c0b8e0f",
    "container_image": "docker.io/istio/proxyv2:1.24.2",
}


def fluent_bit_record(
    line: str, ts: float | None = None, kubernetes: dict[str, Any] | None = None
) -> bytes:
    ts = time.time() if ts is None else ts
    frac = int((ts % 1) * 1e9)
    return orjson.dumps(
        {
            "@timestamp": ts,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{frac:09d}Z",
            "stream": "stdout",
            "_p": "F",
            "log": line,
            "kubernetes": kubernetes if kubernetes is not None else DEFAULT_KUBERNETES,
        }
    )


class FileShipper:
    """Follows a file from its start, producing every complete line; stop() drains."""

    def __init__(self, path: Path, bootstrap: str, topic: str,
                 conf: dict[str, Any] | None = None) -> None:
        """`conf`: more client settings (a secured cluster's, `client_config`)."""
        self.path = path
        self.topic = topic
        self.shipped = 0
        self.errors: list[str] = []
        self._producer = Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True,
             **(conf or {})},
            logger=kafka_logger(),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shipper", daemon=True)

    def start(self) -> FileShipper:
        self._thread.start()
        return self

    def _report(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def _run(self) -> None:
        with open(self.path, "rb") as f:
            pending = b""
            while True:
                chunk = f.read(1 << 16)
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if line.strip():
                            self._produce(fluent_bit_record(line.decode("utf-8", "replace")))
                    self._producer.poll(0)
                elif self._stop.is_set():
                    break
                else:
                    time.sleep(0.05)

    def _produce(self, value: bytes) -> None:
        produce_waiting(self._producer, self.topic, value, on_delivery=self._report)
        self.shipped += 1

    def stop(self) -> int:
        """Ship what is left, wait for every acknowledgement; returns lines shipped."""
        self._stop.set()
        self._thread.join()
        if self._producer.flush(30) != 0 or self.errors:
            raise RuntimeError(f"shipper: records not acknowledged: {self.errors[:3]}")
        return self.shipped
