"""The node's link to Redis: how clients are built and how outages are ridden out.

Redis restarts, failovers and dropped connections are normal events for a node
that runs for months. `RedisLink.call` retries a Redis operation with jittered
backoff (tenacity) until it succeeds, logging one line when an outage starts
and one when it ends, however many callers are waiting meanwhile. A missing
consumer group (`NOGROUP`, after a Redis restart that lost it) is recreated
through a hook and the operation retried at once.

The commands open their client with `open_redis`, which asks the server at
the URL whether it is a cluster node (`INFO cluster`) and, if so, returns a
cluster client instead of a single-node one; everything else in the node
works the same on either, since a stream's keys share one hash slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeAlias, TypeVar

import redis.asyncio as aioredis
import tenacity
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .constants import hash_tag
from .errors import ConfigError, RedisUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

# A single Redis or a Redis Cluster: the node uses the commands both speak.
Client: TypeAlias = aioredis.Redis | RedisCluster

# What a call to Redis may raise besides its answer: a cluster client's own
# errors (no node reachable, a slot not covered) are not RedisErrors, and a
# socket's OSError may pass redis-py's wrapping.
REDIS_FAILURES: tuple[type[Exception], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
)

# A cluster that is failing over (CLUSTERDOWN, MASTERDOWN), resharding
# (TRYAGAIN) or missing a slot's owner comes back by itself, as a restarted
# Redis does.
_OUTAGES = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
)

# What a cluster node answers the SELECT a connection to a database other
# than 0 starts with.
_SELECT_REFUSED = "SELECT is not allowed in cluster mode"

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


async def open_redis(url: str, *, prefix: str, max_connections: int) -> Client:
    """`connect`'s client, or a cluster client when `url` names a cluster node.

    Args:
        url: any node of the cluster will do; the others are discovered.
        prefix: the key prefix; on a cluster it must hold a hash tag.
        max_connections: the most connections to one Redis server.

    Raises:
        ConfigError: a cluster with a prefix without a hash tag, or a URL that
            a cluster client cannot use (a unix socket, a database other
            than 0).
        RedisError: Redis could not be reached.
    """
    single = connect(url, max_connections=max_connections)
    if not await _is_cluster(single):
        return single
    # A cluster client cannot wait for a free connection as the single-node
    # pool does; it fails instead. Every task in flight holds at most one
    # connection at a time, so the caller's bound is never reached.
    return await _cluster(
        url,
        prefix,
        max_connections=max_connections,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


async def open_redis_once(url: str, *, prefix: str, timeout_s: float) -> Client:
    """`connect_once`'s client, or a cluster client when `url` names a
    cluster node; see `open_redis`."""
    single = connect_once(url, timeout_s=timeout_s)
    if not await _is_cluster(single):
        return single
    return await _cluster(
        url, prefix, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
    )


async def _is_cluster(client: aioredis.Redis) -> bool:
    """Asks the server whether it is a cluster node; closes `client` unless
    it is the one to use."""
    try:
        info: dict[str, Any] = await client.info("cluster")
    except ResponseError as exc:
        if _SELECT_REFUSED in str(exc):
            # The URL names a database other than 0, which the connection
            # selects before INFO: only a cluster node refuses that.
            db = client.connection_pool.connection_kwargs.get("db")
            await client.aclose()
            raise ConfigError(
                f"configuration error: redisUrl: names database {db}, but a "
                "Redis Cluster has only database 0; end the URL with /0"
            ) from None
        # INFO renamed away or refused by an ACL: a cluster would say so
        # with MOVED soon enough; a single Redis works as before.
        return False
    except BaseException:
        await client.aclose()
        raise
    if not info.get("cluster_enabled"):
        return False
    await client.aclose()
    return True


async def _cluster(url: str, prefix: str, **options: Any) -> RedisCluster:
    if hash_tag(prefix) is None:
        raise ConfigError(
            f"configuration error: prefix: {prefix!r} has no hash tag, which a "
            "Redis Cluster needs to keep a stream's keys in one slot; use e.g. "
            f"--prefix {_tagged(prefix)!r} (or MESH_PREFIX)"
        )
    try:
        cluster = RedisCluster.from_url(url, decode_responses=False, **options)
    except RedisClusterException as exc:
        raise ConfigError(f"configuration error: redisUrl: {exc}") from None
    try:
        await cluster.initialize()
    except BaseException as exc:
        await cluster.aclose()
        if isinstance(exc, RedisClusterException):
            # Callers tell an unreachable Redis by RedisError, cluster or not.
            raise RedisConnectionError(str(exc)) from exc
        raise
    return cluster


def _tagged(prefix: str) -> str:
    """The prefix with its name made the hash tag: `mesh:` gives `{mesh}:`."""
    name = prefix.rstrip(":") if "{" not in prefix and "}" not in prefix else ""
    return f"{{{name or 'mesh'}}}:"


def is_outage(error: BaseException) -> bool:
    """Tells whether an error means Redis is unreachable or not ready yet."""
    if isinstance(error, _OUTAGES):
        return True
    if isinstance(error, ResponseError):
        return str(error).startswith("LOADING")
    # A cluster client that reached no node at all raises an error of its own
    # (redis-py 8: RedisClusterUnreachableError) caused by the lost connection.
    cause = error.__cause__
    return isinstance(error, RedisClusterException) and (
        cause is not None and is_outage(cause)
    )


def is_nogroup(error: BaseException) -> bool:
    """Tells whether an error means the consumer group (or its stream) is gone."""
    return isinstance(error, ResponseError) and "NOGROUP" in str(error)


class Stop(Protocol):
    """Tells a retry loop to give up; asked only after a failed attempt, so
    a condition that costs something to check costs nothing while Redis is
    up. An `asyncio.Event` is one."""

    def is_set(self) -> bool:
        """Whether to give up."""
        ...


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

    @property
    def down(self) -> bool:
        """Whether an outage is under way: a call failed, none succeeded since."""
        return self._down_since_s is not None

    async def call(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        what: str,
        stop: Stop | None = None,
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
        # The usual case, one attempt that succeeds, skips the retry
        # machinery: setting it up cost a fifth as much CPU as the round trip.
        try:
            value = await self._attempt(operation)
        except Exception as exc:
            if not (is_outage(exc) or is_nogroup(exc)):
                raise
        else:
            self._succeeded()
            return value
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
                    # Set during the wait before this attempt: Redis may be
                    # back, but the caller no longer wants the operation done.
                    if stop is not None and stop.is_set():
                        raise RedisUnavailableError(what)
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
