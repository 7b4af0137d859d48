"""Where tasks come from: the `Intake` protocol and what one delivery carries.

Implementations: `RedisStreamIntake` (the node's task stream) and `LineIntake`
(stdin and batch files, JSON lines or a JSON array).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Delivery:
    """One task as it arrived, before admission.

    Args:
        raw: the task's JSON text; None when the input held none.
        source: where it came from, for results and logs (`line 3`, an entry id).
        entry_id: the stream entry to acknowledge, for stream deliveries.
        traceparent: the producer's trace context, when the transport carried one.
        problem: a fault the intake found before parsing (an oversize line).
        deliveries: how many times the entry has been delivered, this time
            included.
        seq: its position in a line input, from 0, for output in input order.
    """

    raw: bytes | None
    source: str
    entry_id: str | None = None
    traceparent: str | None = None
    problem: str | None = None
    deliveries: int = 1
    seq: int = 0


class Intake(Protocol):
    """A source of deliveries that never reads ahead of the worker's free slots."""

    @property
    def exhausted(self) -> bool:
        """True once the source has nothing more to give, ever."""
        ...

    @property
    def redeliverable(self) -> bool:
        """True when an unfinished delivery comes back later by itself.

        A stream entry left unacknowledged does; a line of stdin does not, so
        the worker must answer every line it took, even when cancelled.
        """
        ...

    async def start(self) -> None:
        """Prepares the source (opens files, creates the consumer group)."""
        ...

    async def receive(self, max_count: int) -> list[Delivery]:
        """Waits briefly for up to `max_count` deliveries; [] when none came."""
        ...

    def finished(self, delivery: Delivery) -> None:
        """Told when the worker is done with a delivery, settled or not."""
        ...

    async def close(self) -> None:
        """Releases what `start` took."""
        ...
