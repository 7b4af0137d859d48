"""The peer: taskiq on taskiq-redis's Redis-stream broker, running the same call.

What an operator might run instead of the node. The task makes the same
`messages.create` call as the baseline, with the SDK's defaults, and XADDs its
result to the same results stream, so the harness measures every system on
one path. The worker is taskiq's own command:

    python -m taskiq worker bench.peer:broker --workers 1 --max-async-tasks 16
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import anthropic
import redis.asyncio as redis
from taskiq import TaskiqEvents, TaskiqState
from taskiq_redis import RedisStreamBroker

from . import wire

# As in the baseline, the pools must hold a connection per running task, or
# redis-py refuses the 101st; the harness passes the worker's concurrency.
POOL_SIZE = int(os.environ.get(wire.POOL_SIZE_VARIABLE, "100")) + 4

broker = RedisStreamBroker(
    url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    max_connection_pool_size=POOL_SIZE,
    queue_name=wire.PEER_QUEUE,
    consumer_group_name=wire.PEER_GROUP,
    # From the stream's start rather than "$", so that nothing the harness
    # adds while the worker declares its group is skipped.
    consumer_id="0",
)


@dataclass
class Clients:
    """The worker's clients, made once when it starts."""

    api: anthropic.AsyncAnthropic | None = None
    rdb: redis.Redis | None = None


clients = Clients()


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def startup(state: TaskiqState) -> None:
    """Makes the clients, and says which transport and event loop run."""
    clients.api = anthropic.AsyncAnthropic()
    clients.rdb = redis.from_url(os.environ["REDIS_URL"], max_connections=POOL_SIZE)
    wire.announce_ready("httpx")


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def shutdown(state: TaskiqState) -> None:
    """Closes the clients."""
    if clients.api is not None:
        await clients.api.close()
    if clients.rdb is not None:
        await clients.rdb.aclose()


@broker.task(task_name=wire.PEER_TASK_NAME)
async def run_task(task: dict[str, Any]) -> None:
    """Runs one task and publishes its result to the results stream."""
    assert clients.api is not None
    assert clients.rdb is not None
    result = await wire.answer(clients.api, task)
    await clients.rdb.xadd(wire.RESULTS, {"taskId": task["id"], "result": result})
