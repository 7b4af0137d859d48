"""Tasks from the node's Redis stream, read through a consumer group.

The group is created when missing (and again after a Redis restart lost it),
starting from the stream's first entry so that tasks added before any node
started are not skipped. Besides new entries, the intake reclaims entries that
have sat idle longer than the claim timeout in any consumer's pending list
(`XAUTOCLAIM`): those of a node that died. Entries still being worked on never
qualify, because their holder keeps resetting their idle time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.exceptions import ResponseError

from ..constants import FIELD_TASK, FIELD_TRACEPARENT, READ_BLOCK_MS, Keys
from ..errors import RedisUnavailableError
from ..redis_link import REDIS_FAILURES, Client, RedisLink
from . import Delivery

log = logging.getLogger(__name__)


class RedisStreamIntake:
    """Reads task entries, never more than the free slots.

    Args:
        client: a Redis client with `decode_responses=False`, since a task may
            arrive as bytes that are not UTF-8 and must be reported, not mangled.
        keys: the key names.
        group: the consumer group.
        consumer: this node's consumer name.
        claim_timeout_ms: idle time after which a pending entry is reclaimed.
        stopping: set when the node stops; abandons waits for Redis.
        block_ms: how long one read may wait for new entries.
    """

    redeliverable = True
    exhausted = False

    def __init__(
        self,
        client: Client,
        keys: Keys,
        *,
        group: str,
        consumer: str,
        claim_timeout_ms: int,
        stopping: asyncio.Event,
        block_ms: int = READ_BLOCK_MS,
    ) -> None:
        self._client = client
        self._keys = keys
        self._group = group
        self._consumer = consumer
        self._claim_timeout_ms = claim_timeout_ms
        self._stopping = stopping
        self._block_ms = block_ms
        self.link = RedisLink(recreate_group=self.create_group)
        self._reclaim_cursor = "0-0"
        # Entries this node is working on. After an outage longer than the
        # claim timeout they look idle, and XAUTOCLAIM hands them back to us:
        # they must not run a second time.
        self._handed: set[str] = set()
        self._next_reclaim_s = 0.0

    async def start(self) -> None:
        """Creates the consumer group (and the stream) when missing."""
        await self.link.call(
            self.create_group, what="create_group", stop=self._stopping
        )

    async def create_group(self) -> None:
        """Creates the group from the stream's start; an existing one is kept."""
        try:
            await self._client.xgroup_create(
                self._keys.tasks, self._group, id="0", mkstream=True
            )
            log.info("group.created", extra={"group": self._group})
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def receive(self, max_count: int) -> list[Delivery]:
        """Reclaims abandoned entries when due, else reads new ones."""
        try:
            if time.monotonic() >= self._next_reclaim_s:
                reclaimed = await self.link.call(
                    lambda: self._reclaim(max_count),
                    what="reclaim",
                    stop=self._stopping,
                )
                if reclaimed:
                    return reclaimed
            return await self.link.call(
                lambda: self._read(max_count), what="read", stop=self._stopping
            )
        except RedisUnavailableError:
            return []

    def finished(self, delivery: Delivery) -> None:
        """Forgets a delivery the worker is done with."""
        if delivery.entry_id is not None:
            self._handed.discard(delivery.entry_id)

    async def close(self) -> None:
        """Leaves the group when this consumer holds nothing.

        A node's id names its consumer, and a host-and-pid id is new with
        every start: without this, the group would keep a consumer for every
        run a node ever had. One that still holds entries stays, so that
        they are reclaimed as usual (deleting it would drop them).
        """
        with contextlib.suppress(*REDIS_FAILURES):
            async with asyncio.timeout(2):
                held: Any = await self._client.xpending_range(
                    self._keys.tasks,
                    self._group,
                    min="-",
                    max="+",
                    count=1,
                    consumername=self._consumer,
                )
                if not held:
                    await self._client.xgroup_delconsumer(
                        self._keys.tasks, self._group, self._consumer
                    )

    async def _read(self, max_count: int) -> list[Delivery]:
        reply: Any = await self._client.xreadgroup(
            self._group,
            self._consumer,
            {self._keys.tasks: ">"},
            count=max_count,
            block=self._block_ms,
        )
        deliveries = [
            _delivery(entry_id, fields, deliveries=1)
            for _stream, entries in reply or ()
            for entry_id, fields in entries
            if fields is not None
        ]
        self._handed.update(str(d.entry_id) for d in deliveries)
        return deliveries

    async def _reclaim(self, max_count: int) -> list[Delivery]:
        reply: Any = await self._client.xautoclaim(
            self._keys.tasks,
            self._group,
            self._consumer,
            min_idle_time=self._claim_timeout_ms,
            start_id=self._reclaim_cursor,
            count=max_count,
        )
        cursor, entries, deleted = autoclaim_parts(reply)
        self._reclaim_cursor = cursor
        if cursor == "0-0":
            # A full pass over the pending list is done; the next one is due
            # when entries read now could first have gone idle.
            self._next_reclaim_s = time.monotonic() + self._claim_timeout_ms / 2000
        await self._forget_deleted(entries, deleted)
        live = [
            (entry_id, fields)
            for entry_id, fields in entries
            if fields and entry_id.decode() not in self._handed
        ]
        if not live:
            return []
        counts = await self._delivery_counts([entry_id for entry_id, _ in live])
        log.info("entries.reclaimed", extra={"entries": len(live)})
        deliveries = [
            _delivery(entry_id, fields, deliveries=counts.get(entry_id, 1))
            for entry_id, fields in live
        ]
        self._handed.update(str(d.entry_id) for d in deliveries)
        return deliveries

    async def _forget_deleted(
        self, entries: list[tuple[bytes, Any]], deleted: list[bytes]
    ) -> None:
        """Acknowledges entries deleted from the stream while pending.

        Redis 7 drops them from the pending list itself and names them in
        XAUTOCLAIM's third element; Redis 6.2 returns them with no fields
        (https://redis.io/docs/latest/commands/xautoclaim/).
        """
        gone = [entry_id for entry_id, fields in entries if not fields]
        if gone:
            await self._client.xack(self._keys.tasks, self._group, *gone)
        for entry_id in [*gone, *deleted]:
            log.warning("entry.deleted", extra={"entry": _text(entry_id)})

    async def _delivery_counts(self, entry_ids: list[bytes]) -> dict[bytes, int]:
        pipe = self._client.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(
                self._keys.tasks, self._group, min=entry_id, max=entry_id, count=1
            )
        counts: dict[bytes, int] = {}
        for rows in await pipe.execute():
            for row in rows:
                counts[row["message_id"]] = int(row["times_delivered"])
        return counts


def autoclaim_parts(reply: Any) -> tuple[str, list[tuple[bytes, Any]], list[bytes]]:
    """Splits an XAUTOCLAIM reply of any Redis version into its three parts."""
    cursor = _text(reply[0]) or "0-0"
    entries = [(entry[0], entry[1]) for entry in (reply[1] or ())]
    deleted = list(reply[2]) if len(reply) > 2 and reply[2] else []
    return cursor, entries, deleted


def _delivery(
    entry_id: bytes, fields: dict[bytes, bytes], *, deliveries: int
) -> Delivery:
    entry = entry_id.decode()
    return Delivery(
        raw=fields.get(FIELD_TASK.encode()),
        source=entry,
        entry_id=entry,
        traceparent=_text(fields.get(FIELD_TRACEPARENT.encode())),
        deliveries=deliveries,
    )


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None
