"""A serving node's heartbeat: the `{prefix}node:{id}` hash that `status` and
`health` read.

Every few seconds the node writes what it is doing (state, tasks in flight,
counts, the stream's backlog) with the Redis server's own time, and lets the
hash expire a few beats later, so that a node that died leaves no live
heartbeat behind and nodes on hosts with skewed clocks still compare fairly.
The same beat reads the group's lag and pending count for the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from redis.exceptions import ResponseError

from . import __version__
from . import constants as c
from .lua import Script
from .observe import StreamFigures
from .redis_link import REDIS_FAILURES, Client

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 5.0
# A heartbeat older than this is stale: three beats missed.
HEARTBEAT_STALE_MS = 15_000
# Gone from Redis a little after it goes stale.
HEARTBEAT_TTL_MS = 30_000

# KEYS: the node hash. ARGV: ttl ms, then field, value pairs.
# Stamps `seen_ms` with the server's clock; returns it.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'seen_ms', now, unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return now
"""


class Heartbeat:
    """Writes one node's heartbeat until stopped.

    Args:
        client: the Redis client.
        keys: the key layout.
        node_id: this node.
        group: its consumer group.
        report: the node's current figures (state, in flight, counts).
        stream: where the stream's lag and pending count are kept for metrics.
        limits: the limit of each limiter window, by name.
        interval_s: time between beats.
    """

    def __init__(
        self,
        client: Client,
        keys: c.Keys,
        *,
        node_id: str,
        group: str,
        report: Callable[[], Mapping[str, Any]],
        stream: StreamFigures,
        limits: Mapping[str, int] | None = None,
        interval_s: float = HEARTBEAT_INTERVAL_S,
    ) -> None:
        self._client = client
        self._keys = keys
        self._key = keys.node(node_id)
        self._group = group
        self._report = report
        self._stream = stream
        self._interval_s = interval_s
        self._beat = Script(client, _BEAT)
        self._static = {
            "node": node_id,
            "group": group,
            # `health`, run beside the node (a container's HEALTHCHECK), finds
            # its node by host when it is not told the node id.
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            # `status` shows headroom against the limits the nodes run with.
            "limits": orjson.dumps(dict(limits or {})).decode(),
        }
        self._started_ms: int | None = None

    async def run(self, stopping: asyncio.Event) -> None:
        """Beats every interval until `stopping`, then removes the heartbeat."""
        try:
            while not stopping.is_set():
                await self.beat()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self._interval_s)
        finally:
            with contextlib.suppress(*REDIS_FAILURES):
                await self._client.delete(self._key)

    async def beat(self) -> None:
        """Writes one heartbeat; a Redis outage just skips it (it goes stale)."""
        try:
            await self._read_backlog()
            fields: dict[str, Any] = {**self._static, **self._report()}
            fields.update(
                stream_lag=_or_empty(self._stream.lag),
                stream_pending=_or_empty(self._stream.pending),
            )
            if self._started_ms is not None:
                fields["started_ms"] = self._started_ms
            args: list[Any] = [HEARTBEAT_TTL_MS]
            for name, value in fields.items():
                args += [name, value]
            now_ms = int(await self._beat(keys=[self._key], args=args))
            if self._started_ms is None:
                self._started_ms = now_ms
                await self._client.hset(self._key, "started_ms", now_ms)
        except REDIS_FAILURES as exc:
            log.debug("heartbeat.skipped", extra={"error": type(exc).__name__})

    async def _read_backlog(self) -> None:
        try:
            groups: list[dict[str, Any]] = await self._client.xinfo_groups(
                self._keys.tasks
            )
        except ResponseError:
            # No stream yet: nothing is waiting.
            return
        for group in groups:
            if _text(group.get("name")) == self._group:
                lag = group.get("lag")
                self._stream.lag = None if lag is None else int(lag)
                self._stream.pending = int(group.get("pending") or 0)


def _or_empty(value: int | None) -> int | str:
    return "" if value is None else value


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
