"""The limiter's windows in Redis, shared by every process that uses one API key.

Each window is a sorted set of `token|cost` members scored by the time they
were admitted, with a running total beside it (`…:sum`), so that a call costs
the same whether the window holds ten entries or a million; one Lua script
purges, decides and admits for all windows at once, on the Redis server's
clock, so that processes on different hosts agree. The key part is a hash of
the API key, never the key itself.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..lua import Script
from ..redis_link import Client, RedisLink, Stop
from . import SAFETY_MS, Verdict, Window

# KEYS: one sorted set per window, then the running total of each, then the
# pause key. ARGV: dry run (0/1), limit and span ms per window, then per
# request its token and its cost in each window. Requests are admitted in
# order while they fit; the first that does not gets the answer. Returns
# {admitted, wait ms, window index (0-based, -1 none), paused (0/1)}, where
# wait ms is 0 when all were admitted (or, in a dry run, would be) and -1
# when the first request not admitted can never fit.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = (#KEYS - 1) / 2
local paused = redis.call('PTTL', KEYS[2 * n + 1])
if paused > 0 then return {0, paused, -1, 1} end
local function cost_of(member) return tonumber(string.match(member, '|(%d+)$')) end
-- What a window holds now: its running total less what has aged out, which
-- is removed. Without a total (first use, or one older than this layout)
-- the set is counted once.
local function used(i, span)
  local zset, sum = KEYS[i], KEYS[n + i]
  local total = redis.call('GET', sum)
  local expired = redis.call('ZRANGEBYSCORE', zset, '-inf', now - span)
  redis.call('ZREMRANGEBYSCORE', zset, '-inf', now - span)
  if not total then
    total = 0
    for _, member in ipairs(redis.call('ZRANGE', zset, 0, -1)) do
      total = total + cost_of(member)
    end
    redis.call('SET', sum, total, 'PX', span + 1000)
    return total
  end
  total = tonumber(total)
  if #expired > 0 then
    for _, member in ipairs(expired) do total = total - cost_of(member) end
    redis.call('SET', sum, total, 'KEEPTTL')
  end
  return total
end
-- When a window is full: how long until the oldest entries free `need`.
local function wait_for(zset, span, need)
  local freed, first = 0, 0
  while true do
    local entries = redis.call('ZRANGE', zset, first, first + 63, 'WITHSCORES')
    if #entries == 0 then return span end
    for j = 1, #entries, 2 do
      freed = freed + cost_of(entries[j])
      if freed >= need then return tonumber(entries[j + 1]) + span - now + 1 end
    end
    first = first + 64
  end
end
local limits, spans, totals = {}, {}, {}
for i = 1, n do
  limits[i], spans[i] = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  totals[i] = used(i, spans[i])
end
local admitted = 0
-- Every reply that admitted a call renews the window's keys first: keys left
-- to expire with live entries would count the window as empty.
local function reply(wait, which)
  if admitted > 0 then
    for i = 1, n do
      redis.call('PEXPIRE', KEYS[i], spans[i] + 1000)
      redis.call('PEXPIRE', KEYS[n + i], spans[i] + 1000)
    end
  end
  return {admitted, wait, which, 0}
end
for base = 2 * n + 2, #ARGV, n + 1 do
  local token = ARGV[base]
  local wait, which = 0, -1
  for i = 1, n do
    local cost = tonumber(ARGV[base + i])
    if cost > limits[i] then return reply(-1, i - 1) end
    local need = totals[i] + math.max(cost, 1) - limits[i]
    if need > 0 then
      local w = wait_for(KEYS[i], spans[i], need)
      if w > wait then wait, which = w, i - 1 end
    end
  end
  if wait > 0 or ARGV[1] == '1' then return reply(wait, which) end
  for i = 1, n do
    local cost = tonumber(ARGV[base + i])
    if cost > 0 then
      redis.call('ZADD', KEYS[i], now, token .. '|' .. cost)
      redis.call('INCRBY', KEYS[n + i], cost)
      totals[i] = totals[i] + cost
    end
  end
  admitted = admitted + 1
end
return reply(0, -1)
"""

# KEYS: one sorted set per window, then the running total of each. ARGV:
# token, then reserved and actual cost per window.
_SETTLE = """
local n = #KEYS / 2
for i = 1, n do
  local before, after = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local old = ARGV[1] .. '|' .. before
  local score = redis.call('ZSCORE', KEYS[i], old)
  if score then
    redis.call('ZREM', KEYS[i], old)
    if after > 0 then
      redis.call('ZADD', KEYS[i], score, ARGV[1] .. '|' .. after)
    end
    if redis.call('EXISTS', KEYS[n + i]) == 1 then
      redis.call('INCRBY', KEYS[n + i], after - before)
    end
  end
end
return 0
"""

# KEYS: pause key. ARGV: ms from now, reason. Extends, never shortens.
_PAUSE = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
end
return 0
"""


def key_id(api_key: str) -> str:
    """The part of the Redis keys that stands for one API key: a hash of it."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:24]


class RedisLimitBackend:
    """Sliding windows in Redis for one API key.

    Args:
        client: the Redis client.
        link: rides out Redis outages.
        prefix: the node's key prefix; keys are `{prefix}limit:{hash}:{window}`.
        api_key: only its hash is kept.
    """

    def __init__(
        self, client: Client, link: RedisLink, prefix: str, api_key: str
    ) -> None:
        self._client = client
        self._link = link
        self._prefix = prefix
        self._base = f"{prefix}limit:{key_id(api_key)}"
        self._acquire = Script(client, _ACQUIRE)
        self._settle = Script(client, _SETTLE)
        self._pause = Script(client, _PAUSE)

    async def acquire(
        self, windows: list[Window], costs: list[int], token: str, *, dry_run: bool
    ) -> Verdict:
        """Admits the costs in every window at once, or says how long to wait."""
        _admitted, verdict = await self._call_acquire(
            windows, [(token, costs)], dry_run=dry_run
        )
        return verdict

    async def acquire_many(
        self,
        windows: list[Window],
        requests: list[tuple[str, list[int]]],
        *,
        stop: Stop | None = None,
    ) -> tuple[int, Verdict]:
        """Admits requests in order while they fit, in one round trip; through
        an outage until Redis is back or `stop` is set."""
        return await self._call_acquire(windows, requests, dry_run=False, stop=stop)

    async def _call_acquire(
        self,
        windows: list[Window],
        requests: list[tuple[str, list[int]]],
        *,
        dry_run: bool,
        stop: Stop | None = None,
    ) -> tuple[int, Verdict]:
        keys = [*self._keys(windows), f"{self._base}:pause"]
        args: list[Any] = [int(dry_run)]
        for window in windows:
            args += [window.limit, window.window_ms + SAFETY_MS]
        for token, costs in requests:
            if len(costs) != len(windows):
                raise ValueError(f"{len(costs)} costs for {len(windows)} windows")
            args.append(token)
            args += costs
        reply: Any = await self._link.call(
            lambda: self._acquire(keys=keys, args=args), what="limiter", stop=stop
        )
        admitted, wait_ms, which, paused = (int(part) for part in reply)
        return admitted, Verdict(wait_ms, which, paused_ms=wait_ms if paused else 0)

    async def settle(
        self, windows: list[Window], token: str, reserved: list[int], actual: list[int]
    ) -> None:
        """Replaces a reservation's costs with what was actually used."""
        args: list[Any] = [token]
        for before, after in zip(reserved, actual, strict=True):
            args += [before, after]
        keys = self._keys(windows)
        await self._link.call(
            lambda: self._settle(keys=keys, args=args), what="limiter"
        )

    def forget(self, windows: list[Window], token: str) -> None:
        """Nothing to do: a reservation's entry ages out of Redis by itself."""

    async def pause(self, duration_ms: int, reason: str) -> None:
        """Stops all work on the key for a while (extends, never shortens)."""
        if duration_ms > 0:
            keys = [f"{self._base}:pause"]
            args: list[Any] = [duration_ms, reason]
            await self._link.call(
                lambda: self._pause(keys=keys, args=args), what="pause"
            )

    async def paused(self) -> tuple[int, str | None]:
        """How long the key stays paused, in ms, and why."""
        pipe = self._client.pipeline(transaction=False)
        pipe.pttl(f"{self._base}:pause")
        pipe.get(f"{self._base}:pause")
        left_ms, reason = await pipe.execute()
        if int(left_ms) <= 0:
            return 0, None
        return int(left_ms), reason.decode() if reason else None

    def rekey(self, api_key: str) -> None:
        """Keeps the windows of another API key from now on."""
        self._base = f"{self._prefix}limit:{key_id(api_key)}"

    def _keys(self, windows: list[Window]) -> list[str]:
        """Every window's sorted set, then every window's running total."""
        sets = [f"{self._base}:{window.name}" for window in windows]
        return [*sets, *(f"{key}:sum" for key in sets)]
