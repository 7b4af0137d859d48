"""Tasks out of a byte stream: JSON lines, or one JSON array, with a line size cap.

Reads the file descriptor with `os.read` rather than through a buffered file
object: a reader thread blocked on stdin then holds no interpreter lock, so
the process can exit at once on a signal while stdin is still open.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

_CHUNK_BYTES = 65_536
_WHITESPACE = b" \t\r\n"


@dataclass(frozen=True, slots=True)
class Item:
    """One task as read, or what was wrong with it.

    Args:
        raw: the task's JSON text; None when `problem` says why there is none.
        source: `line N` (1-based, blank lines counted) or `item N` (0-based).
        problem: what the reader found wrong before any parsing.
    """

    raw: bytes | None
    source: str
    problem: str | None = None


class TaskReader:
    """Iterates over the tasks of a file descriptor.

    Args:
        fd: the descriptor; read to its end, never closed here.
        max_line_bytes: longer lines are skipped unread and reported.
        allow_array: a stream whose first non-blank byte is `[` is one JSON array.
    """

    def __init__(self, fd: int, *, max_line_bytes: int, allow_array: bool) -> None:
        self._fd = fd
        self._max_line_bytes = max_line_bytes
        self._allow_array = allow_array
        self._buffer = bytearray()
        self._eof = False

    def __iter__(self) -> Iterator[Item]:
        if self._allow_array and self._starts_with(b"["):
            yield from self._array_items()
        else:
            yield from self._line_items()

    def _fill(self) -> bool:
        """Reads one more chunk; False at the end of the input."""
        if self._eof:
            return False
        chunk = os.read(self._fd, _CHUNK_BYTES)
        self._eof = not chunk
        self._buffer += chunk
        return bool(chunk)

    def _starts_with(self, marker: bytes) -> bool:
        while not self._buffer.lstrip(_WHITESPACE) and self._fill():
            pass
        return self._buffer.lstrip(_WHITESPACE)[:1] == marker

    def _line_items(self) -> Iterator[Item]:
        number = 0
        while True:
            line, size = self._next_line()
            if line is None:
                return
            number += 1
            if size > self._max_line_bytes:
                yield Item(
                    None,
                    f"line {number}",
                    f"task is {size} bytes, over the limit of {self._max_line_bytes}",
                )
            elif line.strip(_WHITESPACE):
                yield Item(line.rstrip(b"\r"), f"line {number}")

    def _next_line(self) -> tuple[bytes | None, int]:
        """The next line without its end, and its size; (None, 0) at the end.

        A line over the limit is not kept: its bytes are counted and dropped.
        """
        skipped = 0
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                size = skipped + len(line.rstrip(b"\r"))
                return (line if not skipped else b""), size
            if len(self._buffer) > self._max_line_bytes:
                skipped += len(self._buffer)
                self._buffer.clear()
            if not self._fill():
                break
        if not self._buffer and not skipped:
            return None, 0
        line = bytes(self._buffer)
        self._buffer.clear()
        return (line if not skipped else b""), skipped + len(line)

    def _array_items(self) -> Iterator[Item]:
        # An array is parsed whole: JSON lines are the format for inputs too
        # large to hold in memory.
        while self._fill():
            pass
        try:
            items = orjson.loads(bytes(self._buffer))
        except orjson.JSONDecodeError as exc:
            yield Item(None, "array", f"not a valid JSON array ({exc})")
            return
        self._buffer.clear()
        for index, item in enumerate(items):
            yield Item(orjson.dumps(item), f"item {index}")
