"""Tasks from the node's Redis stream, read through a consumer group.

The group is created when missing, starting from the stream's first entry so
that tasks added before any node started are not skipped. A node first reads
back what it already holds (its own pending entries, after a restart under
the same node id), then new entries.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from ..constants import FIELD_TASK, FIELD_TRACEPARENT, READ_BLOCK_MS, Keys
from . import Delivery

log = logging.getLogger(__name__)


class RedisStreamIntake:
    """Reads task entries with XREADGROUP, never more than the free slots.

    Args:
        client: a Redis client with `decode_responses=False`, since a task may
            arrive as bytes that are not UTF-8 and must be reported, not mangled.
        keys: the key names.
        group: the consumer group.
        consumer: this node's consumer name.
        block_ms: how long one read may wait for new entries.
    """

    redeliverable = True
    exhausted = False

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        group: str,
        consumer: str,
        block_ms: int = READ_BLOCK_MS,
    ) -> None:
        self._client = client
        self._keys = keys
        self._group = group
        self._consumer = consumer
        self._block_ms = block_ms
        self._backlog_after: str | None = "0"

    async def start(self) -> None:
        """Creates the consumer group (and the stream) when missing."""
        try:
            await self._client.xgroup_create(
                self._keys.tasks, self._group, id="0", mkstream=True
            )
            log.info("group.created", extra={"group": self._group})
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def receive(self, max_count: int) -> list[Delivery]:
        """Reads this consumer's backlog first, then new entries."""
        if self._backlog_after is not None:
            deliveries = await self._read(self._backlog_after, max_count, block_ms=None)
            if deliveries:
                # Entries stay pending until settled, so the backlog is paged by
                # id rather than re-read from the start.
                self._backlog_after = deliveries[-1].entry_id
                return deliveries
            self._backlog_after = None
        return await self._read(">", max_count, block_ms=self._block_ms)

    async def close(self) -> None:
        """The client belongs to the caller; nothing to release here."""

    async def _read(
        self, start: str, max_count: int, *, block_ms: int | None
    ) -> list[Delivery]:
        reply: Any = await self._client.xreadgroup(
            self._group,
            self._consumer,
            {self._keys.tasks: start},
            count=max_count,
            block=block_ms,
        )
        return [
            _delivery(entry_id, fields)
            for _stream, entries in reply or ()
            for entry_id, fields in entries
        ]


def _delivery(entry_id: bytes, fields: dict[bytes, bytes] | None) -> Delivery:
    entry = entry_id.decode()
    if fields is None:
        # XREADGROUP of the backlog returns entries deleted while pending with
        # no fields (https://redis.io/docs/latest/commands/xreadgroup/).
        return Delivery(
            raw=None,
            source=entry,
            entry_id=entry,
            problem="the entry was deleted from the stream before it was processed",
        )
    traceparent = fields.get(FIELD_TRACEPARENT.encode())
    return Delivery(
        raw=fields.get(FIELD_TASK.encode()),
        source=entry,
        entry_id=entry,
        traceparent=_text(traceparent),
    )


def _text(value: Any) -> str | None:
    if not isinstance(value, bytes):
        return None
    return value.decode("utf-8", errors="replace")
