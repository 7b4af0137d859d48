"""Results as JSON lines on stdout or in a file.

By default each result is written as soon as its task finishes. With
`ordered`, results are written in input order: a result that finishes ahead
of an earlier task waits in memory, and at most `window` of them wait; past
that its task waits in `deliver`, holding its slot, so that the node stops
reading ahead of a slow task instead of buffering the rest of the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Collection
from typing import TYPE_CHECKING, BinaryIO

import orjson

from ..errors import OutputClosedError
from ..intake import Delivery
from ..tasks import TaskResult
from . import Start

if TYPE_CHECKING:
    from ..progress import Progress


class LineSink:
    """Writes one JSON line per result and flushes it.

    Args:
        stream: where results go; the caller owns it.
        ordered: write results in the order of their deliveries' `seq`.
        window: with `ordered`, how many finished results may wait for an
            earlier one.
        done_ids: task ids that already have a result (`batch --resume`);
            their tasks are skipped without a call and without a line.
        progress: counts every delivery the worker is done with.
    """

    def __init__(
        self,
        stream: BinaryIO,
        *,
        ordered: bool = False,
        window: int = 0,
        done_ids: Collection[str] = (),
        progress: Progress | None = None,
    ) -> None:
        self._stream = stream
        self._ordered = ordered
        self._window = max(1, window)
        self._done_ids = done_ids
        self._progress = progress
        # With `ordered`: the next position to write, and the lines that
        # wait for it (None: a delivery that ended without a line).
        self._next = 0
        self._waiting: dict[int, bytes | None] = {}
        self._advanced = asyncio.Event()
        self._failed: set[int] = set()

    async def start(self) -> None:
        """Nothing runs in the background."""

    async def acquire(self, delivery: Delivery, task_id: str) -> Start:
        """Every task runs, except one whose id already has a result line."""
        return Start.DONE if task_id in self._done_ids else Start.RUN

    async def deliver(self, delivery: Delivery, result: TaskResult) -> None:
        """Writes the result line, or keeps it until its turn comes.

        The write blocks the event loop while the reader of stdout is slow; that
        is the backpressure a pipe gives, and a result line is small.
        """
        line = result.to_json().encode() + b"\n"
        if not result.success:
            self._failed.add(delivery.seq)
        if not self._ordered:
            self._write(line)
            return
        while delivery.seq >= self._next + self._window:
            advanced = self._advanced
            await advanced.wait()
        self._waiting[delivery.seq] = line
        self._write_ready()

    def finished(self, delivery: Delivery) -> None:
        """Told of every delivery once the worker is done with it, after its
        `deliver` if it had one; a delivery that ended without a line (an id
        already done, a fault of the node) no longer holds up the ones after it.
        """
        if self._progress is not None:
            self._progress.done(failed=delivery.seq in self._failed)
        self._failed.discard(delivery.seq)
        if self._ordered and delivery.seq >= self._next:
            self._waiting.setdefault(delivery.seq, None)
            with contextlib.suppress(OutputClosedError):
                # A closed output was reported by the `deliver` that found it.
                self._write_ready()

    def _write_ready(self) -> None:
        """Writes the lines whose turn has come."""
        if self._next not in self._waiting:
            return
        while self._next in self._waiting:
            line = self._waiting.pop(self._next)
            self._next += 1
            if line is not None:
                self._write(line, flush=False)
        self._flush()
        self._advanced.set()
        self._advanced = asyncio.Event()

    def _write(self, line: bytes, *, flush: bool = True) -> None:
        try:
            self._stream.write(line)
        except (BrokenPipeError, ValueError) as exc:
            self._closed(exc)
        if flush:
            self._flush()

    def _flush(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, ValueError) as exc:
            self._closed(exc)

    def _closed(self, exc: Exception) -> None:
        # ValueError: the stream was closed under us. Either way nobody reads
        # the results any more; further calls would be paid for and thrown away.
        _silence(self._stream)
        raise OutputClosedError(str(exc)) from None

    async def dead_letter(
        self, delivery: Delivery, result: TaskResult, reason: str
    ) -> None:
        """A line has no dead-letter queue: its failed result is its answer."""
        await self.deliver(delivery, result)

    async def release(self, delivery: Delivery) -> None:
        """A line cannot come back; the worker answers it instead."""

    async def close(self) -> None:
        """Writes what still waits, in order, and flushes the stream."""
        with contextlib.suppress(BrokenPipeError, ValueError, OutputClosedError):
            for seq in sorted(self._waiting):
                line = self._waiting.pop(seq)
                if line is not None:
                    self._write(line, flush=False)
            self._stream.flush()


def _silence(stream: BinaryIO) -> None:
    """Points a dead stream's descriptor at /dev/null, so exit flushes quietly."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def answered_ids(path: str) -> set[str]:
    """The task ids an earlier run's output file has answered, for `--resume`.

    A `cancelled` result does not count: its task never ran to the end, and
    the line the new run writes for it supersedes it. A last line without
    its newline (the earlier run was killed as it wrote) is cut off, so that
    the new run appends after a whole line; its task runs again.

    Raises:
        OSError: the file exists but cannot be read or cut.
    """
    ids: set[str] = set()
    try:
        output = open(path, "r+b")  # noqa: SIM115
    except FileNotFoundError:
        return ids
    with output:
        whole = 0
        for line in output:
            if not line.endswith(b"\n"):
                output.truncate(whole)
                break
            whole += len(line)
            task_id = _answered(line)
            if task_id is not None:
                ids.add(task_id)
    return ids


def _answered(line: bytes) -> str | None:
    try:
        result = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(result, dict):
        return None
    task_id, error = result.get("taskId"), result.get("error")
    if isinstance(error, dict) and error.get("type") == "cancelled":
        return None
    return task_id if isinstance(task_id, str) else None
