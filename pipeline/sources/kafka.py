"""Kafka source: a consumer-group member with manual offset storage.

Auto-commit and auto offset store are off: the worker stores and commits an offset only
after every record below it is indexed or dead-lettered (DESIGN.md, delivery contract).
Assignment is cooperative-sticky, so a rebalance moves only the partitions that must
move and the others keep flowing.

Static membership (`kafka.static_membership`, on by default): the worker joins with a
stable `group.instance.id`, so after a crash its restart takes the dead member's place
and its partitions at once, instead of waiting out the dead member's session
(45 s at librdkafka's default). Measured with `envoygeo bench recovery` (figures below,
at RECOVERY_FIGURES).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import orjson
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from pipeline.config import KafkaSettings
from pipeline.kafka_log import LibrdkafkaLogger, kafka_logger
from pipeline.kafka_security import (
    SECURITY_GRACE_S,
    classify,
    describe_failure,
    librdkafka_security,
)
from pipeline.sources.instance_id import InstanceSlot, default_instance_id

log = logging.getLogger(__name__)

# RECOVERY_FIGURES -- `envoygeo bench recovery --variant ...` on the local single-node
# Kafka 4.1.1 + Elasticsearch 9.5.3, librdkafka 2.16.0, 500 records/s over 6 partitions,
# 2 shared cores (2026-12-02). Restart = kill -9, immediate restart, to the first indexed
# (committed) record, Python start-up included; stalls = longest stretch without any
# indexing progress (per partition in brackets); the steady baseline is ~1.1 s (commit
# pacing, kafka.commit_interval_ms).
#   classic, static (default)     restart median 1.01 s of 5 (0.95 1.14 1.00 1.34 1.01);
#                                 join 1.04 s (1.13), leave 1.05 s (1.39); again on the
#                                 final code: 1.28 s (1.22 1.13 1.77 1.28 1.69), join 1.07
#                                 (1.17), leave 1.11 (1.84); worker CPU 235 us/record
#   classic, dynamic, 45 s session restart median 45.25 s of 3 (45.23 45.49 45.25): the old
#                                 behaviour, the dead member's session timeout
#   classic, dynamic, 10 s session restart median 10.07 s of 3; join 1.04 (1.10), leave 1.08 (1.38)
#   consumer (KIP-848), dynamic   restart median 43.62 s of 3 (43.62 42.85 44.79): the dead
#                                 member keeps its partitions for the broker's
#                                 group.consumer.session.timeout.ms (45 s); join 1.47 (3.72),
#                                 leave 1.07 (4.79)
#   consumer (KIP-848), static    restart fails: the broker refuses an id a member that did
#                                 not leave still holds (UNRELEASED_INSTANCE_ID), which
#                                 librdkafka makes fatal, until that session expires (45 s)
# Hence classic + static membership by default; session.timeout.ms 10 s then only bounds
# how long a worker that is gone for good (kill -9, no restart) keeps its partitions.

# librdkafka refuses these with group.protocol=consumer: the broker owns them (KIP-848).
CLASSIC_ONLY = ("session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy",
                "group.protocol.type")

# Commit errors that mean "the group moved on to another generation": a rebalance is
# under way or just happened; the offsets stay pending and go out after it.
_GENERATION_ERRORS = frozenset({
    KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.UNKNOWN_MEMBER_ID, KafkaError.STALE_MEMBER_EPOCH,
    KafkaError.FENCED_MEMBER_EPOCH, KafkaError._ASSIGNMENT_LOST,
})


# After a commit refused for a past generation, asynchronous commits wait this long for
# the rebalance to end before being tried again (a cooperative rebalance takes ~1-2 s).
REBALANCE_HOLD_S = 3.0

# A wait for partitions this long gets one more line, with the likely reason.
STILL_WAITING_S = 15.0
# A fatal "fenced" this soon after the coordinator was out of reach is taken for the
# worker's own earlier membership (KafkaSource._own_fence), at most this many times in
# this window; beyond, it is a real duplicate member id and the worker exits.
SELF_FENCE_AFTER_DISRUPTION_S = 120.0
SELF_FENCE_REOPENS = 3
SELF_FENCE_WINDOW_S = 600.0


class KafkaFatalError(RuntimeError):
    """librdkafka reported a fatal error (e.g. this member was fenced): the consumer
    cannot continue; the message says why and what to change."""


class KafkaConfigError(ValueError):
    """A `kafka.*` setting librdkafka cannot use; the message names the key."""


class SecurityRefusals:
    """Handshake and authentication refusals (`pipeline.kafka_security.classify`),
    fatal once they have lasted SECURITY_GRACE_S with no sign of a working connection
    (an assignment, a fetched record or a confirmed commit clears them).

    Why not fatal at once: a broker that is being restarted or reconfigured may refuse
    a connection or two while it loads its users and certificates. Why fatal at all:
    librdkafka retries them forever (every 50 ms for a failed handshake), and a worker
    that hangs "waiting for partitions" hides a wrong password or CA from whoever
    deployed it; exiting with the cause makes it visible (CrashLoopBackOff, the log).
    """

    def __init__(self, settings: KafkaSettings, grace_s: float = SECURITY_GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings, self._grace, self._clock = settings, grace_s, clock
        self._first: float | None = None
        self._last = 0.0
        self._kind, self._text = "", ""

    @property
    def active(self) -> bool:
        return self._first is not None

    def seen(self, err: KafkaError) -> bool:
        """Note the error if it is a refusal; True if it was."""
        kind = classify(err, err.str())
        if kind is None:
            return False
        now = self._clock()
        if self._first is None or now - self._last > self._grace:
            self._first = now  # a new episode (an old one that stopped does not count)
        self._last, self._kind, self._text = now, kind, err.str()
        return True

    def clear(self) -> None:
        self._first = None

    def verdict(self) -> str | None:
        """The one-line reason to exit, once the refusals have lasted the grace."""
        if self._first is None or self._last - self._first < self._grace:
            return None
        return describe_failure(self._kind, self._settings, self._text,
                                self._last - self._first)

Partitions = list[TopicPartition]


class KafkaSource:
    def __init__(
        self,
        settings: KafkaSettings,
        on_revoke: Callable[[Partitions], None],
        on_assign: Callable[[Partitions], None] | None = None,
        on_stats: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self._slot: InstanceSlot | None = None
        if settings.static_membership:
            self._slot = (InstanceSlot(settings.group_instance_id, None)
                          if settings.group_instance_id
                          else default_instance_id(settings.group_id))
        self.instance_id = self._slot.instance_id if self._slot else None
        conf = consumer_config(settings, self.instance_id)
        if settings.statistics_interval_ms and on_stats is not None:
            conf["statistics.interval.ms"] = settings.statistics_interval_ms
            conf["stats_cb"] = lambda raw: on_stats(orjson.loads(raw))
        conf["on_commit"] = self._committed
        conf["error_cb"] = self._error
        self._on_revoke = on_revoke
        # Done offsets not yet confirmed committed (see commit_pending).
        self.pending: dict[tuple[str, int], int] = {}
        self._last_commit_attempt = 0.0
        # Set when a commit was refused because the group moved to a new generation;
        # cleared by the next rebalance callback or successful commit (see _committed).
        self._generation_gone = False
        self._refused_commits = 0
        self._refused_at = 0.0
        self._on_assign = on_assign
        self.assigned: set[tuple[str, int]] = set()
        self.paused = False
        self.fatal: str | None = None
        self._waiting_for: str | None = None
        self._waiting_since = 0.0
        self._waiting_long = False
        self._closing = False
        self._refused = SecurityRefusals(settings)
        # Self-fencing (see SELF_FENCE_AFTER_DISRUPTION_S): when the coordinator was last
        # out of reach, and when this consumer was reopened because of it.
        self._disrupted_at = -math.inf
        self._reopens: list[float] = []
        self._reopen_reason: str | None = None
        self._conf = conf
        # Fatal errors reach `_error`, which says what happened and what to change
        # in one line; librdkafka's own line for them would only repeat it. So do
        # refused handshakes and credentials (SecurityRefusals).
        self._rdlog = LibrdkafkaLogger(reported={"FATAL"}, security_reported=True)
        self._open()
        self._wait("joining group " + self.describe_membership())

    def _open(self) -> None:
        """A consumer with this source's settings, subscribed (at start, and when a
        consumer fenced by its own earlier membership is replaced)."""
        try:
            self.consumer = Consumer(self._conf, logger=self._rdlog)
        except Exception as exc:
            self.release_instance_id()
            raise KafkaConfigError(f"kafka.librdkafka / kafka.group_protocol: {exc}") from exc
        s = self.settings
        topics = [s.topic_pattern] if s.topic_pattern else s.topics
        self.consumer.subscribe(
            topics, on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lost
        )

    def describe_membership(self) -> str:
        s = self.settings
        member = (f"static member id {self.instance_id}" if self.instance_id
                  else "dynamic member")
        return f"{s.group_id} ({member}, {s.group_protocol} protocol)"

    # -- waiting for partitions: said once per state, not per poll --

    def _wait(self, why: str) -> None:
        if self._closing:
            return  # leaving on purpose: nothing to wait for
        if why != self._waiting_for:
            self._waiting_for, self._waiting_since = why, time.monotonic()
            self._waiting_long = False
            log.info("waiting for partitions: %s", why)

    def _still_waiting(self) -> None:
        """Once per state, if the wait is long: the likely reason, which the worker
        cannot see directly (a rebalance waits for every member the broker still
        counts, including one that died without leaving)."""
        if (self._waiting_for is None or self._waiting_long
                or time.monotonic() - self._waiting_since < STILL_WAITING_S
                or not self._waiting_for.startswith(("joining", "rebalancing", "session"))):
            return  # an idle member (no partition for it) or no broker: said already
        self._waiting_long = True
        s = self.settings
        session = (f"kafka.session_timeout_ms, {s.session_timeout_ms} ms"
                   if s.group_protocol == "classic"
                   else "the broker's group.consumer.session.timeout.ms")
        log.warning("still waiting for partitions after %.0fs: %s; a member that died "
                    "without leaving holds its partitions until its session expires (%s)%s",
                    time.monotonic() - self._waiting_since, self._waiting_for, session,
                    "" if self.instance_id else
                    "; with kafka.static_membership a restarted worker takes them back at once")

    def _waiting_done(self) -> None:
        if self._waiting_for is not None:
            log.info("partitions assigned after %.1fs of %s",
                     time.monotonic() - self._waiting_since, self._waiting_for)
            self._waiting_for = None

    def _error(self, err: KafkaError) -> None:
        """librdkafka's error callback (served inside poll/consume on this thread)."""
        if err.fatal() or err.code() == KafkaError._FATAL:
            if not self._own_fence(err):
                self.fatal = _fatal_message(err, self.settings, self.instance_id)
        elif self._refused.seen(err):
            pass  # reported once, by _check_refused, if it lasts
        elif err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT,
                            KafkaError._RESOLVE):
            self._disrupted_at = time.monotonic()
            if not self.assigned and not self._refused.active:
                # The details are in librdkafka's own (repeat-filtered) log lines; the
                # state is the same whichever broker or error text this one names.
                self._wait(f"cannot reach Kafka at {self.settings.bootstrap_servers}")
        else:  # through librdkafka's repeat filter: an error can recur many times a second
            self._rdlog.log(logging.WARNING, "%s [%s] %s", "ERROR", "consumer", err.str())

    # -- rebalance callbacks (run inside poll/consume, on the worker thread) --

    def _assign(self, consumer: Consumer, partitions: Partitions) -> None:
        self._refused.clear()  # the group coordinator answered: the connection works
        self._rebalanced()
        self.assigned.update((tp.topic, tp.partition) for tp in partitions)
        log.info("assigned %s", _names(partitions))
        if self.assigned:
            self._waiting_done()
        else:
            self._wait(f"group {self.settings.group_id} gave this member no partition "
                       "(more workers than partitions?)")
        if self.paused and partitions:
            # New partitions must obey the current backpressure state.
            consumer.pause(partitions)
        if self._on_assign:
            self._on_assign(partitions)

    def _revoke(self, consumer: Consumer, partitions: Partitions) -> None:
        # Still within the generation that owns them: flush and commit now, so the
        # next owner starts where this one stopped.
        self._rebalanced()
        log.info("revoking %s: flushing and committing first", _names(partitions))
        self._on_revoke(partitions)
        self._forget(partitions)
        if not self.assigned:
            self._wait("rebalancing group " + self.describe_membership())

    def _lost(self, consumer: Consumer, partitions: Partitions) -> None:
        # Lost (session expired): another member may already own them, so committing
        # would be wrong; the replays this causes overwrite by document id.
        log.warning("lost %s (session expired); not committing them", _names(partitions))
        self._disrupted_at = time.monotonic()
        self._forget(partitions)
        if not self.assigned:
            self._wait("session lost, rejoining group " + self.describe_membership())

    def _forget(self, partitions: Partitions) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.assigned.discard(key)
            self.pending.pop(key, None)  # the new owner commits from here on

    # -- fenced by its own earlier membership --

    def _own_fence(self, err: KafkaError) -> bool:
        """Whether a fatal 'fenced' is most likely this worker's own doing, to be healed
        by reopening the consumer (done by `_check_refused`, outside the callback).

        A static member can be fenced by itself: once the group coordinator was out of
        reach (a broker restart), its session expires, librdkafka rejoins with the same
        group.instance.id and a new member id, and a commit or heartbeat still carrying
        the old member id is answered FENCED_INSTANCE_ID, which librdkafka makes fatal
        (librdkafka issue #3437; here in 1 of 4 broker restarts under load). So right
        after such a disruption the consumer is reopened with the same id instead of
        exiting. A real duplicate (two workers given one id) fences again and again; after
        SELF_FENCE_REOPENS reopens within SELF_FENCE_WINDOW_S the worker exits as before.
        """
        text = err.str().lower()
        if not self.instance_id or not ("fenced" in text
                                        or err.code() == KafkaError.FENCED_INSTANCE_ID):
            return False
        now = time.monotonic()
        if now - self._disrupted_at > SELF_FENCE_AFTER_DISRUPTION_S:
            return False
        self._reopens = [t for t in self._reopens if now - t < SELF_FENCE_WINDOW_S]
        if len(self._reopens) >= SELF_FENCE_REOPENS:
            return False
        self._reopen_reason = err.str()
        return True

    def _reopen(self) -> None:
        log.warning("fenced by this worker's own earlier membership of group %s (static "
                    "member id %r) after Kafka was out of reach %.0fs ago: reopening the "
                    "consumer with the same id (%d of %d within %.0fs) [librdkafka: %s]",
                    self.settings.group_id, self.instance_id,
                    time.monotonic() - self._disrupted_at, len(self._reopens) + 1,
                    SELF_FENCE_REOPENS, SELF_FENCE_WINDOW_S, self._reopen_reason)
        self._reopens.append(time.monotonic())
        self._reopen_reason = None
        self._closing = True  # no 'waiting for partitions' lines from the old consumer
        try:
            self.consumer.close()
        except Exception as exc:  # noqa: BLE001 - it is fenced; only its resources matter
            log.debug("closing the fenced consumer: %s", exc)
        finally:
            self._closing = False
        self.assigned.clear()  # records of the old consumer are re-read by the new owner
        self._generation_gone = False
        self._open()
        self._wait("rejoining group " + self.describe_membership())

    # -- fetching --

    def poll_batch(self, max_records: int, max_bytes: int, timeout_s: float,
                   wake: Callable[[], bool] | None = None) -> list[Message]:
        """Up to max_records / max_bytes, waiting at most timeout_s; errors are logged.

        The wait is cut into short slices. While nothing has arrived, `wake()` is asked
        between slices: the worker returns early when a bulk has finished, so its offsets
        are committed within ~50 ms instead of after the whole wait (at the end of a
        backlog that delay was the last commit's latency).
        """
        if self._waiting_for is not None:
            self._still_waiting()
        batch: list[Message] = []
        size = 0
        remaining = max_records
        slices = max(4, math.ceil(timeout_s / 0.05))  # a slow trickle still meets the bound
        for _ in range(slices):
            msgs = self.consumer.consume(remaining, timeout_s / slices)
            if self._check_refused(bool(msgs)):
                continue  # reopened: what the fenced consumer returned is not ours
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.fatal() or err.code() == KafkaError._FATAL:
                        if self._own_fence(err):
                            self._reopen()
                            break
                        self.fatal = self.fatal or _fatal_message(
                            err, self.settings, self.instance_id)
                        raise KafkaFatalError(self.fatal)
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", err)
                    continue
                batch.append(msg)
                size += len(msg.value() or b"")
            remaining = max_records - len(batch)
            if remaining <= 0 or size >= max_bytes or (msgs and len(msgs) < remaining):
                break
            if not batch and wake is not None and wake():
                break
        if batch and any((m.topic(), m.partition()) not in self.assigned for m in batch):
            # A revoke ran inside consume(): records of partitions we no longer own belong
            # to their new owner, which will read them from the committed offset.
            batch = [m for m in batch if (m.topic(), m.partition()) in self.assigned]
        return batch

    def pause(self) -> None:
        if not self.paused:
            self.consumer.pause(self._assigned_partitions())
            self.paused = True  # the worker says why, when it is worth saying

    def resume(self) -> None:
        if self.paused:
            self.consumer.resume(self._assigned_partitions())
            self.paused = False

    def serve(self, timeout_s: float) -> None:
        """Serve callbacks (rebalances, stats) without taking records while paused."""
        msgs = self.consumer.consume(1, timeout_s)
        if self._check_refused(bool(msgs)):
            return  # reopened: nothing of the fenced consumer's to seek back to
        for msg in msgs:
            # Paused partitions deliver nothing; anything here arrived before the pause
            # and must not be skipped, so seek back to it.
            if msg.error() is None:
                self.consumer.seek(TopicPartition(
                    cast(str, msg.topic()), cast(int, msg.partition()),
                    cast(int, msg.offset())))  # set on every fetched record

    def _check_refused(self, answered: bool) -> bool:
        """Raise KafkaFatalError for a fatal error or for security refusals that
        outlasted their grace; anything fetched proves the connection works. Returns
        True when the consumer was reopened (fenced by its own earlier membership)."""
        if answered:
            self._refused.clear()
        if self.fatal is None:
            self.fatal = self._refused.verdict()
        if self.fatal is not None:
            raise KafkaFatalError(self.fatal)
        if self._reopen_reason is not None:
            self._reopen()
            return True
        return False

    def _assigned_partitions(self) -> Partitions:
        return [TopicPartition(t, p) for t, p in sorted(self.assigned)]

    # -- offsets --

    def mark_done(self, offsets: dict[tuple[str, int], int]) -> None:
        """Record that everything below these offsets is indexed or dead-lettered."""
        pending = self.pending
        for key, off in offsets.items():
            if off > pending.get(key, -1):
                pending[key] = off

    def commit_pending(self, asynchronous: bool) -> None:
        """Store and commit the done offsets not yet known to be committed.

        An offset leaves `pending` only when Kafka confirms it (the commit call for a
        synchronous commit, `_committed` for an asynchronous one), so a commit lost in
        a rebalance or a broker hiccup is sent again on a later call instead of being
        forgotten, even if no new record ever arrives for that partition.
        """
        self._last_commit_attempt = time.monotonic()
        if self.fatal is not None:
            return  # fenced: this member's commits would all be refused
        if (asynchronous and self._generation_gone
                and self._last_commit_attempt - self._refused_at < REBALANCE_HOLD_S):
            # A commit was just refused for a past generation: a rebalance is under
            # way. Sending more would only be refused too (the burst of 37 warnings in
            # 1 ms); the revoke callback commits synchronously, the rest waits for the
            # rebalance to end (a callback), or is retried after REBALANCE_HOLD_S in
            # case this member's callbacks had nothing to say.
            return
        tps = [TopicPartition(t, p, off) for (t, p), off in self.pending.items()
               if (t, p) in self.assigned]
        if not tps:
            return
        try:
            self.consumer.store_offsets(offsets=tps)
            if asynchronous:
                self.consumer.commit(offsets=tps, asynchronous=True)
            else:
                self._confirm(self.consumer.commit(offsets=tps, asynchronous=False) or [])
        except Exception as exc:  # e.g. during a rebalance: retried on a later call
            err = (exc.args[0] if isinstance(exc, KafkaException) and exc.args
                   and isinstance(exc.args[0], KafkaError) else None)
            if err is not None and err.code() in _GENERATION_ERRORS:
                self._generation_refused(err, len(tps))
            else:
                log.warning("commit of %s failed (will retry): %s", _names(tps), exc)

    def commit_due(self) -> bool:
        """Something is pending and the last attempt is `commit_interval_ms` old.

        The same interval paces new commits and retries of unconfirmed ones: every
        commit is a write to `__consumer_offsets` (measured at ~4 ms of broker CPU for
        six partitions), so committing after each 2000-record batch cost the broker
        ~2 us per record.
        """
        return bool(self.pending) and (
            time.monotonic() - self._last_commit_attempt
            >= self.settings.commit_interval_ms / 1000.0)

    def _committed(self, err: KafkaError | None, partitions: Partitions) -> None:
        # librdkafka's commit callback, served inside poll/consume on this thread.
        if err is not None:
            if err.code() in _GENERATION_ERRORS:
                self._generation_refused(err, len(partitions))
            elif err.code() != KafkaError._NO_OFFSET:
                log.warning("commit failed (will retry): %s", err)
            return
        self._refused.clear()
        self._rebalanced()
        self._confirm(partitions)

    def _generation_refused(self, err: KafkaError, partitions: int) -> None:
        """A commit sent for a generation the group has left: said once per rebalance."""
        self._refused_commits += 1
        self._refused_at = time.monotonic()
        if not self._generation_gone:
            self._generation_gone = True
            log.info(  # what a rebalance does, not a fault: said once, at INFO
                "group %s is rebalancing (%s): offsets of %d partition(s) kept and "
                "committed after the rebalance, by their owner; further refusals until "
                "then are not logged", self.settings.group_id, err.name(), partitions)

    def _rebalanced(self) -> None:
        """A new generation is in place (a rebalance callback ran or a commit passed)."""
        if self._generation_gone:
            log.info("rebalance done: %d commit(s) had been refused meanwhile",
                     self._refused_commits)
        self._generation_gone = False
        self._refused_commits = 0

    def _confirm(self, partitions: Partitions) -> None:
        pending = self.pending
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if tp.error is None and key in pending and tp.offset >= pending[key]:
                del pending[key]

    def close(self) -> None:
        """Leave the group and close. A static member of a classic group does not leave
        on close (KIP-345), so its partitions would sit unowned for the whole session
        timeout after a scale-down or a rolling update to new pod names; unsubscribing
        first makes librdkafka send LeaveGroup (the revoke callback flushes and commits
        first), and the survivors take the partitions over at once."""
        self._closing = True
        try:
            classic = self.settings.group_protocol == "classic"
            if self.fatal is None and self.instance_id and classic:
                try:
                    self.consumer.unsubscribe()
                    deadline = time.monotonic() + 5
                    while self.assigned and time.monotonic() < deadline:
                        self.consumer.consume(1, 0.1)  # serves the revoke; sends LeaveGroup
                except KafkaException as exc:  # closing anyway; the session will expire
                    log.warning("could not leave group %s: %s", self.settings.group_id, exc)
            self.consumer.close()
        finally:
            self.release_instance_id()

    def release_instance_id(self) -> None:
        if self._slot is not None:
            self._slot.release()


# Answers about a group's coordinator that mean "ask again shortly".
_COORDINATOR_BUSY = frozenset({KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
                               KafkaError.COORDINATOR_LOAD_IN_PROGRESS})


def committed(consumer: Consumer, tps: list[TopicPartition],
              timeout_s: float = 30) -> list[TopicPartition]:
    """`consumer.committed(tps)`, asked again while the group's coordinator is still
    being elected or loading (a new group on a fresh broker: NOT_COORDINATOR,
    COORDINATOR_LOAD_IN_PROGRESS), until `timeout_s`; anything else raises at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            left = max(deadline - time.monotonic(), 0.1)
            return list(consumer.committed(tps, timeout=left))
        except KafkaException as exc:
            if exc.args[0].code() not in _COORDINATOR_BUSY or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


class CommittedOffsets:
    """A group's committed offsets on a topic, read as often as needed over one client
    (for tests and benchmarks: building a client per reading is what costs, on both
    sides of the connection, and a benchmark's own load is measured with the rest)."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int = 6,
                 conf: dict[str, Any] | None = None) -> None:
        """`conf`: more client settings (a secured cluster's, `client_config`)."""
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                   **(conf or {})}, logger=kafka_logger())
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]

    def per_partition(self, timeout_s: float = 30) -> list[int]:
        """The committed offset of each partition (0 where nothing is committed yet)."""
        return [max(tp.offset, 0) for tp in committed(self._consumer, self._tps, timeout_s)]

    def total(self, timeout_s: float = 30) -> int:
        """How many records the group has finished (the topic started at offset 0)."""
        return sum(self.per_partition(timeout_s))

    def close(self) -> None:
        self._consumer.close()


def committed_total(bootstrap: str, group: str, topic: str, partitions: int = 6,
                    timeout_s: float = 30) -> int:
    """One reading of `CommittedOffsets.total`."""
    offsets = CommittedOffsets(bootstrap, group, topic, partitions)
    try:
        return offsets.total(timeout_s)
    finally:
        offsets.close()


def record_times(msgs: Iterable[Message]) -> list[float | None]:
    """Each record's Kafka timestamp in epoch seconds (producer CreateTime or broker
    LogAppendTime, as the topic says); None where the broker has none.

    The `@timestamp` of a record whose line and envelope carry no time: when it was
    produced is the best bound on when it happened that Kafka knows.
    """
    out: list[float | None] = []
    append = out.append
    for msg in msgs:
        kind, ms = msg.timestamp()
        # A producer may set any int64: outside 1970..9999 it is no time at all.
        append(ms / 1000 if kind != TIMESTAMP_NOT_AVAILABLE and 0 <= ms <= _LAST_MS
               else None)
    return out


_LAST_MS = 253402300799999  # 9999-12-31T23:59:59.999Z, the last `@timestamp` we write


def consumer_config(settings: KafkaSettings, instance_id: str | None) -> dict[str, Any]:
    """librdkafka settings of the worker's consumer for this protocol and member id."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": settings.auto_offset_reset,
        # Fetch sizes follow the batch bound so one fetch fills a batch.
        "fetch.max.bytes": max(settings.batch_max_bytes, 1024 * 1024),
        "max.partition.fetch.bytes": max(settings.batch_max_bytes // 2, 1024 * 1024),
        # Bounds the pre-fetch queue, so memory stays flat while the sink is down.
        "queued.max.messages.kbytes": max(2 * settings.batch_max_bytes // 1024, 4096),
    }
    if instance_id:
        conf["group.instance.id"] = instance_id
    conf.update(librdkafka_security(settings.security))
    if settings.group_protocol == "consumer":
        conf["group.protocol"] = "consumer"
        clash = sorted(k for k in settings.librdkafka if k in CLASSIC_ONLY)
        if clash:
            raise KafkaConfigError(
                f"kafka.librdkafka: {', '.join(clash)} cannot be set with "
                "kafka.group_protocol: consumer (the broker owns them under KIP-848)")
    else:
        conf.update({
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": settings.session_timeout_ms,
            # Members of a classic group learn of a rebalance from a heartbeat reply,
            # and a cooperative rebalance takes two rounds: at librdkafka's default
            # (3 s) a second worker joining left half the partitions unowned for ~3 s
            # (measured in `bench e2e`). One heartbeat a second per member is nothing
            # to a broker.
            "heartbeat.interval.ms": 1000,
        })
    conf.update(settings.librdkafka)
    return conf


def _fatal_message(err: KafkaError, settings: KafkaSettings, instance_id: str | None) -> str:
    """One line saying what happened and what to change (the worker exits with it)."""
    text = err.str()
    low = text.lower()
    if "instance id is still used" in low or err.code() == KafkaError.UNRELEASED_INSTANCE_ID:
        # KIP-848 (group_protocol consumer): a static member that died without leaving
        # keeps its id until the broker's session timeout; librdkafka makes this fatal.
        return (f"static member id {instance_id!r} of group {settings.group_id} is still "
                "held by a member that did not leave (a crashed worker, until the broker's "
                "group.consumer.session.timeout.ms passes, or a live worker with the same "
                "kafka.group_instance_id); exiting so that a restart can retry "
                "(kafka.group_protocol: classic takes the id over at once) "
                f"[librdkafka: {text}]")
    if "fenced" in low or err.code() == KafkaError.FENCED_INSTANCE_ID:
        return (f"fenced: another worker joined group {settings.group_id} with the same "
                f"static member id {instance_id!r}, so this one must stop; give each worker "
                f"its own kafka.group_instance_id (ENVOYGEO_KAFKA__GROUP_INSTANCE_ID) "
                f"[librdkafka: {text}]")
    return f"fatal Kafka consumer error in group {settings.group_id}: {text}"


def _names(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
