"""Redis rate counters: exact across any number of workers sharing one Redis.

Layout: one hash per IP, ``<prefix>:r:<ip>``, whose fields are second-buckets (absolute
epoch seconds, decimal) -> count, plus field ``n`` = newest bucket seen for the IP.
Chosen over one key per (ip, bucket) because a 300 s window would then need up to 300
key reads per event; with a hash the script loads an IP once per batch (HGETALL), works
on a Lua table, and writes back only the touched fields (HSET/HDEL) and one EXPIRE.

One round trip per batch: a Lua script (EVALSHA, redis-py re-sends it on NOSCRIPT)
receives the whole batch. Scripts run atomically, so batches from many workers
interleave as wholes and every event sees exactly the events recorded before it: the
semantics in `pipeline.enrich.rates` hold fleet-wide, in the order Redis ran the
batches. Keys expire ``R + key_ttl_slack_s`` seconds after their last update, so idle
IPs cost nothing. All keys of a batch are passed in KEYS; on Redis Cluster that means a
hash-tagged prefix (one slot) or per-slot batches, which this module does not do.

Alert dedupe (`claim_alerts`) is a separate single pipeline of ``SET key 1 NX EX ttl``:
it only runs for events that newly cross a threshold, which the alert engine already
filters locally, so the counting path stays one round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis as redis_lib

from pipeline.enrich.rates import Counts, Event, RatesConfig

# KEYS[i] = hash of event i's IP; ARGV = nw, w1..wnw, R, lateness, ttl, t1..tn (buckets).
# Returns per event {c1..cnw, late}.
_LUA = r"""
local nw = tonumber(ARGV[1])
local W = {}
for w = 1, nw do W[w] = tonumber(ARGV[1 + w]) end
local R = tonumber(ARGV[nw + 2])
local LATE = tonumber(ARGV[nw + 3])
local TTL = tonumber(ARGV[nw + 4])
local base = nw + 4
local cache = {}
local order = {}
local out = {}
for i = 1, #KEYS do
  local k = KEYS[i]
  local t = tonumber(ARGV[base + i])
  local st = cache[k]
  if st == nil then
    local flat = redis.call('HGETALL', k)
    st = {n = nil, b = {}, dirty = {}}
    for j = 1, #flat, 2 do
      if flat[j] == 'n' then
        st.n = tonumber(flat[j + 1])
      else
        st.b[tonumber(flat[j])] = tonumber(flat[j + 1])
      end
    end
    cache[k] = st
    order[#order + 1] = k
  end
  local late = 0
  local n = st.n
  if n == nil or t > n then
    n = t
    st.n = t
    local cut = t - R
    for b, _ in pairs(st.b) do
      if b <= cut then
        st.b[b] = nil
        st.dirty[b] = true
      end
    end
  elseif t < n - LATE then
    late = 1
  end
  local res = {}
  if t > n - R then
    st.b[t] = (st.b[t] or 0) + 1
    st.dirty[t] = true
    for w = 1, nw do res[w] = 0 end
    for b, c in pairs(st.b) do
      local d = t - b
      if d >= 0 then
        for w = 1, nw do
          if d < W[w] then res[w] = res[w] + c end
        end
      end
    end
  else
    for w = 1, nw do res[w] = 1 end
  end
  res[nw + 1] = late
  out[i] = res
end
for _, k in ipairs(order) do
  local st = cache[k]
  local sets = {'n', st.n}
  local dels = {}
  for b, _ in pairs(st.dirty) do
    local c = st.b[b]
    if c then
      sets[#sets + 1] = b
      sets[#sets + 1] = c
    else
      dels[#dels + 1] = b
    end
  end
  redis.call('HSET', k, unpack(sets))
  if #dels > 0 then redis.call('HDEL', k, unpack(dels)) end
  redis.call('EXPIRE', k, TTL)
end
return out
"""


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

    @classmethod
    def from_config(cls, cfg: RatesConfig) -> RedisRates:
        return cls(
            redis_lib.Redis.from_url(cfg.redis_url),
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
        keys = [prefix + ip for ip, _ in events]
        args: list[int] = list(self._head)
        args.extend([int(ts // 1) for _, ts in events])
        raw = self._script(keys=keys, args=args)
        nw = len(self.windows)
        out: list[Counts] = []
        late: list[int] = []
        for i, row in enumerate(raw):
            out.append(tuple(row[:nw]))
            if row[nw]:
                late.append(i)
        self.events += len(events)
        self.late_events += len(late)
        self.batches += 1
        return out, late

    def claim_alerts(self, claims: Sequence[tuple[str, int]]) -> list[bool]:
        if not claims:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key, ttl in claims:
            pipe.set(self._alert_prefix + key, 1, nx=True, ex=max(1, int(ttl)))
        return [bool(r) for r in pipe.execute()]

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "events": self.events,
            "late_events": self.late_events,
            "batches": self.batches,
        }

    def close(self) -> None:
        self.client.close()
