"""The one retry policy for API calls: how often, and how long between tries.

Built on tenacity in the manner of stamina: attempts and total time are both
capped, backoff is exponential with jitter, and a `retry-after` from the API
overrides the backoff when it asks for longer. The SDK's own retries are off,
so this policy alone decides.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from .errors import ApiCallError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryDetails:
    """What a retry hook learns about the attempt that just failed."""

    attempt: int
    error: ApiCallError
    wait_s: float


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Caps and backoff of the retry policy.

    Args:
        max_attempts: tries in all, the first included.
        max_total_s: no retry starts later than this after the first try.
        backoff_initial_s: the first backoff, doubled on each retry.
        backoff_max_s: the longest backoff.
        jitter_s: the most random delay added to each backoff.
        wait: False turns every wait off, for tests that count attempts only.
    """

    max_attempts: int
    max_total_s: float
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    jitter_s: float = 0.5
    wait: bool = True

    async def call(
        self,
        attempt: Callable[[int], Awaitable[T]],
        *,
        deadline_s: float,
        on_retry: Callable[[RetryDetails], None] | None = None,
    ) -> T:
        """Runs `attempt(n)` until it succeeds or the policy gives up.

        Args:
            attempt: one try, given its 1-based number.
            deadline_s: the task's deadline on `time.monotonic`'s clock; no
                retry is scheduled that would wake after it.
            on_retry: called before each wait.

        Returns:
            The first successful try's value.

        Raises:
            ApiCallError: the last try's error when it is not retryable, the
                caps are reached, or the next wait would pass the deadline.
        """
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(_is_retryable),
            wait=self._wait_s,
            stop=self._stop(deadline_s),
            before_sleep=_before_sleep(on_retry),
            sleep=asyncio.sleep,
            reraise=True,
        )
        async for try_ in retrying:
            with try_:
                return await attempt(try_.retry_state.attempt_number)
        raise AssertionError("unreachable: tenacity either returns or reraises")

    def _wait_s(self, state: tenacity.RetryCallState) -> float:
        if not self.wait:
            return 0.0
        backoff = tenacity.wait_exponential_jitter(
            multiplier=self.backoff_initial_s,
            max=self.backoff_max_s,
            jitter=self.jitter_s,
        )(state)
        error = state.outcome.exception() if state.outcome else None
        advised = error.retry_after_s if isinstance(error, ApiCallError) else None
        return max(backoff, advised or 0.0)

    def _stop(self, deadline_s: float) -> Callable[[tenacity.RetryCallState], bool]:
        def stop(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number >= self.max_attempts:
                return True
            elapsed_s = state.seconds_since_start or 0.0
            if elapsed_s + state.upcoming_sleep > self.max_total_s:
                return True
            return time.monotonic() + state.upcoming_sleep >= deadline_s

        return stop


def _is_retryable(error: BaseException) -> bool:
    return isinstance(error, ApiCallError) and error.retryable


def _before_sleep(
    on_retry: Callable[[RetryDetails], None] | None,
) -> Callable[[tenacity.RetryCallState], None]:
    def hook(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        assert isinstance(error, ApiCallError)
        details = RetryDetails(state.attempt_number, error, state.upcoming_sleep)
        log.info(
            "retry.scheduled",
            extra={
                "attempt": details.attempt,
                "error_type": str(error.error_type),
                "status": error.status_code,
                "wait_ms": round(details.wait_s * 1000),
            },
        )
        if on_retry is not None:
            on_retry(details)

    return hook
