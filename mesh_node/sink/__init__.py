"""Where results go: the `Sink` protocol.

Implementations: `RedisStreamSink` (results stream, stored result and XACK in one
atomic step) and `LineSink` (JSON lines on stdout or a file).
"""

from __future__ import annotations

import enum
from typing import Protocol

from ..intake import Delivery
from ..tasks import TaskResult


class AlreadyAnsweredError(Exception):
    """Raised by `deliver` for a result an earlier run already wrote (a line
    that was no task, resumed by `batch --resume`): the task is skipped."""


class Start(enum.StrEnum):
    """What the sink says when a task asks to run."""

    RUN = "run"
    """The task holds its id's lease: run it."""
    DONE = "done"
    """The id already has a result; the delivery was settled without a call."""
    RUNNING_ELSEWHERE = "running_elsewhere"
    """Another delivery of the id is running; this one was settled without a call."""
    HELD_ELSEWHERE = "held_elsewhere"
    """This very entry is running on another node; left to that node."""


class Sink(Protocol):
    """Makes a task's result durable, then settles its delivery."""

    async def start(self) -> None:
        """Starts whatever the sink keeps up in the background."""
        ...

    async def acquire(self, delivery: Delivery, task_id: str) -> Start:
        """Asks to run a task id; settles the delivery itself when it must not run."""
        ...

    async def deliver(self, delivery: Delivery, result: TaskResult) -> None:
        """Publishes the result and settles the delivery, in that order."""
        ...

    async def dead_letter(
        self, delivery: Delivery, result: TaskResult, reason: str
    ) -> None:
        """Sets a delivery aside for good, with its failed result."""
        ...

    async def release(self, delivery: Delivery) -> None:
        """Gives up a delivery unfinished, so that it can run again later."""
        ...

    async def close(self) -> None:
        """Flushes and releases what the sink holds."""
        ...
