"""Redis rate counters: exact across any number of workers sharing one Redis.

Layout: one string per IP, ``<prefix>:r:<ip>``, holding a msgpack array
``[s0, b1, c1, b2, c2, ...]``: second-buckets (absolute epoch seconds) ascending, each
with the IP's running total of events up to and including it, and ``s0`` the running
total before ``b1`` -- the same idea as the memory backend. A window count is then
``total(last bucket <= t) - total(last bucket <= t - W)``: two binary searches in Lua,
whatever the number of buckets. Rejected alternatives, measured: one key per (ip, bucket)
needs up to 300 reads per event for a 300 s window; a hash of bucket -> count needs
HGETALL + HSET + HDEL + EXPIRE per IP per batch and a Lua loop over every bucket per
event (16k events/s vs 43k on the same Zipf mix). Here each IP costs one GET and one
SET EX per batch, and (un)packing is done by the C cmsgpack library inside Redis.
In-order events append or bump the last total; an out-of-order event inserts its bucket
and adds one to the (at most lateness-many) later totals; advancing drops buckets
``<= t - R`` keeping the last one's total as the new ``s0``.

One round trip per batch: a Lua script (EVALSHA, redis-py re-sends it on NOSCRIPT)
receives the whole batch. Scripts run atomically, so batches from many workers
interleave as wholes and every event sees exactly the events recorded before it: the
semantics in `pipeline.enrich.rates` hold fleet-wide, in the order Redis ran the
batches. Keys expire ``R + key_ttl_slack_s`` seconds after their last update, so idle
IPs cost nothing. All keys of a batch are passed in KEYS; on Redis Cluster that means a
hash-tagged prefix (one slot) or per-slot batches, which this module does not do.

Alert dedupe (`claim_alerts`) is a separate single pipeline of ``SET key token NX GET EX
ttl``: it only runs for events that newly cross a threshold, which the alert engine
already filters locally, so the counting path stays one round trip.

Outages. A call that fails on the connection (refused, reset, timed out, Redis loading
its data) is handed to `outage` (the worker: it pauses fetching and backs off) and then
made again, for as long as `outage` lets it; refusals that will not heal
(authentication, ACL, TLS) are raised at once. Sending the same batch twice must not
count it twice, yet Redis may have run a script whose answer was lost with the
connection (redis-py itself also re-sends a command after a connection error). So each
batch carries an id (this client's random token and a sequence number): the script
keeps its answer under ``<prefix>:b:<id>`` and, for an id it has already run, returns
that answer instead of counting again. The next batch deletes the previous answer in
the same script (no extra round trip); a worker that dies leaves one behind, expiring
with the rate keys' TTL: past that the counts it protects have expired too. Alert
claims store the claimer's token, so a re-sent claim that already won still wins.
What is not covered: a batch counted and then read again from Kafka after the worker
restarted (crash, or stopped during an outage) is counted again, as any replayed
record is; at most the batches not yet committed, i.e. ``worker.max_inflight_batches``
+ 1 batches per restart.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import redis as redis_lib

from pipeline.enrich.rates import Counts, Event, RatesConfig

log = logging.getLogger(__name__)

# Lua's unpack() is limited to ~8000 values: a state holds at most 2 * R + 1.
MAX_RETENTION_S = 3900

# KEYS[i] = key of event i's IP, then the batch's answer key and the previous batch's;
# ARGV = nw, w1..wnw (ascending), R, lateness, ttl, "t1,t2,...,tn" (buckets). Returns
# "c1,..,cnw,late,c1,..." (nw + 1 numbers per event): one string each way, because
# building and parsing 500 nested RESP arrays in redis-py (without hiredis) cost more
# than the script itself.
_LUA = r"""
local nw = tonumber(ARGV[1])
local W = {}
for w = 1, nw do W[w] = tonumber(ARGV[1 + w]) end
local R = tonumber(ARGV[nw + 2])
local LATE = tonumber(ARGV[nw + 3])
local TTL = tonumber(ARGV[nw + 4])
local T = {}
for x in string.gmatch(ARGV[nw + 5], '[^,]+') do T[#T + 1] = tonumber(x) end

-- A = {s0, b1, c1, b2, c2, ...}: buckets ascending, c = running total up to that bucket,
-- s0 = running total before b1. Largest k with b_k <= x (0 when none):
local function upper(A, x)
  local lo, hi = 0, (#A - 1) / 2
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if A[2 * mid] <= x then lo = mid else hi = mid - 1 end
  end
  return lo
end

-- The last two KEYS: this batch's answer (an id already run answers again, uncounted)
-- and the previous batch's, now delivered, to drop.
local n = #KEYS - 2
local DONE = KEYS[n + 1]
redis.call('DEL', KEYS[n + 2])
local done = redis.call('GET', DONE)
if done then return done end

local cache = {}
local order = {}
local out = {}
for i = 1, n do
  local k = KEYS[i]
  local t = T[i]
  local A = cache[k]
  if A == nil then
    local raw = redis.call('GET', k)
    if raw then A = cmsgpack.unpack(raw) else A = {0} end
    cache[k] = A
    order[#order + 1] = k
  end
  local len = #A
  local late = 0
  local hi
  if len == 1 then
    A[2] = t
    A[3] = A[1] + 1
    hi = 1
  else
    local n = A[len - 1]
    if t > n then
      A[len + 1] = t
      A[len + 2] = A[len] + 1
      local kc = upper(A, t - R)
      if kc > 0 then
        -- the last forgotten bucket's total becomes the sentinel
        A = {A[2 * kc + 1], unpack(A, 2 * kc + 2)}
        cache[k] = A
      end
      hi = (#A - 1) / 2
    elseif t == n then
      A[len] = A[len] + 1
      hi = (len - 1) / 2
    else
      if t < n - LATE then late = 1 end
      if t <= n - R then
        hi = nil
      else
        local kk = upper(A, t)
        if kk > 0 and A[2 * kk] == t then
          for j = 2 * kk + 1, len, 2 do A[j] = A[j] + 1 end
          hi = kk
        else
          local prev = A[2 * kk + 1]  -- running total before t (A[1] when kk = 0)
          table.insert(A, 2 * kk + 2, t)
          table.insert(A, 2 * kk + 3, prev + 1)
          for j = 2 * kk + 5, len + 2, 2 do A[j] = A[j] + 1 end
          hi = kk + 1
        end
      end
    end
  end
  if hi == nil then
    -- forgotten horizon: counts only itself and is not recorded
    for w = 1, nw do out[#out + 1] = 1 end
  else
    local top = A[2 * hi + 1]
    for w = 1, nw do
      out[#out + 1] = top - A[2 * upper(A, t - W[w]) + 1]
    end
  end
  out[#out + 1] = late
end
for _, k in ipairs(order) do
  redis.call('SET', k, cmsgpack.pack(cache[k]), 'EX', TTL)
end
local answer = table.concat(out, ',')
redis.call('SET', DONE, answer, 'EX', TTL)
return answer
"""


T = TypeVar("T")


class Outage(Protocol):
    """Who decides how a connection failure is waited out (the worker)."""

    def redis_unavailable(self, exc: BaseException, attempt: int) -> None:
        """Back off before attempt `attempt + 1`; raise to give up (e.g. stopping)."""
        ...

    def redis_recovered(self) -> None:
        """The call that failed went through."""
        ...


def retryable(exc: BaseException) -> bool:
    """A failure that may heal by itself: the connection (refused, reset, timed out,
    Redis still loading). Authentication, ACL and TLS refusals will not: raised at once."""
    from pipeline.service_errors import tls_refusal

    return (isinstance(exc, (redis_lib.ConnectionError, redis_lib.TimeoutError))
            and not isinstance(exc, redis_lib.AuthenticationError)
            and tls_refusal(exc, None) is None)


_warned_unverified = False


def _warn_unverified(url: str, parsed: dict[str, Any]) -> None:
    """A rediss:// URL can turn verification off (`?ssl_cert_reqs=none`,
    `ssl_check_hostname=false`): allowed, as an explicit choice, and said once."""
    global _warned_unverified
    off = [f"{key}={parsed[key]}" for key in ("ssl_cert_reqs", "ssl_check_hostname")
           if key in parsed and parsed[key] in ("none", "optional", False)]
    if off and not _warned_unverified:
        from pipeline.config import url_without_password

        _warned_unverified = True
        log.warning("rates.redis_url turns TLS verification off (%s): the certificate of "
                    "%s is not verified (anyone on the path can read and change the "
                    "traffic)", ", ".join(off), url_without_password(url).split("?")[0])


def connect(cfg: RatesConfig, **options: Any) -> redis_lib.Redis:
    """The client for `rates.redis_url` plus what a URL cannot carry well: the password
    from `rates.redis_password_file`, the CA of a rediss:// server, default timeouts
    (5 s to connect, 10 s for an answer). Certificates are always verified (redis-py's
    default for rediss://). The backend, `run`'s start-up check and `check-config
    --connect` all connect here."""
    from redis.connection import parse_url

    from pipeline.config import read_secret

    _warn_unverified(cfg.redis_url, parse_url(cfg.redis_url))
    # Without timeouts a Redis that stops answering without closing the connection (a
    # partition, a stopped process) would block the worker forever; with them it is an
    # outage like any other (`retryable`). A batch's script takes milliseconds. The URL
    # may say otherwise (`?socket_timeout=30`: its query wins over these).
    options.setdefault("socket_connect_timeout", 5.0)
    options.setdefault("socket_timeout", 10.0)
    if cfg.redis_password_file is not None:
        options["password"] = read_secret(cfg.redis_password_file)
    if cfg.redis_ca_file is not None:
        options["ssl_ca_certs"] = str(cfg.redis_ca_file)
    return redis_lib.Redis.from_url(cfg.redis_url, **options)


class RedisRates:
    """See module docstring and `pipeline.enrich.rates` for the exact semantics."""

    def __init__(
        self,
        client: redis_lib.Redis,
        windows: Sequence[int] = (10, 60, 300),
        lateness_s: int = 60,
        key_prefix: str = "envoygeo",
        key_ttl_slack_s: int = 600,
    ) -> None:
        self.client = client
        self.windows: tuple[int, ...] = tuple(sorted(set(int(w) for w in windows)))
        self.lateness_s = int(lateness_s)
        self.retention_s = max(self.windows) + self.lateness_s
        if self.retention_s > MAX_RETENTION_S:
            raise ValueError(f"max window + lateness must be <= {MAX_RETENTION_S}s for redis")
        self.ttl_s = self.retention_s + int(key_ttl_slack_s)
        self.key_prefix = key_prefix
        self._rate_prefix = f"{key_prefix}:r:"
        self._alert_prefix = f"{key_prefix}:a:"
        self._script = client.register_script(_LUA)
        self._head = [
            len(self.windows),
            *self.windows,
            self.retention_s,
            self.lateness_s,
            self.ttl_s,
        ]
        self.events = 0
        self.late_events = 0
        self.batches = 0
        self.retries = 0
        self.outage: Outage | None = None
        # Batch ids: unique per client (workers share the Redis), stable across re-sends.
        self._token = secrets.token_hex(8)
        self._seq = 0
        self._done_prefix = f"{key_prefix}:b:{self._token}:"
        self._last_done = self._done_prefix + "0"

    @classmethod
    def from_config(cls, cfg: RatesConfig) -> RedisRates:
        return cls(
            connect(cfg),
            cfg.windows,
            cfg.lateness_s,
            cfg.key_prefix,
            cfg.key_ttl_slack_s,
        )

    def count_batch(self, events: Sequence[Event]) -> list[Counts]:
        return self.count_batch_detailed(events)[0]

    def count_batch_detailed(self, events: Sequence[Event]) -> tuple[list[Counts], list[int]]:
        if not events:
            return [], []
        prefix = self._rate_prefix
        self._seq += 1
        done = f"{self._done_prefix}{self._seq}"
        keys = [prefix + ip for ip, _ in events]
        keys.append(done)
        keys.append(self._last_done)
        args: list[int | str] = list(self._head)
        args.append(",".join([str(int(ts // 1)) for _, ts in events]))
        answer = self._retrying(lambda: self._script(keys=keys, args=args))
        self._last_done = done
        flat = list(map(int, answer.split(b",")))
        nw = len(self.windows)
        step = nw + 1
        out: list[Counts] = [tuple(flat[k : k + nw]) for k in range(0, len(flat), step)]
        late = [i for i, v in enumerate(flat[nw::step]) if v]
        self.events += len(events)
        self.late_events += len(late)
        self.batches += 1
        return out, late

    def claim_alerts(self, claims: Sequence[tuple[str, int]]) -> list[bool]:
        if not claims:
            return []
        self._seq += 1
        mine = f"{self._token}:{self._seq}".encode()

        def claim() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for key, ttl in claims:
                # GET: the value before; ours when a re-sent claim had already won.
                pipe.set(self._alert_prefix + key, mine, nx=True, ex=max(1, int(ttl)),
                         get=True)
            return pipe.execute()

        return [r is None or r == mine for r in self._retrying(claim)]

    def _retrying(self, call: Callable[[], T]) -> T:
        """`call()`, again after each connection failure while `outage` waits it out."""
        attempt = 0
        while True:
            try:
                result = call()
            except redis_lib.RedisError as exc:
                if self.outage is None or not retryable(exc):
                    raise
                self.outage.redis_unavailable(exc, attempt)
                attempt += 1
                self.retries += 1
                continue
            if attempt and self.outage is not None:
                self.outage.redis_recovered()
            return result

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "events": self.events,
            "late_events": self.late_events,
            "batches": self.batches,
            "retries": self.retries,
        }

    def close(self) -> None:
        self.client.close()
