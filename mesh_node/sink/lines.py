"""Results as JSON lines on stdout or in a file, written as each task finishes."""

from __future__ import annotations

import contextlib
import os
from typing import BinaryIO

from ..errors import OutputClosedError
from ..intake import Delivery
from ..tasks import TaskResult
from . import Start


class LineSink:
    """Writes one JSON line per result and flushes it at once.

    Args:
        stream: where results go; the caller owns it.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    async def start(self) -> None:
        """Nothing runs in the background."""

    async def acquire(self, delivery: Delivery, task_id: str) -> Start:
        """Lines carry no memory of earlier runs: every task runs."""
        return Start.RUN

    async def deliver(self, delivery: Delivery, result: TaskResult) -> None:
        """Writes the result line.

        The write blocks the event loop while the reader of stdout is slow; that
        is the backpressure a pipe gives, and a result line is small.
        """
        try:
            self._stream.write(result.to_json().encode() + b"\n")
            self._stream.flush()
        except (BrokenPipeError, ValueError) as exc:
            # ValueError: the stream was closed under us. Either way nobody
            # reads the results any more; further calls would be paid for
            # and thrown away.
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
        """Flushes the stream."""
        with contextlib.suppress(BrokenPipeError, ValueError):
            self._stream.flush()


def _silence(stream: BinaryIO) -> None:
    """Points a dead stream's descriptor at /dev/null, so exit flushes quietly."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
