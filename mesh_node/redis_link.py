"""The node's link to Redis: how clients are built and how outages are ridden out.

Redis restarts, failovers and dropped connections are normal events for a node
that runs for months. `RedisLink.call` retries a Redis operation with jittered
backoff (tenacity) until it succeeds, logging one line when an outage starts
and one when it ends, however many callers are waiting meanwhile. A missing
consumer group (`NOGROUP`, after a Redis restart that lost it) is recreated
through a hook and the operation retried at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
import tenacity
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import RedisUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 2.0


def connect(url: str, *, max_connections: int) -> aioredis.Redis:
    """A client that returns bytes and leaves outages to `RedisLink`.

    One immediate retry lets a command on a pooled connection that died with a
    Redis restart go through on a fresh one; anything longer is an outage.
    """
    # A blocking pool makes a burst of settles wait for a connection instead
    # of failing with "Too many connections".
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=False,
        max_connections=max_connections,
        timeout=None,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)


def connect_once(url: str, *, timeout_s: float) -> aioredis.Redis:
    """A one-shot client whose every wait ends after `timeout_s`."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
    )


def is_outage(error: BaseException) -> bool:
    """Tells whether an error means Redis is unreachable or not ready yet."""
    return isinstance(error, RedisConnectionError | RedisTimeoutError | OSError) or (
        isinstance(error, ResponseError) and str(error).startswith("LOADING")
    )


def is_nogroup(error: BaseException) -> bool:
    """Tells whether an error means the consumer group (or its stream) is gone."""
    return isinstance(error, ResponseError) and "NOGROUP" in str(error)


class RedisLink:
    """Retries Redis operations through outages and reports each outage once.

    Args:
        recreate_group: called when an operation fails with NOGROUP.
    """

    def __init__(
        self, recreate_group: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self._recreate_group = recreate_group
        self._down_since_s: float | None = None

    async def call(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        what: str,
        stop: asyncio.Event | None = None,
    ) -> T:
        """Runs `operation` until it succeeds.

        Args:
            operation: one attempt.
            what: names the operation in the outage log line.
            stop: when set, the wait is abandoned with `RedisUnavailableError`.

        Raises:
            RedisUnavailableError: `stop` was set during an outage.
            RedisError: an error that is not an outage (a bug, a bad command).
        """
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(lambda e: is_outage(e) or is_nogroup(e)),
            wait=tenacity.wait_exponential_jitter(
                multiplier=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S
            ),
            before_sleep=lambda state: self._failed(state, what),
            stop=lambda _state: stop is not None and stop.is_set(),
            retry_error_cls=_Stopped,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    value = await self._attempt(operation)
                    self._succeeded()
                    return value
        except _Stopped:
            raise RedisUnavailableError(what) from None
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _attempt(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except ResponseError as exc:
            if is_nogroup(exc) and self._recreate_group is not None:
                await self._recreate_group()
            raise

    def _failed(self, state: tenacity.RetryCallState, what: str) -> None:
        error = state.outcome.exception() if state.outcome else None
        if self._down_since_s is None and error is not None and is_outage(error):
            self._down_since_s = time.monotonic()
            log.warning(
                "redis.unavailable",
                extra={"operation": what, "error": _describe(error)},
            )

    def _succeeded(self) -> None:
        if self._down_since_s is not None:
            outage_s = time.monotonic() - self._down_since_s
            self._down_since_s = None
            log.info("redis.reconnected", extra={"outage_s": round(outage_s, 1)})


class _Stopped(tenacity.RetryError):
    """Tenacity's signal that the stop condition ended the retries."""


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:200]
