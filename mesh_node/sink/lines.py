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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from ..errors import OutputClosedError
from ..intake import Delivery
from ..tasks import TaskResult
from . import AlreadyAnsweredError, Start

if TYPE_CHECKING:
    from ..progress import Progress


class LineSink:
    """Writes one JSON line per result and flushes it.

    Args:
        stream: where results go; the caller owns it.
        ordered: write results in the order of their deliveries' `seq`.
        window: with `ordered`, how many finished results may wait for an
            earlier one.
        done: what an earlier run's output answered (`batch --resume`): its
            tasks are skipped without a call and without a line.
        progress: counts every delivery the worker is done with.
    """

    def __init__(
        self,
        stream: BinaryIO,
        *,
        ordered: bool = False,
        window: int = 0,
        done: Answered | None = None,
        progress: Progress | None = None,
    ) -> None:
        self._stream = stream
        self._ordered = ordered
        self._window = max(1, window)
        self._done = done or Answered()
        self._progress = progress
        # With `ordered`: the next position to write, and the lines that
        # wait for it (None: a delivery that ended without a line).
        self._next = 0
        self._waiting: dict[int, bytes | None] = {}
        self._advanced = asyncio.Event()
        # Positions that failed, or were skipped as answered before, until
        # `finished` counts them.
        self._failed: set[int] = set()
        self._skipped: set[int] = set()

    async def start(self) -> None:
        """Nothing runs in the background."""

    async def acquire(self, delivery: Delivery, task_id: str) -> Start:
        """Every task runs, except one whose id already has a result line."""
        if task_id in self._done.ids:
            self._skipped.add(delivery.seq)
            return Start.DONE
        return Start.RUN

    async def deliver(self, delivery: Delivery, result: TaskResult) -> None:
        """Writes the result line, or keeps it until its turn comes.

        The write blocks the event loop while the reader of stdout is slow; that
        is the backpressure a pipe gives, and a result line is small.
        """
        if result.taskId is None and delivery.source in self._done.sources:
            # A line that was no task, answered by the earlier run already.
            self._skipped.add(delivery.seq)
            raise AlreadyAnsweredError(delivery.source)
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
            self._progress.done(
                failed=delivery.seq in self._failed,
                skipped=delivery.seq in self._skipped,
            )
        self._failed.discard(delivery.seq)
        self._skipped.discard(delivery.seq)
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


# How every result line the node writes begins; a torn last line that begins
# so was cut short by a kill, anything else is not the node's.
RESULT_START = b'{"type":"task_result"'


class NotResultsError(ValueError):
    """An output file to resume holds a line that is no result of the node's."""


@dataclass(frozen=True, slots=True)
class Answered:
    """What an earlier run's output file has answered.

    Args:
        ids: the task ids with a result, `cancelled` ones excepted.
        sources: where the answered tasks without an id came from (`line 3`):
            lines that could not be read as a task, answered once is enough.
    """

    ids: frozenset[str] = frozenset()
    sources: frozenset[str] = frozenset()


def answered(path: str) -> Answered:
    """Reads back an earlier run's output file, for `--resume`.

    A `cancelled` result does not count: its task never ran to the end, and
    the line the new run writes for it supersedes it. A last line cut short
    by a kill is cut off, so that the new run appends after a whole line (its
    task runs again); a whole last result that only lacks its newline gets
    one. Nothing else is changed.

    Raises:
        NotResultsError: a line is not a result line: the file is not an
            earlier run's output, and is left as it was.
        OSError: the file exists but cannot be read or written.
    """
    ids: set[str] = set()
    sources: set[str] = set()
    try:
        output = open(path, "r+b")  # noqa: SIM115
    except FileNotFoundError:
        return Answered()
    with output:
        whole = 0
        for number, line in enumerate(output, start=1):
            result = _result(line)
            if result is None and not line.endswith(b"\n"):
                if not line.startswith(RESULT_START):
                    raise NotResultsError(f"line {number} is not a result line")
                output.truncate(whole)
                break
            if result is None:
                raise NotResultsError(f"line {number} is not a result line")
            if not line.endswith(b"\n"):
                output.seek(0, os.SEEK_END)
                output.write(b"\n")
            whole += len(line)
            _note(result, ids, sources)
    return Answered(frozenset(ids), frozenset(sources))


def _result(line: bytes) -> dict[str, Any] | None:
    try:
        result = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if (
        not isinstance(result, dict)
        or result.get("type") != "task_result"
        or not isinstance(result.get("success"), bool)
        or not isinstance(result.get("metadata"), dict)
    ):
        return None
    return result


def _note(result: dict[str, Any], ids: set[str], sources: set[str]) -> None:
    task_id, error = result.get("taskId"), result.get("error")
    if isinstance(error, dict) and error.get("type") == "cancelled":
        return
    if isinstance(task_id, str):
        ids.add(task_id)
        return
    metadata = result.get("metadata")
    source = metadata.get("source") if isinstance(metadata, dict) else None
    if isinstance(source, str):
        sources.add(source)
