"""Tasks from a byte stream: stdin in interactive mode, a file in batch mode.

The input is JSON lines, or for files one JSON array. A reader thread does the
blocking reads, because asyncio cannot watch regular files or every kind of
stdin; it reads a line only when the worker has granted it a credit, so the
node never holds more tasks than it has free slots.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import BinaryIO

import orjson

from . import Delivery

# How long `receive` waits before returning empty-handed, so that the worker
# sees a stop request within this time.
_POLL_S = 0.25


class LineIntake:
    """Reads deliveries from a binary stream in a daemon thread.

    Args:
        stream: where the tasks come from; closed by `close` unless it is stdin.
        max_line_bytes: longer lines are skipped unread and reported.
        allow_array: accept a JSON array of tasks (batch files) as well.
    """

    redeliverable = False

    def __init__(
        self, stream: BinaryIO, *, max_line_bytes: int, allow_array: bool = False
    ) -> None:
        self._stream = stream
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
        first = self._stream.peek(1)[:1] if hasattr(self._stream, "peek") else b""
        if self._allow_array and first.lstrip() == b"[":
            yield from self._array_items()
            return
        number = 0
        while True:
            number += 1
            line, size = self._read_line()
            if not line and size == 0:
                return
            delivery = self._line_delivery(line, size, number)
            if delivery is None:
                continue
            yield delivery
            self._credits.acquire()

    def _read_line(self) -> tuple[bytes, int]:
        """One line; for a line over the limit, b"" and its size without the end."""
        line = self._stream.readline(self._max_line_bytes + 1)
        if len(line) <= self._max_line_bytes or line.endswith(b"\n"):
            return line, len(line)
        size = len(line)
        while not line.endswith(b"\n"):
            line = self._stream.readline(65_536)
            size += len(line)
            if not line:
                break
        return b"", size - (len(line) - len(line.rstrip(b"\r\n")))

    def _line_delivery(self, line: bytes, size: int, number: int) -> Delivery | None:
        source = f"line {number}"
        if not line:
            return Delivery(
                raw=None,
                source=source,
                problem=f"task is {size} bytes, over the limit of "
                f"{self._max_line_bytes}",
            )
        line = line.rstrip(b"\r\n")
        if not line.strip():
            return None
        return Delivery(raw=line, source=source)

    def _array_items(self) -> Iterator[Delivery]:
        # A JSON array is parsed whole; JSON lines are the format for inputs
        # too large to hold in memory.
        try:
            items = orjson.loads(self._stream.read())
        except orjson.JSONDecodeError as exc:
            yield Delivery(raw=None, source="array", problem=f"not valid JSON: {exc}")
            return
        for index, item in enumerate(items):
            if index:
                self._credits.acquire()
            yield Delivery(raw=orjson.dumps(item), source=f"item {index}")
