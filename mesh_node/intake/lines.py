"""Tasks from a file descriptor: stdin in interactive mode, a file in batch mode.

The input is JSON lines, or for files one JSON array (`jsonl.TaskReader`). A
reader thread does the blocking reads, because asyncio cannot watch regular
files or every kind of stdin; it reads a task only when the worker has granted
it a credit, so the node never holds more tasks than it has free slots.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

from ..jsonl import TaskReader
from . import Delivery

# How long `receive` waits before returning empty-handed, so that the worker
# sees a stop request within this time.
_POLL_S = 0.25


class LineIntake:
    """Reads deliveries from a binary stream in a daemon thread.

    Args:
        fd: the file descriptor the tasks come from; the caller closes it.
        max_line_bytes: longer lines are skipped unread and reported.
        allow_array: accept a JSON array of tasks (batch files) as well.
        on_finished: told of every delivery the worker is done with, answered
            or not (`LineSink.finished`).
    """

    redeliverable = False

    def __init__(
        self,
        fd: int,
        *,
        max_line_bytes: int,
        allow_array: bool = False,
        on_finished: Callable[[Delivery], None] | None = None,
    ) -> None:
        self._fd = fd
        self._on_finished = on_finished
        self._max_line_bytes = max_line_bytes
        self._allow_array = allow_array
        self._queue: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._credits = threading.Semaphore(0)
        self._granted = 0
        self._exhausted = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def exhausted(self) -> bool:
        """True once the end of the input has been received."""
        return self._exhausted

    async def start(self) -> None:
        """Starts the reader thread."""
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read_all, name="line-intake", daemon=True).start()

    async def receive(self, max_count: int) -> list[Delivery]:
        """Grants credits up to `max_count` and returns what has been read."""
        if self._exhausted:
            return []
        if max_count > self._granted:
            self._credits.release(max_count - self._granted)
            self._granted = max_count
        try:
            first = await asyncio.wait_for(self._queue.get(), timeout=_POLL_S)
        except TimeoutError:
            return []
        items = [first]
        while len(items) < max_count and not self._queue.empty():
            items.append(self._queue.get_nowait())
        self._granted -= len(items)
        self._exhausted = None in items
        return [item for item in items if item is not None]

    def finished(self, delivery: Delivery) -> None:
        """Passes the news on; lines need no bookkeeping of their own."""
        if self._on_finished is not None:
            self._on_finished(delivery)

    async def close(self) -> None:
        """Nothing to release: the daemon thread ends with the input or the process."""

    def _read_all(self) -> None:
        try:
            for delivery in self._deliveries():
                if not self._hand_over(delivery):
                    return
        finally:
            self._hand_over(None)

    def _hand_over(self, delivery: Delivery | None) -> bool:
        """Passes one item to the event loop; False once the loop is gone."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delivery)
        except RuntimeError:
            return False
        return True

    def _deliveries(self) -> Iterator[Delivery]:
        self._credits.acquire()
        reader = TaskReader(
            self._fd, max_line_bytes=self._max_line_bytes, allow_array=self._allow_array
        )
        for seq, item in enumerate(reader):
            yield Delivery(
                raw=item.raw, source=item.source, problem=item.problem, seq=seq
            )
            self._credits.acquire()
