"""The Redis rate backend going away under a running worker, against real services.

* A redis-server of the test's own (loopback, a free port, append-only file fsynced
  every write so a SIGKILL loses no count) is killed under a running worker for ~10 s
  and started again: the worker pauses fetching (one line), keeps the batch it was
  counting, resumes when Redis answers (one line) and every record is indexed exactly
  once, counted exactly once (the largest 300 s count is the number of records), with
  `envoygeo_rate_backend_unavailable` / `_retries` on /metrics; SIGTERM then exits 0.
* A Redis that stops answering (SIGSTOP) times out, is waited out the same way, and the
  script it ran after the worker gave up on its answer is not counted twice.
* SIGTERM while Redis is away: exit 0 at once, nothing past the indexed records committed.
* A batch whose answer is lost after Redis ran it (the connection drops between the
  script and its reply; redis-py and the worker both send it again) is not counted
  twice, and a re-sent alert claim that had won still wins (shared Redis on :6379).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from elasticsearch import Elasticsearch

from pipeline.enrich.rates.redis import RedisRates
from tests.integration.harness import (
    access_records,
    assert_exactly_once,
    count_docs,
    free_port,
    log_messages,
    produce,
    scrape_metric,
    setup_worker_env,
    start_worker,
    stop_worker,
    wait_for_committed,
    wait_for_count,
    write_config,
)

OUTAGE_S = 10.0


class OwnRedis:
    """redis-server on 127.0.0.1:<port>, data in `dir`; start/kill at will."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1",
             "--port", str(self.port), "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except redis.ConnectionError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def _worker(own_redis: OwnRedis, tmp_path: Path, kafka: str, es_url: str,
            unique: Callable[[str], str], query: str = "") -> dict[str, Any]:
    topic = unique("rout")
    w = {"topic": topic, "index": unique("rout-idx"), "group": f"{topic}-g",
         "mport": free_port(), "url": f"redis://127.0.0.1:{own_redis.port}/0{query}",
         "log": tmp_path / "worker.log", "base": time.time() - 60}
    cfg = write_config(tmp_path / "worker.yaml", bootstrap=kafka, es_url=es_url,
                       topic=topic, group=w["group"], index=w["index"],
                       extra={"rates": {"backend": "redis", "redis_url": w["url"]},
                              "metrics": {"port": w["mport"], "progress_interval_s": 2}})
    setup_worker_env(cfg)
    # Every record within one second of `base`: the 300 s count of the last sees all.
    produce(kafka, topic, access_records(200, base_ts=w["base"]))
    w["proc"] = start_worker(cfg, w["log"])
    return w


def _kill_under(w: dict[str, Any], own_redis: OwnRedis, kafka: str,
                es_client: Elasticsearch, sig: signal.Signals = signal.SIGKILL) -> float:
    """200 records indexed and committed, then Redis killed (or stopped) and 200 more
    produced; returns when the worker said the pause (seconds after the signal)."""
    worker, log = w["proc"], w["log"]
    assert wait_for_count(es_client, w["index"], 200, timeout_s=90, procs=[worker]) == 200
    assert wait_for_committed(kafka, w["group"], w["topic"], 200, timeout_s=30) == 200
    if sig == signal.SIGKILL:
        own_redis.kill()
    else:
        assert own_redis.proc is not None
        own_redis.proc.send_signal(sig)
    killed = time.monotonic()
    produce(kafka, w["topic"], access_records(200, start=200, base_ts=w["base"]))
    while not any(m.startswith("paused fetching: redis") for m in log_messages(log)):
        assert time.monotonic() - killed < 2 * OUTAGE_S, "no pause said"
        assert worker.poll() is None, f"worker exited with {worker.returncode}"
        time.sleep(0.2)
    return time.monotonic() - killed


def test_redis_killed_under_the_worker_pauses_and_resumes_exactly_once(
        own_redis: OwnRedis, tmp_path: Path, kafka_bootstrap: str, es_url: str,
        es_client: Elasticsearch, unique: Callable[[str], str]) -> None:
    w = _worker(own_redis, tmp_path, kafka_bootstrap, es_url, unique)
    worker, log, mport, index = w["proc"], w["log"], w["mport"], w["index"]
    try:
        paused_after = _kill_under(w, own_redis, kafka_bootstrap, es_client)
        killed = time.monotonic() - paused_after
        assert scrape_metric(mport, "envoygeo_rate_backend_unavailable") == 1
        assert scrape_metric(mport, "envoygeo_paused") == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=5) as r:
            assert "rate backend not answering" in r.read().decode()
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed)))
        assert worker.poll() is None, f"worker exited with {worker.returncode}"
        # Nothing of the held batch is indexed or committed while Redis is away.
        assert wait_for_committed(kafka_bootstrap, w["group"], w["topic"], 200,
                                  timeout_s=1) == 200
        own_redis.start()
        restarted = time.monotonic()
        assert wait_for_count(es_client, index, 400, timeout_s=60, procs=[worker]) == 400
        resumed_after = time.monotonic() - restarted
        assert scrape_metric(mport, "envoygeo_rate_backend_unavailable") == 0
        assert scrape_metric(mport, "envoygeo_rate_backend_retries_total") >= 1
        assert wait_for_committed(kafka_bootstrap, w["group"], w["topic"], 400,
                                  timeout_s=30) == 400
    finally:
        rc = stop_worker(worker)
    assert rc == 0, log.read_text()[-3000:]
    print(f"pause said {paused_after:.1f}s after the kill; 400 indexed "
          f"{resumed_after:.1f}s after the restart")
    assert_exactly_once(es_client, index, 400)
    # Counted exactly once: all 400 records are one client within one second.
    es_client.indices.refresh(index=index)
    top = es_client.search(index=index, size=1, sort=[{"envoygeo.rate.300s": "desc"}],
                           query={"match_all": {}})["hits"]["hits"][0]["_source"]
    assert top["envoygeo"]["rate"]["300s"] == 400
    messages = log_messages(log)
    pauses = [m for m in messages if m.startswith("paused fetching")]
    resumes = [m for m in messages if m.startswith("resumed fetching")]
    assert len(pauses) == 1 and len(resumes) == 1, pauses + resumes
    assert re.fullmatch(rf"paused fetching: redis: cannot use {re.escape(w['url'])}: "
                        r"ConnectionError: .+[^.]; retrying the batch \(not committed\) "
                        r"every 0\.5-5s until Redis answers", pauses[0]), pauses[0]
    assert re.fullmatch(r"resumed fetching: Redis answers again after \d+\.\ds paused",
                        resumes[0]), resumes[0]
    # Progress lines go on through the outage, saying the worker is paused.
    during = messages[messages.index(pauses[0]):messages.index(resumes[0])]
    assert any(m.startswith("progress: ") and ", paused" in m for m in during), during
    records = [orjson.loads(x) for x in log.read_bytes().splitlines() if x.startswith(b"{")]
    assert not [r for r in records if r["log.level"] in ("error", "critical")]
    assert "Traceback" not in log.read_text()


def test_sigterm_while_redis_is_away_exits_0_committing_nothing_more(
        own_redis: OwnRedis, tmp_path: Path, kafka_bootstrap: str, es_url: str,
        es_client: Elasticsearch, unique: Callable[[str], str]) -> None:
    w = _worker(own_redis, tmp_path, kafka_bootstrap, es_url, unique)
    worker = w["proc"]
    try:
        _kill_under(w, own_redis, kafka_bootstrap, es_client)
        worker.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        rc = worker.wait(30)
        took = time.monotonic() - signalled
    finally:
        if worker.poll() is None:
            worker.kill()
    assert rc == 0, w["log"].read_text()[-3000:]
    print(f"exited {took:.2f}s after SIGTERM")
    stopping = [m for m in log_messages(w["log"]) if m.startswith("stopping while Redis")]
    assert len(stopping) == 1 and stopping[0].endswith(
        "the batch being counted is not indexed; it and the records after it are read "
        "again at the next start"), stopping
    assert wait_for_committed(kafka_bootstrap, w["group"], w["topic"], 200,
                              timeout_s=1) == 200
    assert count_docs(es_client, w["index"]) == 200


def test_a_redis_that_stops_answering_times_out_and_a_lost_answer_is_not_recounted(
        own_redis: OwnRedis, tmp_path: Path, kafka_bootstrap: str, es_url: str,
        es_client: Elasticsearch, unique: Callable[[str], str]) -> None:
    """SIGSTOP: connections stay open and nothing answers, as in a partition. The batch
    times out (socket_timeout=1 in the URL; 10 s by default), the worker pauses; the
    script it had sent waits in the socket and runs when Redis continues (SIGCONT),
    after the client gave up on its answer, and the worker then sends the batch again:
    Redis ran more scripts than there were batches, yet every count is exact."""
    w = _worker(own_redis, tmp_path, kafka_bootstrap, es_url, unique, "?socket_timeout=1")
    worker, log = w["proc"], w["log"]
    assert own_redis.proc is not None
    try:
        _kill_under(w, own_redis, kafka_bootstrap, es_client, signal.SIGSTOP)
        time.sleep(1)
        own_redis.proc.send_signal(signal.SIGCONT)
        assert wait_for_count(es_client, w["index"], 400, timeout_s=60, procs=[worker]) == 400
        batches = scrape_metric(w["mport"], "envoygeo_batch_records_count")
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
        rc = stop_worker(worker)
    assert rc == 0, log.read_text()[-3000:]
    pauses = [m for m in log_messages(log) if m.startswith("paused fetching")]
    assert len(pauses) == 1 and "TimeoutError: Timeout reading from" in pauses[0], pauses
    scripts = redis.Redis(port=own_redis.port).info("commandstats")["cmdstat_evalsha"]["calls"]
    print(f"{scripts} scripts run for {batches:.0f} batches")
    assert scripts > batches  # an answer was lost and its batch sent again
    assert_exactly_once(es_client, w["index"], 400)
    es_client.indices.refresh(index=w["index"])
    top = es_client.search(index=w["index"], size=1, sort=[{"envoygeo.rate.300s": "desc"}],
                           query={"match_all": {}})["hits"]["hits"][0]["_source"]
    assert top["envoygeo"]["rate"]["300s"] == 400


class _LoseFirstAnswer:
    """The worker's side of an outage for `RedisRates.outage`, recording the calls."""

    def __init__(self) -> None:
        self.waits: list[str] = []
        self.recovered = 0

    def redis_unavailable(self, exc: BaseException, attempt: int) -> None:
        self.waits.append(type(exc).__name__)

    def redis_recovered(self) -> None:
        self.recovered += 1


@pytest.fixture
def shared(redis_url: str, unique: Callable[[str], str]) -> Iterator[tuple[redis.Redis, str]]:
    client = redis.Redis.from_url(redis_url)
    prefix = unique("envoygeo-out")
    yield client, prefix
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _lose_next_answer(backend: RedisRates) -> None:
    """The next script call runs in Redis, then fails as a dropped connection does: the
    answer is lost, the effect is not."""
    original = backend._script
    lost: list[bool] = []

    def flaky(*args: Any, **kw: Any) -> Any:
        answer = original(*args, **kw)
        if not lost:
            lost.append(True)
            raise redis.ConnectionError("Connection closed by server.")
        return answer

    backend._script = flaky  # type: ignore[assignment]


def test_a_batch_whose_answer_was_lost_is_not_counted_twice(
        shared: tuple[redis.Redis, str]) -> None:
    client, prefix = shared
    backend = RedisRates(client, key_prefix=prefix)
    outage = _LoseFirstAnswer()
    backend.outage = outage
    now = float(int(time.time()))
    assert backend.count_batch([("10.0.0.1", now)] * 3) == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    _lose_next_answer(backend)
    # Sent again after the lost answer: the same counts, not 4..6.
    assert backend.count_batch([("10.0.0.1", now)] * 3) == [(4, 4, 4), (5, 5, 5), (6, 6, 6)]
    assert outage.waits == ["ConnectionError"] and outage.recovered == 1
    assert backend.count_batch([("10.0.0.1", now)]) == [(7, 7, 7)]
    # One answer kept at a time (the latest batch's), expiring with the rate keys.
    done = list(client.scan_iter(match=f"{prefix}:b:*"))
    assert len(done) == 1 and 0 < client.ttl(done[0]) <= backend.ttl_s


def test_a_resent_alert_claim_that_won_still_wins(shared: tuple[redis.Redis, str]) -> None:
    client, prefix = shared
    mine, theirs = RedisRates(client, key_prefix=prefix), RedisRates(client, key_prefix=prefix)
    outage = _LoseFirstAnswer()
    mine.outage = outage
    real = client.pipeline
    lost = []

    def pipeline(*args: Any, **kw: Any) -> Any:
        pipe = real(*args, **kw)
        execute = pipe.execute

        def once() -> Any:
            result = execute()
            if not lost:
                lost.append(result)
                raise redis.ConnectionError("Connection closed by server.")
            return result

        pipe.execute = once  # type: ignore[method-assign]
        return pipe

    mine.client = type("C", (), {"pipeline": staticmethod(pipeline)})()  # type: ignore[assignment]
    assert mine.claim_alerts([("rule:1.2.3.4:1", 60), ("rule:5.6.7.8:1", 60)]) == [True, True]
    assert lost == [[None, None]] and outage.waits == ["ConnectionError"]
    assert theirs.claim_alerts([("rule:1.2.3.4:1", 60)]) == [False]


def test_refusals_are_not_retried(shared: tuple[redis.Redis, str]) -> None:
    """Authentication, ACL and TLS refusals raise at once; the connection's failures
    are retried."""
    import ssl

    from pipeline.enrich.rates.redis import retryable

    assert retryable(redis.ConnectionError("Error 111 connecting: Connection refused."))
    assert retryable(redis.TimeoutError("Timeout reading from socket"))
    assert retryable(redis.BusyLoadingError("Redis is loading the dataset in memory"))
    assert not retryable(redis.AuthenticationError("WRONGPASS invalid username-password"))
    assert not retryable(redis.ResponseError("NOPERM this user has no permissions"))
    tls = redis.ConnectionError("Error 1 connecting: certificate verify failed")
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_code, verify.verify_message = 10, "certificate has expired"
    tls.__cause__ = verify
    assert not retryable(tls)
    client, prefix = shared
    backend = RedisRates(client, key_prefix=prefix)
    outage = _LoseFirstAnswer()
    backend.outage = outage
    calls = []

    def fail() -> None:
        calls.append(1)
        raise redis.AuthenticationError("WRONGPASS invalid username-password pair")

    with pytest.raises(redis.AuthenticationError):
        backend._retrying(fail)
    assert calls == [1] and outage.waits == []
