"""When things happen: the node's loop, its concurrency and its shutdown.

The loop reads as its steps: receive as many deliveries as there are free
slots, then for each one admit, execute, deliver. Delivering includes settling
(the sink acknowledges only what it has made durable). On a stop request the
loop stops receiving, gives the tasks in flight a grace period, then cancels
the rest; a cancelled stream task stays pending for another consumer, and a
cancelled line task is answered with a `cancelled` result so that no line goes
unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable

import orjson

from .admission import Limits, Rejected, admit
from .errors import (
    ErrorType,
    InvalidTaskError,
    OutputClosedError,
    TaskDeferredError,
    TaskError,
)
from .executor import Executor
from .intake import Delivery, Intake
from .sink import AlreadyAnsweredError, Sink, Start
from .tasks import Task, TaskResult

log = logging.getLogger(__name__)

RECENT_S = 60


class RecentOutcomes:
    """How tasks ended over the last minute, in one-second buckets.

    Kept by each serving node for its heartbeat, so that `status` adds up a
    few numbers instead of reading a minute of results; memory stays at 60
    small counters whatever the rate.
    """

    def __init__(self) -> None:
        self._buckets: deque[tuple[int, Counter[str]]] = deque()

    def add(self, outcome: str) -> None:
        second = int(time.monotonic())
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append((second, Counter()))
        self._buckets[-1][1][outcome] += 1

    def totals(self) -> Counter[str]:
        """The counts of the last `RECENT_S` seconds."""
        oldest = int(time.monotonic()) - RECENT_S
        while self._buckets and self._buckets[0][0] <= oldest:
            self._buckets.popleft()
        total: Counter[str] = Counter()
        for _second, counts in self._buckets:
            total.update(counts)
        return total


class Worker:
    """Runs deliveries from one intake through the executor into one sink.

    Args:
        intake: where tasks come from.
        sink: where results go.
        executor: runs one admitted task.
        limits: admission limits.
        concurrency: the most tasks in flight at once.
        grace_period_s: how long tasks in flight may finish after a stop.
        max_deliveries: a delivery seen more often than this is dead-lettered.
        stopping: set to stop the loop; shared with the intake, which abandons
            its waits for Redis when it is set.
        hold: says how long to hold off taking new tasks (a spent budget);
            tasks stay where they are, unread, meanwhile.
        ready: called once the intake and sink have started, before the
            first read.
    """

    def __init__(
        self,
        intake: Intake,
        sink: Sink,
        executor: Executor,
        limits: Limits,
        *,
        concurrency: int,
        grace_period_s: float,
        max_deliveries: int,
        stopping: asyncio.Event | None = None,
        hold: Callable[[], Awaitable[float]] | None = None,
        ready: Callable[[], None] | None = None,
    ) -> None:
        self._intake = intake
        self._sink = sink
        self._executor = executor
        self._observer = executor.observer
        self._limits = limits
        self._concurrency = concurrency
        self._grace_period_s = grace_period_s
        self._max_deliveries = max_deliveries
        self._hold = hold
        self._ready = ready
        self._holding = False
        self._in_flight: set[asyncio.Task[None]] = set()
        # Set when a task ends or a stop is asked: either frees the loop.
        self._slot_freed = asyncio.Event()
        self.stopping = stopping or asyncio.Event()
        self._forced = asyncio.Event()
        self.output_closed = False
        self.counts = {"succeeded": 0, "failed": 0, "skipped": 0, "crashed": 0}
        self.recent = RecentOutcomes()

    def stop(self) -> None:
        """Asks the loop to stop receiving; a second call skips the grace period.

        Safe to call from a signal handler.
        """
        if self.stopping.is_set():
            log.warning("worker.forced", extra={"in_flight": len(self._in_flight)})
            self._forced.set()
        self.stopping.set()
        self._slot_freed.set()

    def report(self) -> dict[str, int | str]:
        """What the node is doing now, for its heartbeat."""
        if self.stopping.is_set():
            state = "draining"
        elif self._holding:
            state = "holding"
        else:
            state = "running"
        recent = self.recent.totals()
        errors = {
            name.removeprefix("failed:"): count
            for name, count in recent.items()
            if name.startswith("failed:")
        }
        return {
            "state": state,
            "in_flight": len(self._in_flight),
            "concurrency": self._concurrency,
            **self.counts,
            "minute_succeeded": recent["succeeded"],
            "minute_failed": sum(errors.values()),
            "minute_errors": orjson.dumps(errors).decode(),
            "minute_dead_lettered": recent["dead_lettered"],
        }

    async def run(self) -> None:
        """Runs until the intake is exhausted or a stop is requested."""
        await self._intake.start()
        await self._sink.start()
        if self._ready is not None:
            self._ready()
        try:
            while not self.stopping.is_set() and not self._intake.exhausted:
                free = await self._free_slots()
                if free and not self.stopping.is_set() and not await self._held():
                    for delivery in await self._intake.receive(free):
                        self._spawn(delivery)
            await self._drain()
        finally:
            await self._intake.close()
            await self._sink.close()

    async def _free_slots(self) -> int:
        # Woken by the task that ends, not by waiting on every task in flight:
        # `asyncio.wait` on them all costs a callback per task per wake-up,
        # which at 1,000 in flight took 40% of the node's CPU.
        while len(self._in_flight) >= self._concurrency and not self.stopping.is_set():
            self._slot_freed.clear()
            await self._slot_freed.wait()
        return self._concurrency - len(self._in_flight)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slot_freed.set()

    async def _held(self) -> bool:
        """Waits a moment and says so while new tasks must wait (budget spent)."""
        wait_s = await self._hold() if self._hold is not None else 0.0
        if wait_s > 0 and not self._holding:
            log.warning(
                "worker.holding",
                extra={"reason": "budget spent", "free_in_s": round(wait_s, 1)},
            )
        elif wait_s <= 0 and self._holding:
            log.info("worker.resumed")
        self._holding = wait_s > 0
        if self._holding:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), min(wait_s, 1.0))
        return self._holding

    def _spawn(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._handle(delivery))
        self._in_flight.add(task)
        task.add_done_callback(self._ended)
        task.add_done_callback(lambda _task: self._intake.finished(delivery))

    async def _drain(self) -> None:
        """Lets tasks in flight finish, within the grace period once a stop is asked.

        A second stop request cuts the grace period short.
        """
        if not self._in_flight:
            return
        log.info("worker.draining", extra={"in_flight": len(self._in_flight)})
        loop = asyncio.get_running_loop()
        deadline_s: float | None = None
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            while self._in_flight and not forced.done():
                if deadline_s is None and self.stopping.is_set():
                    deadline_s = loop.time() + self._grace_period_s
                timeout_s = None if deadline_s is None else deadline_s - loop.time()
                if timeout_s is not None and timeout_s <= 0:
                    break
                # Wake up at least once a second to notice a stop request.
                await asyncio.wait(
                    {*self._in_flight, forced},
                    timeout=min(timeout_s or 1.0, 1.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            forced.cancel()
        pending = set(self._in_flight)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("worker.cancelled", extra={"tasks": len(pending)})
            await asyncio.wait(pending)

    async def _handle(self, delivery: Delivery) -> None:
        received_s, received_ns = time.monotonic(), time.time_ns()
        try:
            admitted = self._admit(delivery)
        except Exception as exc:
            self._crashed(None, exc)
            return
        task_id = admitted.id if isinstance(admitted, Task) else admitted.task_id
        traceparent = delivery.traceparent
        if isinstance(admitted, Task) and admitted.traceparent:
            traceparent = admitted.traceparent
        with self._observer.task(
            source=delivery.source,
            entry_id=delivery.entry_id,
            task_id=task_id,
            traceparent=traceparent,
            start_time_ns=received_ns,
        ):
            await self._run(delivery, admitted, task_id, received_s)

    async def _run(
        self,
        delivery: Delivery,
        admitted: Task | Rejected,
        task_id: str | None,
        received_s: float,
    ) -> None:
        try:
            if delivery.deliveries > self._max_deliveries:
                await self._dead_letter(delivery, task_id)
                return
            if isinstance(admitted, Task) and not await self._acquire(
                delivery, admitted.id
            ):
                return
            result = await self._result(admitted, delivery, received_s)
            await self._sink.deliver(delivery, result)
        except asyncio.CancelledError:
            await self._answer_cancelled(delivery, task_id)
            raise
        except TaskDeferredError as exc:
            await self._defer(delivery, task_id, exc)
            return
        except AlreadyAnsweredError:
            self.counts["skipped"] += 1
            self._observer.ended_without_result("skipped", str(Start.DONE))
            log.info(
                "task.skipped",
                extra={"task_id": None, "source": delivery.source, "reason": "done"},
            )
            return
        except OutputClosedError:
            if not self.output_closed:
                log.error("output.closed", extra={"task_id": task_id})
            self.output_closed = True
            self.stop()
            return
        except Exception as exc:
            self._crashed(task_id, exc)
            return
        self._finished(result)

    def _crashed(self, task_id: str | None, error: Exception) -> None:
        # The entry stays pending (stream) and the node keeps going; the
        # cause is logged without the task's content.
        self.counts["crashed"] += 1
        self._observer.crashed(error)
        log.exception(
            "task.crashed", extra={"task_id": task_id, "error": type(error).__name__}
        )

    async def _acquire(self, delivery: Delivery, task_id: str) -> bool:
        start = await self._sink.acquire(delivery, task_id)
        if start is Start.RUN:
            return True
        self.counts["skipped"] += 1
        self._observer.ended_without_result("skipped", str(start))
        log.info(
            "task.skipped",
            extra={"task_id": task_id, "source": delivery.source, "reason": str(start)},
        )
        return False

    async def _defer(
        self, delivery: Delivery, task_id: str | None, deferred: TaskDeferredError
    ) -> None:
        """Hands a stream task back for later; a line cannot wait, so it fails."""
        if not self._intake.redeliverable:
            result = self._executor.failure(
                task_id, deferred.cause, source=delivery.source
            )
            await self._sink.deliver(delivery, result)
            self._finished(result)
            return
        await self._sink.release(delivery)
        self.counts["skipped"] += 1
        self._observer.ended_without_result("deferred", deferred.cause.message)
        log.info(
            "task.deferred",
            extra={
                "task_id": task_id,
                "source": delivery.source,
                "reason": deferred.cause.message,
            },
        )

    async def _dead_letter(self, delivery: Delivery, task_id: str | None) -> None:
        reason = (
            f"delivered {delivery.deliveries} times, more than maxDeliveries "
            f"({self._max_deliveries})"
        )
        error = TaskError(reason, ErrorType.MAX_DELIVERIES)
        result = self._executor.failure(task_id, error, source=delivery.source)
        await self._sink.dead_letter(delivery, result, reason)
        self.recent.add("dead_lettered")
        log.warning(
            "task.dead_lettered",
            extra={
                "task_id": task_id,
                "source": delivery.source,
                "deliveries": delivery.deliveries,
            },
        )
        self._finished(result)

    def _admit(self, delivery: Delivery) -> Task | Rejected:
        if delivery.problem is not None:
            return Rejected(None, InvalidTaskError(delivery.problem))
        return admit(delivery.raw, self._limits)

    async def _result(
        self, admitted: Task | Rejected, delivery: Delivery, received_s: float
    ) -> TaskResult:
        if isinstance(admitted, Rejected):
            return self._executor.failure(
                admitted.task_id, admitted.error, source=delivery.source
            )
        log.info(
            "task.started", extra={"task_id": admitted.id, "source": delivery.source}
        )
        return await self._executor.execute(
            admitted, source=delivery.source, received_s=received_s
        )

    async def _answer_cancelled(self, delivery: Delivery, task_id: str | None) -> None:
        if self._intake.redeliverable:
            await self._sink.release(delivery)
            self._observer.ended_without_result("released")
            log.info(
                "task.released", extra={"task_id": task_id, "source": delivery.source}
            )
            return
        error = TaskError(
            "the node stopped before the task finished",
            ErrorType.CANCELLED,
            retryable=True,
        )
        result = self._executor.failure(task_id, error, source=delivery.source)
        await self._sink.deliver(delivery, result)
        self._finished(result)

    def _finished(self, result: TaskResult) -> None:
        outcome = "succeeded" if result.success else "failed"
        self.counts[outcome] += 1
        self.recent.add(f"failed:{result.error.type}" if result.error else outcome)
        self._observer.finished(result)
        log.info(
            "task.finished",
            extra={
                "task_id": result.taskId,
                "outcome": outcome,
                "error_type": result.error.type if result.error else None,
                "attempts": result.metadata.attempts,
                "elapsed_ms": result.metadata.durationMs,
            },
        )
