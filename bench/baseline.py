"""The hand-written minimum: a consumer as a user first writes it with the SDK.

A plain redis-py asyncio loop reads the group, calls
`AsyncAnthropic().messages.create` with every SDK default (httpx transport,
its connection pool, its retries), XADDs the result and XACKs it: no
validation, limits, idempotency or telemetry. It is the yardstick of the
node's cost per task (issue 7), and never part of the product.

    REDIS_URL=... ANTHROPIC_API_KEY=... ANTHROPIC_BASE_URL=... \
        python -m bench.baseline --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
from typing import Any

import anthropic
import redis.asyncio as redis

from . import wire


async def handle(
    rdb: redis.Redis, client: anthropic.AsyncAnthropic, entry_id: bytes, task: Any
) -> None:
    """Runs one task and publishes its result, then acknowledges the entry."""
    result = await wire.answer(client, task)
    await rdb.xadd(wire.RESULTS, {"taskId": task["id"], "result": result})
    await rdb.xack(wire.TASKS, wire.GROUP, entry_id)


async def consume(concurrency: int) -> None:
    """Reads the group until SIGTERM, keeping at most `concurrency` tasks running."""
    # The one setting the minimum cannot leave at its default: redis-py's
    # asyncio pool refuses a 101st connection ("Too many connections"), and
    # every running task may hold one while the reader holds another.
    rdb = redis.from_url(os.environ["REDIS_URL"], max_connections=concurrency + 1)
    client = anthropic.AsyncAnthropic()
    # BUSYGROUP when the group is there already.
    with contextlib.suppress(redis.ResponseError):
        await rdb.xgroup_create(wire.TASKS, wire.GROUP, id="0", mkstream=True)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    running: set[asyncio.Task[None]] = set()
    wire.announce_ready("httpx")
    while not stopping.is_set():
        if len(running) >= concurrency:
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            continue
        reply: Any = await rdb.xreadgroup(
            wire.GROUP,
            "baseline",
            {wire.TASKS: ">"},
            count=concurrency - len(running),
            block=500,
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                job = asyncio.create_task(
                    handle(rdb, client, entry_id, json.loads(fields[b"task"]))
                )
                running.add(job)
                job.add_done_callback(running.discard)
    if running:
        await asyncio.wait(running)
    await client.close()
    await rdb.aclose()


def main() -> None:
    """Parses `--concurrency` and consumes until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    asyncio.run(consume(parser.parse_args().concurrency))


if __name__ == "__main__":
    main()
