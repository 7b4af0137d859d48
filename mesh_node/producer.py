"""The producer side: add tasks to the stream and, if asked, wait for results.

Tasks go in as they are written, unvalidated, so that the node, which owns the
rules, is the one place that judges them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import BinaryIO, cast

import orjson
import redis.asyncio as aioredis

from .constants import FIELD_TASK, Keys
from .tasks import is_task_id

log = logging.getLogger(__name__)

_PIPELINE_SIZE = 500
_POLL_S = 0.2


def read_payloads(stream: BinaryIO) -> Iterator[bytes]:
    """Yields each task of a JSON-lines file or JSON array, blank lines skipped."""
    head = stream.peek(1).lstrip()[:1] if hasattr(stream, "peek") else b""
    if head == b"[":
        items = orjson.loads(stream.read())
        yield from (orjson.dumps(item) for item in items)
        return
    for line in stream:
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield line


def task_id_of(payload: bytes) -> str | None:
    """The task id of a payload, when it has a valid one."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    task_id = obj.get("id") if isinstance(obj, dict) else None
    return task_id if is_task_id(task_id) else None


async def submit(
    client: aioredis.Redis, keys: Keys, payloads: Iterator[bytes]
) -> list[str | None]:
    """Adds every payload to the task stream.

    Returns:
        The task id of each payload in order, None where it has none.
    """
    ids: list[str | None] = []
    pipe = client.pipeline(transaction=False)
    for payload in payloads:
        pipe.xadd(keys.tasks, {FIELD_TASK: payload})
        ids.append(task_id_of(payload))
        if len(pipe) >= _PIPELINE_SIZE:
            await pipe.execute()
    await pipe.execute()
    log.info("tasks.submitted", extra={"tasks": len(ids), "stream": keys.tasks})
    return ids


async def wait_for_results(
    client: aioredis.Redis, keys: Keys, ids: list[str], out: BinaryIO, timeout_s: float
) -> list[str]:
    """Prints each task's stored result as it appears.

    Returns:
        The ids still without a result at the timeout.
    """
    missing = list(dict.fromkeys(ids))
    deadline_s = time.monotonic() + timeout_s
    while missing:
        result_keys = [keys.result(task_id) for task_id in missing]
        values = cast("list[bytes | None]", await client.mget(result_keys))
        for value in values:
            if value is not None:
                out.write(value + b"\n")
        out.flush()
        missing = [
            task_id for task_id, v in zip(missing, values, strict=True) if v is None
        ]
        if not missing or time.monotonic() >= deadline_s:
            break
        await asyncio.sleep(_POLL_S)
    return missing
