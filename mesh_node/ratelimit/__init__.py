"""How fast and how much: the limiter shared by everything that uses one API key.

Limits are sliding windows: at most `limit` units (requests, tokens, micro-
dollars) in any `window_ms`. A sliding window rather than a token bucket,
because it is the stricter of the two: whatever the API's own accounting, a
node that never exceeds a sliding window is never refused for exceeding it.
Token windows reserve the most a call can use (its input estimate plus its
`max_tokens`) and are settled to the actual usage when the answer comes, so
that concurrent calls cannot overspend together.

Two backends hold the windows with the same rules: `RedisLimitBackend`
(atomic Lua, shared by every process using the key on one Redis, keyed by a
hash of the key) and `MemoryLimitBackend` (one process: stdin and batch modes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..redis_link import Stop

# Added to every window, so that a request admitted as the window frees does
# not reach the API a moment before the API's own window has freed.
SAFETY_MS = 250


class WindowKind(enum.StrEnum):
    """Whether a window paces requests or caps spending."""

    RATE = "rate"
    """A rate limit: waiting for it is normal."""
    BUDGET = "budget"
    """A spending cap: when spent, new work holds or fails."""


class Unit(enum.StrEnum):
    """What a window counts."""

    REQUESTS = "requests"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    TOKENS = "tokens"
    """Input and output tokens together."""
    MICRO_USD = "micro_usd"
    """Cost, from the price table."""


@dataclass(frozen=True, slots=True)
class Window:
    """One sliding-window limit.

    Args:
        name: stable name, part of the Redis key (`requests_per_minute`).
        limit: units allowed in any window.
        window_ms: the window's length.
        unit: what it counts.
        kind: rate limit or budget.
    """

    name: str
    limit: int
    window_ms: int
    unit: Unit = Unit.REQUESTS
    kind: WindowKind = WindowKind.RATE


@dataclass(frozen=True, slots=True)
class Verdict:
    """A backend's answer to a request for room.

    Args:
        wait_ms: 0 when admitted; how long until there may be room; -1 when
            the cost is larger than the whole limit and can never fit.
        window: the index of the window that said no, or -1.
        paused_ms: >0 when the whole key is paused (a 429 said so).
    """

    wait_ms: int
    window: int = -1
    paused_ms: int = 0


class LimitBackend(Protocol):
    """Holds the windows of one API key."""

    async def acquire(
        self, windows: list[Window], costs: list[int], token: str, *, dry_run: bool
    ) -> Verdict:
        """Admits the costs in every window at once, or says how long to wait."""
        ...

    async def acquire_many(
        self,
        windows: list[Window],
        requests: list[tuple[str, list[int]]],
        *,
        stop: Stop | None = None,
    ) -> tuple[int, Verdict]:
        """Admits `(token, costs)` requests in order while they fit.

        Raises:
            RedisUnavailableError: `stop` was set while the backend was
                unreachable; nothing was admitted.

        Returns:
            How many were admitted, and the verdict on the first that was not
            (`Verdict(0)` when all were).
        """
        ...

    async def settle(
        self, windows: list[Window], token: str, reserved: list[int], actual: list[int]
    ) -> None:
        """Replaces a reservation's costs with what was actually used."""
        ...

    def forget(self, windows: list[Window], token: str) -> None:
        """Told that a reservation was used as reserved and needs no settling."""
        ...

    async def pause(self, duration_ms: int, reason: str) -> None:
        """Stops all work on the key for a while (extends, never shortens)."""
        ...

    async def paused(self) -> tuple[int, str | None]:
        """How long the key stays paused, in ms, and why."""
        ...

    def rekey(self, api_key: str) -> None:
        """Keeps the windows of another API key from now on."""
        ...
