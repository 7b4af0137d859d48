"""The limiter's windows in one process's memory, for stdin and batch modes."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from . import SAFETY_MS, Verdict, Window


@dataclass
class _Entry:
    at_ms: int
    token: str
    cost: int


@dataclass
class _Window:
    """One window's entries, oldest first, with their running total.

    The total and the index by token keep admission and settlement O(1) in
    the number of entries, which an hour's window at a high limit makes large.
    """

    entries: deque[_Entry] = field(default_factory=deque)
    used: int = 0
    by_token: dict[str, _Entry] = field(default_factory=dict)

    def purge(self, before_ms: int) -> None:
        while self.entries and self.entries[0].at_ms <= before_ms:
            gone = self.entries.popleft()
            self.used -= gone.cost
            self.by_token.pop(gone.token, None)

    def add(self, entry: _Entry) -> None:
        self.entries.append(entry)
        self.used += entry.cost
        self.by_token[entry.token] = entry


@dataclass
class MemoryLimitBackend:
    """Sliding windows as deques; the same rules as the Redis backend's script."""

    _windows: dict[str, _Window] = field(default_factory=dict)
    _paused_until_ms: int = 0
    _pause_reason: str | None = None

    def rekey(self, api_key: str) -> None:
        """Starts empty windows: a new key has limits of its own."""
        self._windows.clear()
        self._paused_until_ms = 0
        self._pause_reason = None

    async def acquire(
        self, windows: list[Window], costs: list[int], token: str, *, dry_run: bool
    ) -> Verdict:
        """Admits the costs in every window at once, or says how long to wait."""
        now_ms = _now_ms()
        if self._paused_until_ms > now_ms:
            left_ms = self._paused_until_ms - now_ms
            return Verdict(left_ms, paused_ms=left_ms)
        verdict = Verdict(0)
        for index, (window, cost) in enumerate(zip(windows, costs, strict=True)):
            wait_ms = self._wait_ms(window, cost, now_ms)
            if wait_ms < 0:
                return Verdict(-1, index)
            if wait_ms > verdict.wait_ms:
                verdict = Verdict(wait_ms, index)
        if verdict.wait_ms or dry_run:
            return verdict
        for window, cost in zip(windows, costs, strict=True):
            if cost > 0:
                self._window(window).add(_Entry(now_ms, token, cost))
        return verdict

    async def settle(
        self, windows: list[Window], token: str, reserved: list[int], actual: list[int]
    ) -> None:
        """Replaces a reservation's costs with what was actually used."""
        for window, new_cost in zip(windows, actual, strict=True):
            state = self._window(window)
            entry = state.by_token.get(token)
            if entry is not None:
                # A zero-cost entry stays until it ages out; it counts nothing.
                state.used += new_cost - entry.cost
                entry.cost = new_cost

    async def pause(self, duration_ms: int, reason: str) -> None:
        """Stops all work on the key for a while (extends, never shortens)."""
        until_ms = _now_ms() + duration_ms
        if until_ms > self._paused_until_ms:
            self._paused_until_ms, self._pause_reason = until_ms, reason

    async def paused(self) -> tuple[int, str | None]:
        """How long the key stays paused, in ms, and why."""
        left_ms = self._paused_until_ms - _now_ms()
        return (left_ms, self._pause_reason) if left_ms > 0 else (0, None)

    def _window(self, window: Window) -> _Window:
        return self._windows.setdefault(window.name, _Window())

    def _wait_ms(self, window: Window, cost: int, now_ms: int) -> int:
        if cost > window.limit:
            return -1
        state = self._window(window)
        span_ms = window.window_ms + SAFETY_MS
        state.purge(now_ms - span_ms)
        need = state.used + max(cost, 1) - window.limit
        if need <= 0:
            return 0
        # Only when full: walk from the oldest until enough would be freed.
        freed = 0
        for entry in state.entries:
            freed += entry.cost
            if freed >= need:
                return entry.at_ms + span_ms - now_ms + 1
        return span_ms


def _now_ms() -> int:
    return int(time.time() * 1000)
