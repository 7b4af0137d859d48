"""Results into Redis, and the per-id leases that keep one id from running twice.

Publishing a result, storing it under `result:{id}`, releasing the id's lease
and the XACK happen in one Lua script: a result is published, stored and
acknowledged together or not at all (design.md, "Redis layout"). The script
refuses to publish a second result for an id that has one, so "one result per
task id" holds even when two deliveries of one id race.

While a task runs, a keeper renews its lease and resets its entry's idle time
(`XCLAIM ... JUSTID` to ourselves), so that no other node reclaims an entry
that is still being worked on, however long the API call takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from .. import constants as c
from ..intake import Delivery
from ..lua import Script
from ..redis_link import Client, RedisLink, is_outage
from ..tasks import TaskResult
from . import Start

log = logging.getLogger(__name__)

# An entry is deleted from the task stream as it is acknowledged: the stream
# then holds only work not yet done, and its memory stays bounded by the
# backlog, not by the node's history.

# KEYS: result key, lease key, tasks stream. ARGV: token, lease ms, group, entry.
# Returns 1 run, 2 done, 3 another entry of the id runs, 0 this entry runs elsewhere.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
  redis.call('XDEL', KEYS[3], ARGV[4])
  return 2
end
local holder = redis.call('GET', KEYS[2])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
local suffix = '/' .. ARGV[4]
if string.sub(holder, -string.len(suffix)) == suffix then
  return 0
end
redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
redis.call('XDEL', KEYS[3], ARGV[4])
return 3
"""
_STARTS = {
    1: Start.RUN,
    2: Start.DONE,
    3: Start.RUNNING_ELSEWHERE,
    0: Start.HELD_ELSEWHERE,
}

# KEYS: tasks, results, then the result key and the lease key when the result
# has a task id. ARGV: group, entry, task id, result JSON, retention s, token,
# the results stream's MAXLEN (0: untrimmed).
_SETTLE = """
local has_id = #KEYS == 4
if has_id then
  if redis.call('GET', KEYS[4]) == ARGV[6] then redis.call('DEL', KEYS[4]) end
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
    redis.call('XDEL', KEYS[1], ARGV[2])
    return 0
  end
end
if tonumber(ARGV[7]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*',
    'taskId', ARGV[3], 'result', ARGV[4])
else
  redis.call('XADD', KEYS[2], '*', 'taskId', ARGV[3], 'result', ARGV[4])
end
if has_id then
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""

# KEYS: the dead-letter stream, then the settle's. ARGV: the dead-letter
# stream's MAXLEN (0: untrimmed), the number of the dead letter's field and
# value arguments, those, then the settle's. One script rather than a MULTI
# around XADD and `_SETTLE`: a cluster client's transaction does not load a
# script first, and an EVALSHA that meets NOSCRIPT inside EXEC would leave a
# dead letter without its settle.
_DEAD_LETTER = (
    """
local dead, max_len = table.remove(KEYS, 1), table.remove(ARGV, 1)
local fields = {}
for i = 1, tonumber(table.remove(ARGV, 1)) do fields[i] = table.remove(ARGV, 1) end
if tonumber(max_len) > 0 then
  redis.call('XADD', dead, 'MAXLEN', '~', max_len, '*', unpack(fields))
else
  redis.call('XADD', dead, '*', unpack(fields))
end
"""
    + _SETTLE
)

# KEYS: tasks, then one lease key per held entry.
# ARGV: group, consumer, lease ms, then entry id and token per held entry.
_KEEP = """
local kept = 0
for i = 2, #KEYS do
  local entry, token = ARGV[2 * i], ARGV[2 * i + 1]
  local holder = redis.call('GET', KEYS[i])
  if not holder or holder == token then
    redis.call('SET', KEYS[i], token, 'PX', ARGV[3])
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, entry, 'JUSTID')
    kept = kept + 1
  end
end
return kept
"""


@dataclass(frozen=True, slots=True)
class _Held:
    lease_key: str
    token: str


class RedisStreamSink:
    """Publishes results, settles entries and keeps the leases of running tasks.

    Args:
        client: the Redis client.
        link: rides out Redis outages.
        keys: the key names.
        group: the consumer group whose entries are acknowledged.
        node_id: this node's consumer name; part of every lease token.
        retention_s: how long a stored result keeps its id idempotent.
        claim_timeout_ms: the lease's life; the keeper renews at a quarter of it.
        results_max_len: the results stream is trimmed to about this many
            entries (0: never); a producer reads its results by then, or finds
            them stored under `result:{id}`.
        dead_max_len: the same for the dead-letter stream.
    """

    def __init__(
        self,
        client: Client,
        link: RedisLink,
        keys: c.Keys,
        *,
        group: str,
        node_id: str,
        retention_s: int,
        claim_timeout_ms: int,
        results_max_len: int = c.DEFAULT_RESULTS_MAX_LEN,
        dead_max_len: int = c.DEFAULT_DEAD_MAX_LEN,
    ) -> None:
        self._client = client
        self._results_max_len = results_max_len
        self._dead_max_len = dead_max_len
        self._link = link
        self._keys = keys
        self._group = group
        self._node_id = node_id
        self._retention_s = retention_s
        self._lease_ms = claim_timeout_ms
        self._held: dict[str, _Held] = {}
        self._acquire = Script(client, _ACQUIRE)
        self._settle = Script(client, _SETTLE)
        self._dead_letter = Script(client, _DEAD_LETTER)
        self._keep = Script(client, _KEEP)
        self._keeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Starts the keeper that renews the leases of running tasks."""
        self._keeper = asyncio.create_task(self._keep_forever())

    async def acquire(self, delivery: Delivery, task_id: str) -> Start:
        """Takes the id's lease, unless a result or another holder says otherwise."""
        entry = _entry(delivery)
        held = _Held(self._keys.lease(task_id), f"{self._node_id}/{entry}")
        keys = [self._keys.result(task_id), held.lease_key, self._keys.tasks]
        args: list[Any] = [held.token, self._lease_ms, self._group, entry]
        code = await self._link.call(
            lambda: self._acquire(keys=keys, args=args), what="acquire"
        )
        start = _STARTS[int(code)]
        if start is Start.RUN:
            self._held[entry] = held
        return start

    async def deliver(self, delivery: Delivery, result: TaskResult) -> None:
        """Publishes, stores, releases the lease and acknowledges in one step."""
        keys, args = self._settle_call(delivery, result)
        await self._link.call(lambda: self._settle(keys=keys, args=args), what="settle")
        self._held.pop(_entry(delivery), None)

    async def dead_letter(
        self, delivery: Delivery, result: TaskResult, reason: str
    ) -> None:
        """Copies the entry to the dead-letter stream and settles it, atomically."""
        settle_keys, settle_args = self._settle_call(delivery, result)
        fields: list[Any] = [
            c.FIELD_ENTRY_ID,
            _entry(delivery),
            c.FIELD_REASON,
            reason,
            c.FIELD_DELIVERIES,
            delivery.deliveries,
            c.FIELD_NODE,
            self._node_id,
            c.FIELD_TASK,
            delivery.raw if delivery.raw is not None else b"",
        ]
        keys = [self._keys.dead, *settle_keys]
        args = [self._dead_max_len, len(fields), *fields, *settle_args]
        await self._link.call(
            lambda: self._dead_letter(keys=keys, args=args), what="dead_letter"
        )

    async def release(self, delivery: Delivery) -> None:
        """Drops the lease of an unfinished task; its entry stays pending.

        Best effort within a second: the lease expires by itself anyway.
        """
        held = self._held.pop(_entry(delivery), None)
        if held is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                if await self._client.get(held.lease_key) == held.token.encode():
                    await self._client.delete(held.lease_key)

    async def close(self) -> None:
        """Stops the keeper."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper

    def _settle_call(
        self, delivery: Delivery, result: TaskResult
    ) -> tuple[list[str], list[Any]]:
        entry = _entry(delivery)
        keys = [self._keys.tasks, self._keys.results]
        token = ""
        if result.taskId is not None:
            keys += [self._keys.result(result.taskId), self._keys.lease(result.taskId)]
            held = self._held.get(entry)
            token = held.token if held else ""
        args = [
            self._group,
            entry,
            result.taskId or "",
            result.to_json(),
            self._retention_s,
            token,
            self._results_max_len,
        ]
        return keys, args

    async def _keep_forever(self) -> None:
        interval_s = self._lease_ms / 4000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._keep_once()
            except Exception as exc:
                # A failed renewal is retried on the next tick; the lease
                # outlives a few missed ticks. An outage is reported once, by
                # the link, not on every tick.
                if not is_outage(exc):
                    error = type(exc).__name__
                    log.warning("lease.renew_failed", extra={"error": error})

    async def _keep_once(self) -> None:
        held = list(self._held.items())
        if not held:
            return
        keys = [self._keys.tasks, *(h.lease_key for _entry_id, h in held)]
        args: list[Any] = [self._group, self._node_id, self._lease_ms]
        for entry_id, h in held:
            args += [entry_id, h.token]
        await self._keep(keys=keys, args=args)


def _entry(delivery: Delivery) -> str:
    if delivery.entry_id is None:
        raise ValueError("a stream sink needs stream deliveries")
    return delivery.entry_id
