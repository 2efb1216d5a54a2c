"""Redis rate counters: exact across any number of workers sharing one Redis.

Layout: one string per IP, ``<prefix>:r:<ip>`` = ``"n,b1,c1,b2,c2,..."`` (n = newest
bucket seen for the IP, then second-buckets in absolute epoch seconds and their counts,
unordered). Chosen over one key per (ip, bucket) because a 300 s window would then need
up to 300 key reads per event, and over a hash per IP because a hash costs HGETALL +
HSET + HDEL + EXPIRE per IP per batch while the string costs GET + SET EX: inside a
script each redis.call has a fixed cost that dominated batches of mostly distinct IPs.
The script loads each IP once per batch, works on a Lua table, and writes it back once.

Within a batch the script remembers each IP's previous event's window counts and slides
them (same second: +1; a few seconds later: subtract the buckets that left, add the
ones that entered, when that touches fewer buckets than a recount) instead of re-summing
up to R buckets per event, which is what made hot IPs expensive. Out-of-order events fall back to a full recount of that IP.

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

# KEYS[i] = key of event i's IP; ARGV = nw, w1..wnw (ascending), R, lateness, ttl,
# "t1,t2,...,tn" (buckets). Returns "c1,..,cnw,late,c1,..." (nw + 1 numbers per event):
# one string each way, because building and parsing 500 nested RESP arrays in redis-py
# (without hiredis) cost more than the script itself.
_LUA = r"""
local nw = tonumber(ARGV[1])
local W = {}
for w = 1, nw do W[w] = tonumber(ARGV[1 + w]) end
local R = tonumber(ARGV[nw + 2])
local LATE = tonumber(ARGV[nw + 3])
local TTL = tonumber(ARGV[nw + 4])
local T = {}
for x in string.gmatch(ARGV[nw + 5], '[^,]+') do T[#T + 1] = tonumber(x) end
local cache = {}
local order = {}
local out = {}
for i = 1, #KEYS do
  local k = KEYS[i]
  local t = T[i]
  local st = cache[k]
  if st == nil then
    st = {n = nil, b = {}, mt = nil, mc = nil, nb = 0}
    local raw = redis.call('GET', k)
    if raw then
      local pend = nil
      for x in string.gmatch(raw, '[^,]+') do
        local v = tonumber(x)
        if st.n == nil then
          st.n = v
        elseif pend == nil then
          pend = v
        else
          st.b[pend] = v
          st.nb = st.nb + 1
          pend = nil
        end
      end
    end
    cache[k] = st
    order[#order + 1] = k
  end
  local late = 0
  local n = st.n
  local mc = st.mc
  if n ~= nil and t <= n - R then
    -- forgotten horizon: counts only itself, is not recorded, memo untouched
    if t < n - LATE then late = 1 end
    for w = 1, nw do out[#out + 1] = 1 end
  else
    local b = st.b
    local mt = st.mt
    local advance = (n == nil or t > n)
    if not advance and t < n - LATE then late = 1 end
    local old = b[t]
    if old then
      b[t] = old + 1
    else
      b[t] = 1
      st.nb = st.nb + 1
    end
    if mt ~= nil and t == mt then
      -- same second as this IP's previous event: every window gains exactly this event
      for w = 1, nw do mc[w] = mc[w] + 1 end
    elseif mt ~= nil and t > mt and 2 * (t - mt) <= st.nb then
      -- slide the previous event's windows when that touches fewer buckets than a
      -- recount would (and before pruning touches old buckets)
      for w = 1, nw do
        local s = mc[w]
        local ww = W[w]
        for x = mt - ww + 1, t - ww do s = s - (b[x] or 0) end
        for x = mt + 1, t do s = s + (b[x] or 0) end
        mc[w] = s
      end
    else
      mc = {}
      for w = 1, nw do mc[w] = 0 end
      for x, c in pairs(b) do
        local d = t - x
        if d >= 0 then
          for w = 1, nw do
            if d < W[w] then mc[w] = mc[w] + c end
          end
        end
      end
      st.mc = mc
    end
    st.mt = t
    if advance then
      st.n = t
      local cut = t - R
      for x, _ in pairs(b) do
        if x <= cut then
          b[x] = nil
          st.nb = st.nb - 1
        end
      end
    end
    for w = 1, nw do out[#out + 1] = mc[w] end
  end
  out[#out + 1] = late
end
for _, k in ipairs(order) do
  local st = cache[k]
  local parts = {st.n}
  for x, c in pairs(st.b) do
    parts[#parts + 1] = x
    parts[#parts + 1] = c
  end
  redis.call('SET', k, table.concat(parts, ','), 'EX', TTL)
end
return table.concat(out, ',')
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
        args: list[int | str] = list(self._head)
        args.append(",".join([str(int(ts // 1)) for _, ts in events]))
        flat = list(map(int, self._script(keys=keys, args=args).split(b",")))
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
