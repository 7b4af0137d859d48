"""The closed-loop producer, and the window it measures.

It submits `in_flight` tasks, then one more each time a result arrives, so the
consumer always has exactly that many outstanding. Results are read from the
results stream with a blocking XREAD; each answered batch is replaced with one
pipelined batch of XADDs. A warm-up (at least `warmup_s`, and at least one
turnover of every slot) comes before the measured window, and a drain after it
checks that every submitted task was answered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import redis

from . import wire

Encoder = Callable[[str, int], tuple[str, dict[str, Any]]]
"""(task id, task number) -> (stream, entry fields) in the system's own format."""

READ_COUNT = 2000
READ_BLOCK_MS = 500
# However slow a system is, a run ends: warm-up is cut off after this long.
WARMUP_CAP_S = 90.0


class StalledError(RuntimeError):
    """No result arrived for `stall_s` while tasks were outstanding."""


@dataclass(frozen=True)
class Plan:
    """How one closed loop runs.

    Attributes:
        in_flight: tasks kept outstanding.
        warmup_s: the shortest warm-up.
        measure_s: the measured window.
        api_latency_ms: the simulator's fixed latency, taken off each task's time.
        drain_s: how long to wait for the last answers after the window.
        stall_s: how long without any answer before the run is given up.
    """

    in_flight: int
    warmup_s: float
    measure_s: float
    api_latency_ms: float
    drain_s: float = 30.0
    stall_s: float = 30.0


@dataclass
class Window:
    """What the measured window saw.

    `before` and `after` are the watched counters (CPU seconds per process,
    Redis command counts) at the window's edges.
    """

    tasks: int = 0
    elapsed_s: float = 0.0
    added_ms: list[float] = field(default_factory=list)
    failures: int = 0
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    answered_total: int = 0
    lost: int = 0
    harness_commands: int = 0


class ClosedLoop:
    """One closed-loop run against one consumer."""

    def __init__(
        self,
        rdb: redis.Redis,
        encode: Encoder,
        plan: Plan,
        watch: Callable[[], dict[str, float]],
    ) -> None:
        self._rdb = rdb
        self._encode = encode
        self._plan = plan
        self._watch = watch
        self._sent: dict[bytes, float] = {}
        self._next = 0
        self._last_id = b"0-0"
        self._last_answer_s = time.monotonic()
        self._answered = 0
        self._commands = 0
        self.window = Window()

    def run(self) -> Window:
        """Warm-up, the measured window, then the drain; returns the window."""
        started_s = time.monotonic()
        self._submit(self._plan.in_flight)
        self._warm_up(started_s)
        self.window.before = self._watch()
        commands_before = self._commands
        window_start_s = time.monotonic()
        window_end_s = window_start_s + self._plan.measure_s
        while time.monotonic() < window_end_s:
            self._step(record=True)
        self.window.elapsed_s = time.monotonic() - window_start_s
        self.window.after = self._watch()
        self.window.harness_commands = self._commands - commands_before
        self._drain()
        self.window.answered_total = self._answered
        self.window.lost = len(self._sent)
        return self.window

    def _warm_up(self, started_s: float) -> None:
        ready_s = started_s + self._plan.warmup_s
        cap_s = started_s + max(WARMUP_CAP_S, self._plan.warmup_s)
        while True:
            now = time.monotonic()
            turned_over = self._answered >= self._plan.in_flight
            if (now >= ready_s and turned_over) or now >= cap_s:
                return
            self._step(record=False)

    def _drain(self) -> None:
        deadline_s = time.monotonic() + self._plan.drain_s
        while self._sent and time.monotonic() < deadline_s:
            self._step(record=False, refill=False)

    def _step(self, *, record: bool, refill: bool = True) -> None:
        """Reads one batch of results; replaces each answered task with a new one."""
        reply: Any = self._rdb.xread(
            {wire.RESULTS: self._last_id}, count=READ_COUNT, block=READ_BLOCK_MS
        )
        now = time.monotonic()
        self._commands += 1
        if not reply:
            if refill and now - self._last_answer_s > self._plan.stall_s:
                raise StalledError(f"no result for {self._plan.stall_s:.0f} s")
            return
        entries = reply[0][1]
        self._last_id = entries[-1][0]
        answered = 0
        for _entry_id, fields in entries:
            sent_s = self._sent.pop(fields[b"taskId"], None)
            if sent_s is None:
                continue
            answered += 1
            if record:
                self._record(now - sent_s, fields[b"result"])
        self._answered += answered
        self._last_answer_s = now
        if refill:
            self._submit(answered)

    def _record(self, took_s: float, result: bytes) -> None:
        self.window.tasks += 1
        self.window.added_ms.append(took_s * 1000 - self._plan.api_latency_ms)
        if orjson.loads(result).get("success") is not True:
            self.window.failures += 1

    def _submit(self, count: int) -> None:
        if count <= 0:
            return
        pipe = self._rdb.pipeline(transaction=False)
        ids = []
        for _ in range(count):
            task_id = f"t{self._next}"
            stream, fields = self._encode(task_id, self._next)
            pipe.xadd(stream, cast(Any, fields))
            ids.append(task_id.encode())
            self._next += 1
        sent_s = time.monotonic()
        for task_id_bytes in ids:
            self._sent[task_id_bytes] = sent_s
        pipe.execute()
        self._commands += count
