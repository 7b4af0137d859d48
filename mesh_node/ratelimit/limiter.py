"""The limiter's policy: what a call reserves, how long it may wait, when to pause.

Waiting is fair within a process and bounded by each task's deadline: calls
queue in order, and one driver asks the backend for the head of the queue and
those behind it at once, admitted in order while they fit, so that a busy
node makes one round trip for many calls rather than one each, in turn. A
task that cannot get room before its deadline fails at once instead of
holding a slot.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import itertools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import ErrorType, RedisUnavailableError, TaskError
from ..settings import Settings
from . import LimitBackend, Unit, Verdict, Window, WindowKind

log = logging.getLogger(__name__)

# A whole API key pause with no `retry-after` to go by (a spend limit says
# nothing about when it lifts): long enough not to hammer, short enough that a
# raised limit is noticed.
DEFAULT_PAUSE_S = 60.0
# Calls asked for in one round trip at most.
ADMIT_BATCH = 128


@dataclass(frozen=True, slots=True)
class Price:
    """Dollars per million tokens of one model."""

    input_per_mtok: float
    output_per_mtok: float


@dataclass(frozen=True, slots=True)
class Call:
    """What one API call may use, as the limiter needs to know it."""

    model: str
    input_tokens: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """Room taken in every window for one call, until settled."""

    token: str
    costs: list[int]
    waited_s: float
    waited_for: str = "turn"
    """What made the call wait last: a window, `pause`, or its `turn` behind
    this process's other calls."""


@dataclass(slots=True, eq=False)
class _Waiter:
    """A call in the queue, and where its reservation (or refusal) goes."""

    token: str
    costs: list[int]
    deadline_s: float
    started_s: float
    answer: asyncio.Future[Reservation]


class Limiter:
    """Paces the calls of one API key within its windows.

    Args:
        backend: where the windows live.
        windows: the limits, rate and budget.
        budget_fails: True fails a task at once when a budget is spent;
            False (the default) holds it until the budget frees or its deadline.
        prices: per-model prices, for cost budgets.
    """

    def __init__(
        self,
        backend: LimitBackend,
        windows: list[Window],
        *,
        budget_fails: bool = False,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        self._backend = backend
        self._windows = windows
        self._budget_fails = budget_fails
        self._prices = dict(prices or {})
        self._waiting: deque[_Waiter] = deque()
        self._driver: asyncio.Task[None] | None = None
        # While the queue waits for room: the verdict and when the room comes.
        self._held: tuple[Verdict, float] | None = None

    async def acquire(self, call: Call, *, deadline_s: float) -> Reservation:
        """Waits for room for one call, in turn, until the deadline at most.

        Raises:
            TaskError: `rate_limited` or `budget_exceeded` when room will not
                come before the deadline or the call can never fit.
        """
        costs = [self._cost(window, call) for window in self._windows]
        if self._held is not None:
            # The queue waits for room that comes after this call's deadline,
            # and this call cannot start before the queue does.
            verdict, room_s = self._held
            late = self._past_deadline(verdict, deadline_s, room_s=room_s)
            if late is not None:
                raise late
        loop = asyncio.get_running_loop()
        waiter = _Waiter(
            uuid.uuid4().hex[:16],
            costs,
            deadline_s,
            time.monotonic(),
            loop.create_future(),
        )
        self._waiting.append(waiter)
        if self._driver is None or self._driver.done():
            # In a context of its own: the driver serves every task, so its
            # log lines must not carry the first one's trace.
            self._driver = loop.create_task(
                self._drive(), context=contextvars.Context()
            )
        # Cancelled (the task's deadline, a shutdown), the answer is
        # cancelled with it and the driver passes it over.
        return await waiter.answer

    async def _drive(self) -> None:
        """Serves the queue until it is empty, head first."""
        # Known shortcoming: with OTLP export on and 16 calls in flight, the
        # bench ran slower with this queue than with one call at a time
        # behind a lock (245-266 tasks/s against 274-282, back to back), for
        # less CPU per task; admitting one at a time while the queue is short
        # did not help. A trace of the loop's wake-ups while the exporter's
        # thread holds the GIL would show where the time goes.
        # What the queue waited for last: every call admitted after that wait
        # says so, as a lone call did before.
        waited_for = "turn"
        try:
            while True:
                while self._waiting and self._waiting[0].answer.done():
                    self._waiting.popleft()
                if not self._waiting:
                    return
                waited_for = await self._admit(waited_for)
        except Exception as exc:
            # No call is left waiting on a driver that has stopped: a fault of
            # its own reaches every call still queued.
            for w in self._waiting:
                _answer(w, exc)
            self._waiting.clear()
        except BaseException:
            for w in self._waiting:
                w.answer.cancel()
            self._waiting.clear()
            raise

    async def _admit(self, waited_for: str) -> str:
        """One round trip for the head and those behind it; waits if it must.

        Returns:
            What the queue waits for now.
        """
        batch = [
            w
            for w in itertools.islice(self._waiting, ADMIT_BATCH)
            if not w.answer.done()
        ]
        answer = await self._ask(batch)
        if answer is None:
            return waited_for
        admitted, verdict = answer
        now_s = time.monotonic()
        for w in batch[:admitted]:
            _answer(w, Reservation(w.token, w.costs, now_s - w.started_s, waited_for))
        if admitted == len(batch):
            return "turn"
        head = batch[admitted]
        try:
            self._refuse_if_hopeless(verdict, head.deadline_s)
        except TaskError as exc:
            _answer(head, exc)
            return waited_for
        # No call behind the head starts before it: each whose deadline comes
        # before the head's room fails now too, instead of holding its slot.
        for w in self._waiting:
            if w is not head and not w.answer.done():
                late = self._past_deadline(verdict, w.deadline_s)
                if late is not None:
                    _answer(w, late)
        log.debug(
            "limiter.waiting",
            extra={"wait_ms": verdict.wait_ms, "paused": bool(verdict.paused_ms)},
        )
        # Cut short when the head gives up waiting.
        self._held = (verdict, time.monotonic() + verdict.wait_ms / 1000)
        try:
            await asyncio.wait([head.answer], timeout=verdict.wait_ms / 1000)
        finally:
            self._held = None
        return "pause" if verdict.paused_ms else self._which(verdict)

    async def _ask(self, batch: list[_Waiter]) -> tuple[int, Verdict] | None:
        """The backend's answer for the batch; None when it is to be asked again."""
        # Through an outage the request is retried until Redis is back; a
        # call that stops waiting meanwhile ends the retries, so that the
        # batch is asked for again without it and Redis, once back, admits
        # no call that nobody waits for.
        try:
            return await self._backend.acquire_many(
                self._windows, [(w.token, w.costs) for w in batch], stop=_GivenUp(batch)
            )
        except RedisUnavailableError:
            return None
        except Exception as exc:
            # The head gets the error, as the one call that made the request
            # would have; the rest try again behind it.
            _answer(batch[0], exc)
            return None

    async def hold(self, call: Call) -> float:
        """Waits, without a deadline, until every budget has room for a call.

        A held task has not started: its deadline counts from when the hold
        ends. With `budget_fails`, nothing is held and `acquire` fails instead.

        Returns:
            The seconds spent held.
        """
        budgets = [w for w in self._windows if w.kind is WindowKind.BUDGET]
        if not budgets or self._budget_fails:
            return 0.0
        costs = [self._cost(window, call) for window in budgets]
        started_s = time.monotonic()
        while True:
            verdict = await self._backend.acquire(budgets, costs, "hold", dry_run=True)
            if verdict.wait_ms <= 0:
                return time.monotonic() - started_s
            # Re-check at least every few seconds: others settle below their
            # reservations and free room before the window says so.
            await asyncio.sleep(min(verdict.wait_ms / 1000, 5.0))

    async def settle(
        self,
        reservation: Reservation,
        call: Call,
        *,
        input_tokens: int,
        output_tokens: int,
    ) -> None:
        """Replaces what a call reserved by what it used (0 for a failed call)."""
        actual = [
            self._actual(window, call, input_tokens, output_tokens)
            for window in self._windows
        ]
        if actual != reservation.costs:
            await self._backend.settle(
                self._windows, reservation.token, reservation.costs, actual
            )
        else:
            self._backend.forget(self._windows, reservation.token)

    def rekey(self, api_key: str) -> None:
        """Counts from now on against the windows of a new API key."""
        self._backend.rekey(api_key)

    async def pause(self, seconds: float, reason: str) -> None:
        """Stops every call on the key for a while (all processes on a Redis)."""
        await self._backend.pause(math.ceil(seconds * 1000), reason)
        log.warning(
            "limiter.paused", extra={"seconds": round(seconds, 3), "reason": reason}
        )

    async def observe(self, headers: Mapping[str, str]) -> None:
        """Pauses before the API would refuse, from its `anthropic-ratelimit-*`."""
        for family in ("requests", "tokens", "input-tokens", "output-tokens"):
            # Headers look-ups scan every header: the reset only when needed.
            remaining = headers.get(f"anthropic-ratelimit-{family}-remaining")
            if remaining is None or not _is_zero(remaining):
                continue
            reset = headers.get(f"anthropic-ratelimit-{family}-reset")
            if reset is None:
                continue
            seconds = _seconds_until(reset)
            if seconds > 0:
                await self.pause(seconds, f"the API reports no {family} left")

    async def budget_wait_s(self) -> float:
        """How long until every budget has room again; 0 when it has now."""
        budgets = [w for w in self._windows if w.kind is WindowKind.BUDGET]
        if not budgets:
            return 0.0
        verdict = await self._backend.acquire(
            budgets, [1] * len(budgets), "peek", dry_run=True
        )
        return max(0, verdict.wait_ms) / 1000

    def _which(self, verdict: Verdict) -> str:
        """The name of the window that said no, as logs and spans show it."""
        window = self._windows[verdict.window] if verdict.window >= 0 else None
        return _name(window)

    def _refuse_if_hopeless(self, verdict: Verdict, deadline_s: float) -> None:
        window, error_type = self._refused_by(verdict)
        if verdict.wait_ms < 0:
            raise TaskError(
                f"the call needs more than the whole {_name(window)} limit", error_type
            )
        if error_type is ErrorType.BUDGET_EXCEEDED and self._budget_fails:
            raise TaskError(f"the {_name(window)} budget is spent", error_type)
        late = self._past_deadline(verdict, deadline_s)
        if late is not None:
            raise late

    def _past_deadline(
        self, verdict: Verdict, deadline_s: float, *, room_s: float | None = None
    ) -> TaskError | None:
        """The error of a call whose deadline comes before the verdict's room
        (`room_s`, on the monotonic clock; by default the verdict's wait from
        now)."""
        now_s = time.monotonic()
        if room_s is None:
            room_s = now_s + verdict.wait_ms / 1000
        if room_s <= deadline_s:
            return None
        window, error_type = self._refused_by(verdict)
        what = (
            "the API key is paused"
            if verdict.paused_ms
            else f"the {_name(window)} limit"
        )
        return TaskError(
            f"{what} leaves no room before the task's deadline "
            f"(next room in {max(0, round((room_s - now_s) * 1000))} ms)",
            error_type,
            retryable=True,
        )

    def _refused_by(self, verdict: Verdict) -> tuple[Window | None, ErrorType]:
        """The window that said no, and the error a refusal by it is."""
        window = self._windows[verdict.window] if verdict.window >= 0 else None
        budget = window is not None and window.kind is WindowKind.BUDGET
        return window, ErrorType.BUDGET_EXCEEDED if budget else ErrorType.RATE_LIMITED

    def _cost(self, window: Window, call: Call) -> int:
        return self._amount(window.unit, call, call.input_tokens, call.max_tokens)

    def _actual(
        self, window: Window, call: Call, input_tokens: int, output_tokens: int
    ) -> int:
        if window.unit is Unit.REQUESTS:
            return 1
        return self._amount(window.unit, call, input_tokens, output_tokens)

    def _amount(
        self, unit: Unit, call: Call, input_tokens: int, output_tokens: int
    ) -> int:
        if unit is Unit.REQUESTS:
            return 1
        if unit is Unit.INPUT_TOKENS:
            return input_tokens
        if unit is Unit.OUTPUT_TOKENS:
            return output_tokens
        if unit is Unit.TOKENS:
            return input_tokens + output_tokens
        price = self._prices.get(call.model)
        if price is None:
            raise TaskError(
                f"no price for model '{call.model}' in the budget's price table",
                ErrorType.BUDGET_EXCEEDED,
            )
        return math.ceil(
            input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok
        )


class _GivenUp:
    """Whether a call of a batch has stopped waiting; asked by the retries."""

    __slots__ = ("_batch",)

    def __init__(self, batch: list[_Waiter]) -> None:
        self._batch = batch

    def is_set(self) -> bool:
        """True once any call of the batch is answered (cancelled)."""
        return any(w.answer.done() for w in self._batch)


def _answer(waiter: _Waiter, outcome: Reservation | Exception) -> None:
    """Settles a waiter's answer, unless it has stopped waiting."""
    if waiter.answer.done():
        return
    if isinstance(outcome, Exception):
        waiter.answer.set_exception(outcome)
    else:
        waiter.answer.set_result(outcome)


def _name(window: Window | None) -> str:
    return window.name.replace("_", " ") if window else "rate"


def _is_zero(value: str) -> bool:
    try:
        return int(value) <= 0
    except ValueError:
        return False


def _seconds_until(moment: str) -> float:
    try:
        when = dt.datetime.fromisoformat(moment.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (when - dt.datetime.now(dt.UTC)).total_seconds()


MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


# name, setting, window, unit, kind: every limit the settings can ask for.
_LIMITS: tuple[
    tuple[str, Callable[[Settings], float | None], int, Unit, WindowKind], ...
] = (
    (
        "requests_per_minute",
        lambda s: s.rate_limiting.max_requests_per_minute,
        MINUTE_MS,
        Unit.REQUESTS,
        WindowKind.RATE,
    ),
    (
        "requests_per_hour",
        lambda s: s.rate_limiting.max_requests_per_hour,
        HOUR_MS,
        Unit.REQUESTS,
        WindowKind.RATE,
    ),
    (
        "input_tokens_per_minute",
        lambda s: s.rate_limiting.max_input_tokens_per_minute,
        MINUTE_MS,
        Unit.INPUT_TOKENS,
        WindowKind.RATE,
    ),
    (
        "output_tokens_per_minute",
        lambda s: s.rate_limiting.max_output_tokens_per_minute,
        MINUTE_MS,
        Unit.OUTPUT_TOKENS,
        WindowKind.RATE,
    ),
    (
        "tokens_per_hour",
        lambda s: s.budget.tokens_per_hour,
        HOUR_MS,
        Unit.TOKENS,
        WindowKind.BUDGET,
    ),
    (
        "tokens_per_day",
        lambda s: s.budget.tokens_per_day,
        DAY_MS,
        Unit.TOKENS,
        WindowKind.BUDGET,
    ),
    (
        "dollars_per_hour",
        lambda s: _micro(s.budget.usd_per_hour),
        HOUR_MS,
        Unit.MICRO_USD,
        WindowKind.BUDGET,
    ),
    (
        "dollars_per_day",
        lambda s: _micro(s.budget.usd_per_day),
        DAY_MS,
        Unit.MICRO_USD,
        WindowKind.BUDGET,
    ),
)


def windows_for(settings: Settings) -> list[Window]:
    """The windows the settings ask for: rate limits first, then budgets."""
    windows = []
    for name, setting, window_ms, unit, kind in _LIMITS:
        limit = setting(settings)
        if limit is not None:
            windows.append(Window(name, int(limit), window_ms, unit, kind))
    return windows


def limiter_for(settings: Settings, backend: LimitBackend) -> Limiter:
    """The limiter the settings describe, on a backend."""
    prices = {
        model: Price(p.input_per_mtok, p.output_per_mtok)
        for model, p in settings.budget.prices.items()
    }
    return Limiter(
        backend,
        windows_for(settings),
        budget_fails=settings.budget.on_exceeded == "fail",
        prices=prices,
    )


def _micro(usd: float | None) -> int | None:
    return None if usd is None else math.ceil(usd * 1_000_000)
