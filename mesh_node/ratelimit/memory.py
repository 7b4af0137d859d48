"""The limiter's windows in one process's memory, for stdin and batch modes."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import SAFETY_MS, Verdict, Window

if TYPE_CHECKING:
    from ..redis_link import Stop

# Settled entries of one second are kept as one: the window then holds some
# 3,600 entries an hour, whatever the rate, and not one per call.
_BUCKET_MS = 1000
# Entries added between two compactions, at least.
_COMPACT_EVERY = 1024


@dataclass(slots=True)
class _Entry:
    at_ms: int
    cost: int
    settled: bool = False


@dataclass
class _Window:
    """One window's entries, oldest first, with their running total.

    The total and the index by token keep admission and settlement O(1) in
    the number of entries. Once settled (or forgotten: used as reserved), an
    entry leaves the index, and from time to time the settled entries of each
    second are merged into one that ages out at the last of their times, so
    that memory does not grow with the calls a window has counted.
    """

    entries: deque[_Entry] = field(default_factory=deque)
    used: int = 0
    by_token: dict[str, _Entry] = field(default_factory=dict)
    _compact_at: int = _COMPACT_EVERY

    def purge(self, before_ms: int) -> None:
        while self.entries and self.entries[0].at_ms <= before_ms:
            gone = self.entries.popleft()
            self.used -= gone.cost
        # A reservation never settled (its task cancelled) leaves the index
        # when its entry leaves the window.
        oldest_ms = self.entries[0].at_ms if self.entries else None
        while self.by_token:
            token, entry = next(iter(self.by_token.items()))
            if oldest_ms is not None and entry.at_ms >= oldest_ms:
                break
            del self.by_token[token]

    def add(self, token: str, entry: _Entry) -> None:
        self.entries.append(entry)
        self.used += entry.cost
        self.by_token[token] = entry
        if len(self.entries) >= self._compact_at:
            self._compact()

    def settle(self, token: str, cost: int) -> None:
        entry = self.by_token.pop(token, None)
        if entry is not None:
            self.used += cost - entry.cost
            entry.cost = cost
            entry.settled = True

    def _compact(self) -> None:
        # A merged entry ages out with the latest of its calls: up to a
        # second late for the others, which only ever makes room later.
        merged: deque[_Entry] = deque()
        start_ms = 0
        for entry in self.entries:
            last = merged[-1] if merged else None
            if (
                last is not None
                and last.settled
                and entry.settled
                and entry.at_ms - start_ms < _BUCKET_MS
            ):
                last.at_ms = entry.at_ms
                last.cost += entry.cost
                continue
            merged.append(entry)
            start_ms = entry.at_ms
        self.entries = merged
        self._compact_at = 2 * len(merged) + _COMPACT_EVERY


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
                self._window(window).add(token, _Entry(now_ms, cost))
        return verdict

    async def acquire_many(
        self,
        windows: list[Window],
        requests: list[tuple[str, list[int]]],
        *,
        stop: Stop | None = None,
    ) -> tuple[int, Verdict]:
        """Admits requests in order while they fit (memory is never out of reach)."""
        for admitted, (token, costs) in enumerate(requests):
            verdict = await self.acquire(windows, costs, token, dry_run=False)
            if verdict.wait_ms:
                return admitted, verdict
        return len(requests), Verdict(0)

    async def settle(
        self, windows: list[Window], token: str, reserved: list[int], actual: list[int]
    ) -> None:
        """Replaces a reservation's costs with what was actually used."""
        for window, new_cost in zip(windows, actual, strict=True):
            # A zero-cost entry stays until it ages out; it counts nothing.
            self._window(window).settle(token, new_cost)

    def forget(self, windows: list[Window], token: str) -> None:
        """Marks a reservation used as reserved: its entry may now merge."""
        for window in windows:
            state = self._windows.get(window.name)
            entry = state.by_token.get(token) if state is not None else None
            if state is not None and entry is not None:
                state.settle(token, entry.cost)

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
