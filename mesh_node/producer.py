"""The producer side: add tasks to the stream and, if asked, wait for results.

Tasks go in as they are written, unvalidated, so that the node, which owns the
rules, is the one place that judges them. Waiting follows each submitted
entry: its result is the one published with the entry's id as its `source`,
or, for a task id that already had a result (which the node does not publish
twice), the stored one.

A Redis outage after the start is ridden out through `RedisLink` (logged once
when it starts, once when it ends): while adding tasks for at most the
command's timeout, and while waiting until the timeout. An outage in the
middle of a pipelined batch may add some of its tasks twice; the node answers
an id once, and waiting prints one result per entry it knows of.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError

from .constants import FIELD_RESULT, FIELD_TASK, Keys
from .errors import ConfigError
from .jsonl import TaskReader
from .redis_link import Client, RedisLink
from .tasks import is_task_id

log = logging.getLogger(__name__)

_PIPELINE_SIZE = 500
_POLL_MS = 200
_STORED_EVERY_POLLS = 10
# The producer does not judge sizes: the node reports oversize tasks itself.
_NO_LIMIT_BYTES = 1 << 62


@dataclass(frozen=True, slots=True)
class Submitted:
    """One entry added to the task stream."""

    entry_id: str
    task_id: str | None


def read_payloads(fd: int, name: str) -> Iterator[bytes]:
    """Yields each task of a JSON-lines file or JSON array, blank lines skipped.

    Raises:
        ConfigError: the file starts as a JSON array but is not one.
    """
    reader = TaskReader(fd, max_line_bytes=_NO_LIMIT_BYTES, allow_array=True)
    for item in reader:
        if item.raw is None:
            raise ConfigError(f"{name}: {item.problem}")
        yield item.raw


def task_id_of(payload: bytes) -> str | None:
    """The task id of a payload, when it has a valid one."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    task_id = obj.get("id") if isinstance(obj, dict) else None
    return task_id if is_task_id(task_id) else None


async def stream_end(client: Client, keys: Keys) -> str:
    """The id of the results stream's last entry, where waiting starts from."""
    last: Any = await client.xrevrange(keys.results, count=1)
    return str(last[0][0].decode()) if last else "0-0"


async def submit(
    client: Client,
    keys: Keys,
    payloads: Iterator[bytes],
    *,
    outage_s: float = 60.0,
) -> list[Submitted]:
    """Adds every payload to the task stream, in pipelined batches.

    Args:
        outage_s: how long a Redis outage may hold up one batch.

    Raises:
        RedisConnectionError: Redis stayed unreachable for `outage_s`; the
            message says how many tasks went in before.
    """
    link = RedisLink()
    submitted: list[Submitted] = []
    batch: list[bytes] = []

    async def add(chunk: list[bytes]) -> list[Submitted]:
        try:
            async with asyncio.timeout(outage_s):
                return await link.call(
                    lambda: _add(client, keys, chunk), what="submit.add"
                )
        except TimeoutError:
            raise RedisConnectionError(
                f"Redis unreachable for {outage_s:g} s while adding tasks; "
                f"the first {len(submitted)} were added"
            ) from None

    for payload in payloads:
        batch.append(payload)
        if len(batch) >= _PIPELINE_SIZE:
            submitted += await add(batch)
            batch = []
    submitted += await add(batch)
    log.info("tasks.submitted", extra={"tasks": len(submitted), "stream": keys.tasks})
    return submitted


async def _add(client: Client, keys: Keys, batch: list[bytes]) -> list[Submitted]:
    if not batch:
        return []
    pipe = client.pipeline(transaction=False)
    for payload in batch:
        pipe.xadd(keys.tasks, {FIELD_TASK: payload})
    entry_ids = await pipe.execute()
    return [
        Submitted(entry_id.decode(), task_id_of(payload))
        for entry_id, payload in zip(entry_ids, batch, strict=True)
    ]


async def wait_for_results(
    client: Client,
    keys: Keys,
    submitted: list[Submitted],
    out: BinaryIO,
    *,
    after: str,
    timeout_s: float,
) -> list[Submitted]:
    """Prints the result of each submitted entry as it appears.

    Args:
        after: the results stream's last entry before the submission.

    Returns:
        The entries still without a result at the timeout, Redis outages
        included: one is ridden out until then, and results published
        meanwhile are read once Redis is back.
    """
    waiting = {entry.entry_id: entry for entry in submitted}
    link = RedisLink()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    cursor = after
    polls = 0

    async def take_published() -> str:
        return await _take_published(client, keys, waiting, out, cursor)

    async def take_stored() -> None:
        await _take_stored(client, keys, waiting, out)

    # Each attempt changes `waiting` only once its reply is in, so a retried
    # one prints nothing twice.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            while waiting and loop.time() < deadline:
                cursor = await link.call(take_published, what="submit.wait")
                # Stored results only answer ids settled before this
                # submission (or by a twin entry); looking them all up on
                # every poll would cost one MGET of every waiting id five
                # times a second.
                if polls % _STORED_EVERY_POLLS == 0:
                    await link.call(take_stored, what="submit.wait")
                polls += 1
                out.flush()
    out.flush()
    return list(waiting.values())


async def _take_published(
    client: Client,
    keys: Keys,
    waiting: dict[str, Submitted],
    out: BinaryIO,
    cursor: str,
) -> str:
    reply: Any = await client.xread({keys.results: cursor}, count=1000, block=_POLL_MS)
    for _stream, entries in reply or ():
        for entry_id, fields in entries:
            cursor = entry_id.decode()
            result = fields.get(FIELD_RESULT.encode(), b"")
            source = _source_of(result)
            if source in waiting:
                del waiting[source]
                out.write(result + b"\n")
    return cursor


async def _take_stored(
    client: Client, keys: Keys, waiting: dict[str, Submitted], out: BinaryIO
) -> None:
    """Prints stored results for ids that had one before this submission."""
    with_ids = [entry for entry in waiting.values() if entry.task_id is not None]
    if not with_ids:
        return
    values: Any = await client.mget([keys.result(str(e.task_id)) for e in with_ids])
    for entry, value in zip(with_ids, values, strict=True):
        # A result published for another entry of the same id is this entry's
        # answer too: the node acknowledges this one without publishing again.
        if value is not None and _source_of(value) != entry.entry_id:
            del waiting[entry.entry_id]
            out.write(value + b"\n")


def _source_of(result: bytes) -> str | None:
    try:
        source = orjson.loads(result).get("metadata", {}).get("source")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return source if isinstance(source, str) else None
