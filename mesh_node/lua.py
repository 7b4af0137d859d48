"""Lua scripts run by their hash, the calls of one moment sent together.

Two costs dominate the node's own CPU around a task, both measured with
py-spy: the socket write of each Redis command (on loopback the sender's
system call also runs the receiving side of TCP, some 0.3 ms here), and
redis-py's `Script`, which checks on every call whether its client is one of
two pipeline classes derived from a typing `Protocol`, whose `isinstance` is
slow enough to have taken 15% of the CPU.

So a `Script` calls EVALSHA itself, and every script called during one pass
of the event loop on a single Redis goes out in one pipeline: a batch of
entries read together takes its leases in one write, and the limiter's
reservations in the next. Each caller still gets its own reply or error. On
a Redis Cluster the calls go one by one (a pipeline there splits by slot
anyway).
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

_Call = tuple["Script", Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class Script:
    """One Lua script on one client (a Redis or a Redis Cluster client).

    Args:
        client: runs the script; a pipeline is not supported.
        text: the script's source.
    """

    def __init__(self, client: Any, text: str) -> None:
        self.client = client
        self._text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
        self._batch = _batcher(client)

    async def __call__(self, *, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Runs the script with `keys` and `args`; returns its reply."""
        if self._batch is None:
            return await self.alone(keys, args)
        return await self._batch.add(self, keys, args)

    async def alone(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Runs the script in a round trip of its own."""
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.loaded(keys, args)

    async def loaded(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Runs the script by its text, after a server answered that it did
        not know it (a restart, a failover): EVAL also caches it there."""
        return await self.client.eval(self._text, len(keys), *keys, *args)


# One batcher per client, so that all the node's scripts share the write; a
# client that is gone takes its batcher with it.
_batchers: weakref.WeakKeyDictionary[aioredis.Redis, _Batcher] = (
    weakref.WeakKeyDictionary()
)


def _batcher(client: Any) -> _Batcher | None:
    if not isinstance(client, aioredis.Redis):
        return None
    batcher = _batchers.get(client)
    if batcher is None:
        batcher = _batchers[client] = _Batcher()
    return batcher


class _Batcher:
    """Collects the script calls made before the event loop's next pass and
    sends them as one pipeline, on the client of the scripts it was made for."""

    def __init__(self) -> None:
        self._queue: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    def add(
        self, script: Script, keys: Sequence[Any], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, reply))
        if len(self._queue) == 1:
            # Behind every callback already due in this pass, so the calls
            # that tasks woken together make all land in this batch.
            loop.call_soon(self._flush)
        return reply

    def _flush(self) -> None:
        # A caller cancelled before the send no longer wants its call made,
        # as with a direct call cancelled before its write.
        calls = [call for call in self._queue if not call[3].done()]
        self._queue = []
        if calls:
            task = asyncio.ensure_future(self._send(calls))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[_Call]) -> None:
        if len(calls) == 1:
            script, keys, args, reply = calls[0]
            await _settle(reply, script.alone(keys, args))
            return
        pipe = calls[0][0].client.pipeline(transaction=False)
        for script, keys, args, _reply in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        try:
            answers = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            # The connection failed: every caller sees the outage and
            # retries through `RedisLink` as after a call of its own.
            answers = [exc] * len(calls)
        for (script, keys, args, reply), answer in zip(calls, answers, strict=True):
            if isinstance(answer, NoScriptError):
                await _settle(reply, script.loaded(keys, args))
            elif not reply.done():
                if isinstance(answer, Exception):
                    reply.set_exception(answer)
                else:
                    reply.set_result(answer)


async def _settle(reply: asyncio.Future[Any], call: Any) -> None:
    """Runs `call` and hands its outcome to `reply`, unless the caller left."""
    try:
        answer = await call
    except Exception as exc:
        if not reply.done():
            reply.set_exception(exc)
    else:
        if not reply.done():
            reply.set_result(answer)
