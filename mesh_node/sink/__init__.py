"""Where results go: the `Sink` protocol.

Implementations: `RedisStreamSink` (results stream, stored result and XACK in one
atomic step) and `LineSink` (JSON lines on stdout or a file).
"""

from __future__ import annotations

from typing import Protocol

from ..intake import Delivery
from ..tasks import TaskResult


class Sink(Protocol):
    """Makes a task's result durable, then settles its delivery."""

    async def already_done(self, delivery: Delivery, task_id: str) -> bool:
        """Settles a delivery whose task id already has a result; True if so."""
        ...

    async def deliver(self, delivery: Delivery, result: TaskResult) -> None:
        """Publishes the result and settles the delivery, in that order."""
        ...

    async def close(self) -> None:
        """Flushes and releases what the sink holds."""
        ...
