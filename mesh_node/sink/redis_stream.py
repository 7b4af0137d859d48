"""Results into Redis: the results stream, the stored result and the XACK.

All three happen in one Lua script, so a result is either published, stored
and acknowledged together or not at all (design.md, "Redis layout"). The
script also refuses to publish a second result for an id that has one, which
keeps "one result per task id" true even when two deliveries of one id race.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from ..constants import FIELD_RESULT, FIELD_TASK_ID, Keys
from ..intake import Delivery
from ..tasks import TaskResult

# KEYS: tasks stream, results stream, result key (absent for results with no id)
# ARGV: group, entry id, task id, result JSON, retention seconds
_SETTLE = """
local has_key = #KEYS == 3
if has_key and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
redis.call('XADD', KEYS[2], '*', ARGV[6], ARGV[3], ARGV[7], ARGV[4])
if has_key then
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class RedisStreamSink:
    """Publishes results and settles stream entries atomically.

    Args:
        client: the Redis client.
        keys: the key names.
        group: the consumer group whose entries are acknowledged.
        retention_s: how long a stored result keeps its id idempotent.
    """

    def __init__(
        self, client: aioredis.Redis, keys: Keys, *, group: str, retention_s: int
    ) -> None:
        self._client = client
        self._keys = keys
        self._group = group
        self._retention_s = retention_s
        self._settle = client.register_script(_SETTLE)

    async def already_done(self, delivery: Delivery, task_id: str) -> bool:
        """Acknowledges a re-delivered task whose result is already stored."""
        if not await self._client.exists(self._keys.result(task_id)):
            return False
        if delivery.entry_id is not None:
            await self._client.xack(self._keys.tasks, self._group, delivery.entry_id)
        return True

    async def deliver(self, delivery: Delivery, result: TaskResult) -> None:
        """Publishes, stores and acknowledges in one step."""
        keys = [self._keys.tasks, self._keys.results]
        if result.taskId is not None:
            keys.append(self._keys.result(result.taskId))
        args: list[Any] = [
            self._group,
            delivery.entry_id or "0-0",
            result.taskId or "",
            result.to_json(),
            self._retention_s,
            FIELD_TASK_ID,
            FIELD_RESULT,
        ]
        await self._settle(keys=keys, args=args)

    async def close(self) -> None:
        """The client belongs to the caller; nothing to release here."""
