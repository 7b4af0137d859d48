"""Script calls made together go out as one pipeline, each with its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from mesh_node.lua import Script

from .support import RedisServer

# Doubles its argument; fails for "bad"; counts every run under KEYS[1].
DOUBLE = """
redis.call('INCR', KEYS[1])
if ARGV[1] == 'bad' then return redis.error_reply('ERR bad argument') end
return tonumber(ARGV[1]) * 2
"""


def _run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def _connections(rdb: redis.Redis, name: str) -> int:
    return sum(1 for client in rdb.client_list() if client["name"] == name)


def test_calls_of_one_moment_share_one_connection_and_get_their_own_answers(
    redis_server: RedisServer, rdb: redis.Redis, prefix: str
) -> None:
    """Twenty calls made at once: one pipeline on one connection; every caller
    gets its own reply, and the one that failed its own error."""
    name = f"{prefix}batch".replace(":", "-")
    counter = f"{prefix}runs"

    async def scenario() -> tuple[list[Any], int]:
        client = aioredis.Redis.from_url(redis_server.url, client_name=name)
        script = Script(client, DOUBLE)
        args = [str(n) for n in range(19)] + ["bad"]
        calls = [script(keys=[counter], args=[arg]) for arg in args]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        connections = _connections(rdb, name)
        await client.aclose()
        return answers, connections

    answers, connections = _run(scenario())
    assert answers[:19] == [2 * n for n in range(19)]
    assert isinstance(answers[19], ResponseError)
    assert str(answers[19]) == "bad argument"
    assert connections == 1
    assert int(rdb.get(counter) or 0) == 20


@pytest.mark.parametrize("together", [1, 5])
def test_a_server_that_lost_the_script_runs_it_by_its_text(
    redis_server: RedisServer, rdb: redis.Redis, prefix: str, together: int
) -> None:
    """After SCRIPT FLUSH (a restart, a failover) the calls still run, once each."""
    counter = f"{prefix}runs"

    async def scenario() -> list[Any]:
        client = aioredis.Redis.from_url(redis_server.url)
        script = Script(client, DOUBLE)
        await script(keys=[counter], args=["1"])
        await client.script_flush()
        calls = [script(keys=[counter], args=[str(n)]) for n in range(together)]
        answers = await asyncio.gather(*calls)
        await client.aclose()
        return answers

    assert _run(scenario()) == [2 * n for n in range(together)]
    assert int(rdb.get(counter) or 0) == 1 + together


def test_a_call_cancelled_before_the_send_is_not_made(
    redis_server: RedisServer, rdb: redis.Redis, prefix: str
) -> None:
    """As with a call of its own, a caller that leaves before the write has
    its call dropped, not run behind its back."""
    counter = f"{prefix}runs"

    async def scenario() -> list[Any]:
        client = aioredis.Redis.from_url(redis_server.url)
        script = Script(client, DOUBLE)
        tasks = [
            asyncio.ensure_future(script(keys=[counter], args=[str(n)]))
            for n in range(3)
        ]
        # Each task has queued its call; the send is still to come.
        await asyncio.sleep(0)
        tasks[1].cancel()
        answers = await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        return answers

    answers = _run(scenario())
    assert answers[0] == 0
    assert answers[2] == 4
    assert isinstance(answers[1], asyncio.CancelledError)
    assert int(rdb.get(counter) or 0) == 2
