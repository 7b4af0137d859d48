"""The limiter: the same sliding-window rules in memory and in Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import httpx2
import pytest

from mesh_node.errors import ErrorType, TaskError, api_call_error
from mesh_node.ratelimit import LimitBackend, Unit, Verdict, Window, WindowKind
from mesh_node.ratelimit.limiter import Call, Limiter
from mesh_node.ratelimit.memory import MemoryLimitBackend
from mesh_node.ratelimit.redis_backend import RedisLimitBackend, key_id
from mesh_node.redis_link import RedisLink, Stop, connect

from .support import FAKE_KEY, OwnRedis, RedisServer


class Backends:
    """Builds backends of one kind inside a test's event loop, and closes them."""

    def __init__(self, kind: str, url: str, prefix: str) -> None:
        self.kind, self.url, self.prefix = kind, url, prefix
        self.clients: list[Any] = []

    def __call__(self) -> LimitBackend:
        if self.kind == "memory":
            return MemoryLimitBackend()
        client = connect(self.url, max_connections=4)
        self.clients.append(client)
        return RedisLimitBackend(client, RedisLink(), self.prefix, FAKE_KEY)

    def run(self, scenario: Callable[[], Awaitable[Any]]) -> Any:
        """Runs a scenario, then closes every client it opened."""

        async def main() -> Any:
            try:
                return await scenario()
            finally:
                for client in self.clients:
                    await client.aclose()

        return asyncio.run(main())


@pytest.fixture(params=["memory", "redis"])
def make_backend(
    request: pytest.FixtureRequest, redis_server: RedisServer, prefix: str
) -> Backends:
    """Backends of each kind, on the session's redis-server for the Redis one."""
    return Backends(request.param, redis_server.url, prefix)


def _run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


REQUESTS = Window("requests_per_minute", 3, 60_000)
TOKENS = Window("tokens_per_hour", 100, 3_600_000, Unit.TOKENS, WindowKind.BUDGET)


def test_window_admits_its_limit_then_says_how_long(make_backend: Backends) -> None:
    """Three requests fit a 3-per-minute window; the fourth must wait ~a minute."""

    async def scenario() -> list[int]:
        backend = make_backend()
        waits = []
        for n in range(4):
            verdict = await backend.acquire([REQUESTS], [1], f"t{n}", dry_run=False)
            waits.append(verdict.wait_ms)
        return waits

    waits = make_backend.run(scenario)
    assert waits[:3] == [0, 0, 0]
    assert 59_000 < waits[3] <= 60_251


def test_settling_returns_unused_reservation(make_backend: Backends) -> None:
    """A reservation settled to less frees room in the window at once."""

    async def scenario() -> tuple[int, int]:
        backend = make_backend()
        await backend.acquire([TOKENS], [90], "big", dry_run=False)
        blocked = await backend.acquire([TOKENS], [20], "next", dry_run=False)
        await backend.settle([TOKENS], "big", [90], [30])
        admitted = await backend.acquire([TOKENS], [20], "next", dry_run=False)
        return blocked.wait_ms, admitted.wait_ms

    blocked_ms, admitted_ms = make_backend.run(scenario)
    assert blocked_ms > 0
    assert admitted_ms == 0


def test_cost_over_the_whole_limit_never_fits(make_backend: Backends) -> None:
    """A call larger than the window itself is told so, not told to wait."""

    async def scenario() -> int:
        verdict = await make_backend().acquire([TOKENS], [101], "huge", dry_run=False)
        return verdict.wait_ms

    assert make_backend.run(scenario) == -1


def test_pause_stops_everything_for_its_duration(make_backend: Backends) -> None:
    """A paused key admits nothing until the pause ends, and says why."""

    async def scenario() -> tuple[int, tuple[int, str | None]]:
        backend = make_backend()
        await backend.pause(5_000, "the API said 429")
        verdict = await backend.acquire([REQUESTS], [1], "t", dry_run=False)
        return verdict.paused_ms, await backend.paused()

    paused_ms, (left_ms, reason) = make_backend.run(scenario)
    assert 4_000 < paused_ms <= 5_000
    assert 4_000 < left_ms <= 5_000
    assert reason == "the API said 429"


def test_many_are_admitted_in_order_while_they_fit(make_backend: Backends) -> None:
    """One request for many calls admits them in order until one does not fit;
    a smaller call behind it does not jump the queue, and the answer is the
    wait of the first left out."""

    async def scenario() -> tuple[int, int, int, int, int]:
        backend = make_backend()
        costs = [40, 30, 50, 10]
        requests = [(f"t{n}", [cost]) for n, cost in enumerate(costs)]
        admitted, verdict = await backend.acquire_many([TOKENS], requests)
        # 40 + 30 fit in 100, 50 does not, and 10 waits behind it.
        after, _verdict = await backend.acquire_many([TOKENS], [("t4", [31])])
        room = await backend.acquire([TOKENS], [1], "peek", dry_run=True)
        return admitted, verdict.wait_ms, verdict.window, after, room.wait_ms

    admitted, wait_ms, window, after, room_ms = make_backend.run(scenario)
    assert (admitted, window, after) == (2, 0, 0)
    assert wait_ms > 0
    # 70 of 100 are held: 31 more do not fit, 1 does.
    assert room_ms == 0


def test_many_stop_at_one_that_can_never_fit(make_backend: Backends) -> None:
    """A call larger than the whole limit ends the batch with -1, after the
    calls before it were admitted."""

    async def scenario() -> tuple[int, int]:
        backend = make_backend()
        requests = [("a", [10]), ("huge", [101]), ("b", [10])]
        admitted, verdict = await backend.acquire_many([TOKENS], requests)
        return admitted, verdict.wait_ms

    assert make_backend.run(scenario) == (1, -1)


def test_a_partly_admitted_batch_keeps_the_window_alive(
    redis_server: RedisServer, prefix: str
) -> None:
    """Every script that admits a call renews the window's keys, also when it
    stops at a call that does not fit: keys left to expire with live entries
    in them would count the window as empty and let twice the limit through."""
    window = Window("requests_per_second", 20, 1000)

    async def scenario() -> tuple[int, int]:
        client = connect(redis_server.url, max_connections=2)
        backend = RedisLimitBackend(client, RedisLink(), prefix, FAKE_KEY)
        zset = f"{prefix}limit:{key_id(FAKE_KEY)}:{window.name}"
        await backend.acquire_many([window], [(f"a{n}", [1]) for n in range(10)])
        # As if those keys were set long ago and are about to expire.
        await client.pexpire(zset, 100)
        await client.pexpire(f"{zset}:sum", 100)
        admitted, _verdict = await backend.acquire_many(
            [window], [(f"b{n}", [1]) for n in range(30)]
        )
        ttls = (int(await client.pttl(zset)), int(await client.pttl(f"{zset}:sum")))
        await client.aclose()
        assert admitted == 10
        return ttls

    zset_ms, sum_ms = _run(scenario())
    # The window's span (1,000 ms and the 250 ms margin) and a second more.
    assert zset_ms > 2000
    assert sum_ms > 2000


def test_concurrent_calls_share_round_trips(
    redis_server: RedisServer, prefix: str
) -> None:
    """Calls that queue together are admitted together: 200 at once take a
    handful of Redis scripts, not 200, and every one gets its own entry."""
    window = Window("requests_per_minute", 1_000, 60_000)

    async def scenario() -> tuple[int, int, int]:
        client = connect(redis_server.url, max_connections=4)
        backend = RedisLimitBackend(client, RedisLink(), prefix, FAKE_KEY)
        limiter = Limiter(backend, [window])
        call = Call("m", 10, 10)
        before: Any = await client.info("commandstats")
        deadline_s = time.monotonic() + 30
        reservations = await asyncio.gather(
            *(limiter.acquire(call, deadline_s=deadline_s) for _ in range(200))
        )
        after: Any = await client.info("commandstats")
        zset = f"{prefix}limit:{key_id(FAKE_KEY)}:{window.name}"
        held = int(await client.zcard(zset))
        await client.aclose()
        scripts = sum(
            after.get(name, {}).get("calls", 0) - before.get(name, {}).get("calls", 0)
            for name in ("cmdstat_evalsha", "cmdstat_eval")
        )
        return len({r.token for r in reservations}), held, scripts

    tokens, held, scripts = _run(scenario())
    assert tokens == held == 200
    assert scripts <= 10


def test_a_call_that_stops_waiting_takes_no_room(
    redis_server: RedisServer, prefix: str
) -> None:
    """A queued call cancelled (its deadline, a shutdown) is passed over: the
    call behind it is admitted when room frees, and the cancelled one never
    is."""
    window = Window("requests_per_second", 1, 300)

    async def scenario() -> tuple[bool, int]:
        client = connect(redis_server.url, max_connections=4)
        limiter = Limiter(
            RedisLimitBackend(client, RedisLink(), prefix, FAKE_KEY), [window]
        )
        call = Call("m", 10, 10)
        deadline_s = time.monotonic() + 10
        before: Any = await client.info("commandstats")
        await limiter.acquire(call, deadline_s=deadline_s)
        doomed = asyncio.create_task(limiter.acquire(call, deadline_s=deadline_s))
        behind = asyncio.create_task(limiter.acquire(call, deadline_s=deadline_s))
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.wait_for(behind, timeout=5)
        after: Any = await client.info("commandstats")
        await client.aclose()
        return doomed.cancelled(), after["cmdstat_zadd"]["calls"] - before.get(
            "cmdstat_zadd", {}
        ).get("calls", 0)

    cancelled, entries_added = _run(scenario())
    assert cancelled
    # The first call and `behind`; none for the cancelled call.
    assert entries_added == 2


def test_a_call_given_up_during_an_outage_is_not_admitted_after_it(
    own_redis: OwnRedis, prefix: str
) -> None:
    """A call that stops waiting while Redis is down (its deadline, a
    shutdown) takes no room once Redis is back: the queue is asked for again
    without it."""
    window = Window("requests_per_minute", 100, 60_000)
    zset = f"{prefix}limit:{key_id(FAKE_KEY)}:{window.name}"

    async def scenario() -> int:
        client = connect(own_redis.url, max_connections=4)
        link = RedisLink()
        limiter = Limiter(RedisLimitBackend(client, link, prefix, FAKE_KEY), [window])
        call = Call("m", 10, 10)
        await limiter.acquire(call, deadline_s=time.monotonic() + 30)
        own_redis.stop()
        gone = asyncio.create_task(
            limiter.acquire(call, deadline_s=time.monotonic() + 30)
        )
        deadline = time.monotonic() + 10
        while not link.down:
            assert time.monotonic() < deadline, "the outage was never noticed"
            await asyncio.sleep(0.02)
        gone.cancel()
        own_redis.start()
        await asyncio.wait_for(
            limiter.acquire(call, deadline_s=time.monotonic() + 30), timeout=30
        )
        held = int(await client.zcard(zset))
        await client.aclose()
        return held

    # The call before the outage and the one after; not the one given up.
    assert _run(scenario()) == 2


def test_dry_run_takes_no_room(make_backend: Backends) -> None:
    """Asking whether there is room does not use it."""

    async def scenario() -> list[int]:
        backend = make_backend()
        waits = []
        for n in range(5):
            verdict = await backend.acquire([REQUESTS], [1], f"p{n}", dry_run=True)
            waits.append(verdict.wait_ms)
        return waits

    assert make_backend.run(scenario) == [0, 0, 0, 0, 0]


def test_limiter_refuses_a_wait_past_the_deadline() -> None:
    """A wait longer than the task's time left fails at once as rate_limited."""

    async def scenario() -> TaskError:
        limiter = Limiter(MemoryLimitBackend(), [REQUESTS])
        call = Call("m", 10, 10)
        for _ in range(3):
            await limiter.acquire(call, deadline_s=time.monotonic() + 5)
        with pytest.raises(TaskError) as caught:
            await limiter.acquire(call, deadline_s=time.monotonic() + 5)
        return caught.value

    error = _run(scenario())
    assert error.error_type is ErrorType.RATE_LIMITED
    assert error.message.startswith("the requests per minute limit leaves no room")


class _TellsWhenFull(MemoryLimitBackend):
    """The memory backend, and an event set when it has answered "wait"."""

    def __init__(self) -> None:
        super().__init__()
        self.said_wait = asyncio.Event()

    async def acquire_many(
        self,
        windows: list[Window],
        requests: list[tuple[str, list[int]]],
        *,
        stop: Stop | None = None,
    ) -> tuple[int, Verdict]:
        answer = await super().acquire_many(windows, requests, stop=stop)
        if answer[1].wait_ms > 0:
            self.said_wait.set()
        return answer


@pytest.mark.parametrize("arrives", ["with the head", "while the head waits"])
def test_a_call_queued_behind_a_long_wait_fails_at_once_too(arrives: str) -> None:
    """Calls queue in order, so a call behind one that waits cannot start
    before it: when that wait outlasts its deadline, it fails at once as
    rate_limited rather than holding its slot until the deadline, whether it
    queued with the head or after the head began to wait."""

    async def scenario() -> TaskError:
        backend = _TellsWhenFull()
        limiter = Limiter(backend, [REQUESTS])
        call = Call("m", 10, 10)
        for _ in range(3):
            await limiter.acquire(call, deadline_s=time.monotonic() + 5)
        head = asyncio.create_task(
            limiter.acquire(call, deadline_s=time.monotonic() + 300)
        )
        if arrives == "while the head waits":
            await asyncio.wait_for(backend.said_wait.wait(), timeout=5)
        hurried = asyncio.create_task(
            limiter.acquire(call, deadline_s=time.monotonic() + 30)
        )
        try:
            # Far inside the 30 s deadline: without the check it would wait
            # until then (the window frees in a minute).
            await asyncio.wait_for(asyncio.shield(hurried), timeout=5)
        except TaskError as error:
            return error
        finally:
            head.cancel()
            hurried.cancel()
        raise AssertionError("the hurried call was admitted")

    error = _run(scenario())
    assert error.error_type is ErrorType.RATE_LIMITED
    assert error.retryable
    assert error.message.startswith("the requests per minute limit leaves no room")


def test_spent_budget_fails_when_so_configured() -> None:
    """With onExceeded=fail, a spent budget fails the call as budget_exceeded."""

    async def scenario() -> TaskError:
        limiter = Limiter(MemoryLimitBackend(), [TOKENS], budget_fails=True)
        await limiter.acquire(Call("m", 50, 40), deadline_s=time.monotonic() + 5)
        with pytest.raises(TaskError) as caught:
            await limiter.acquire(Call("m", 50, 40), deadline_s=time.monotonic() + 5)
        return caught.value

    error = _run(scenario())
    assert error.error_type is ErrorType.BUDGET_EXCEEDED
    assert error.message == "the tokens per hour budget is spent"


def test_redis_keys_hold_a_hash_of_the_key_never_the_key(
    redis_server: RedisServer, prefix: str
) -> None:
    """Shared limiter state is keyed by a hash; the key itself is nowhere."""

    async def scenario() -> list[bytes]:
        client = connect(redis_server.url, max_connections=2)
        backend = RedisLimitBackend(client, RedisLink(), prefix, FAKE_KEY)
        await backend.acquire([REQUESTS], [1], "t", dry_run=False)
        await backend.pause(1000, "why")
        found: Any = await client.keys(f"{prefix}limit:*")
        keys = [bytes(key) for key in found]
        await client.aclose()
        return keys

    keys = _run(scenario())
    assert sorted(keys) == sorted(
        f"{prefix}limit:{key_id(FAKE_KEY)}:{name}".encode()
        for name in ("requests_per_minute", "requests_per_minute:sum", "pause")
    )
    assert all(FAKE_KEY.encode() not in key for key in keys)


def test_exhausted_api_headers_pause_the_key() -> None:
    """`anthropic-ratelimit-*-remaining: 0` pauses the key until its reset."""

    async def scenario() -> tuple[int, str | None]:
        backend = MemoryLimitBackend()
        limiter = Limiter(backend, [REQUESTS])
        reset = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
        await limiter.observe(
            {
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": reset.isoformat(),
                "anthropic-ratelimit-tokens-remaining": "5000",
            }
        )
        return await backend.paused()

    left_ms, reason = _run(scenario())
    assert 25_000 < left_ms <= 30_000
    assert reason == "the API reports no requests left"


def test_spend_limit_429_is_not_retryable() -> None:
    """A 429 about credit is not a rate limit: no retry; a plain 429 is retried."""

    def refusal(message: str) -> anthropic.RateLimitError:
        body = {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": message},
        }
        request = httpx2.Request("POST", "http://127.0.0.1/v1/messages")
        response = httpx2.Response(
            429, json=body, request=request, headers={"retry-after": "7"}
        )
        return anthropic.RateLimitError(message, response=response, body=body)

    spend = api_call_error(refusal("Your credit balance is too low"))
    rate = api_call_error(refusal("Number of requests has exceeded your rate limit"))
    assert (spend.error_type, spend.retryable) == (ErrorType.RATE_LIMITED, False)
    assert (rate.error_type, rate.retryable, rate.retry_after_s) == (
        ErrorType.RATE_LIMITED,
        True,
        7.0,
    )


def test_the_running_total_matches_the_window_through_settles_and_ageing(
    redis_server: RedisServer, prefix: str
) -> None:
    """The Redis window's `:sum` always equals the costs its entries hold."""
    window = Window("tokens_per_second", 100, 400, Unit.TOKENS)

    async def scenario() -> tuple[list[int], list[int]]:
        client = connect(redis_server.url, max_connections=2)
        backend = RedisLimitBackend(client, RedisLink(), prefix, FAKE_KEY)
        zset = f"{prefix}limit:{key_id(FAKE_KEY)}:{window.name}"

        async def both() -> tuple[int, int]:
            members: Any = await client.zrange(zset, 0, -1)
            held = sum(int(m.rsplit(b"|", 1)[1]) for m in members)
            total: Any = await client.get(f"{zset}:sum")
            return int(total or 0), held

        seen = []
        for n in range(4):
            verdict = await backend.acquire([window], [30], f"t{n}", dry_run=False)
            seen.append(verdict.wait_ms)
        # A reservation settled below what it took frees room at once.
        await backend.settle([window], "t0", [30], [5])
        await backend.settle([window], "t1", [30], [0])
        after_settle = await both()
        admitted = await backend.acquire([window], [30], "t4", dry_run=False)
        seen.append(admitted.wait_ms)
        deadline = asyncio.get_running_loop().time() + 5
        while (await backend.acquire([window], [90], "t5", dry_run=True)).wait_ms:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        aged = await both()
        await client.aclose()
        return seen, [*after_settle, *aged]

    seen, totals = _run(scenario())
    # Three of 30 fit in 100; the fourth waits; after the settles it fits.
    assert seen[:3] == [0, 0, 0]
    assert seen[3] > 0
    assert seen[4] == 0
    total_after_settle, held_after_settle, total_aged, held_aged = totals
    # t0 settled to 5, t1 to 0, t2 holds 30; t3 was never admitted.
    assert total_after_settle == held_after_settle == 35
    assert total_aged == held_aged


def test_memory_windows_do_not_grow_with_the_calls_they_have_counted() -> None:
    """An hour's window at a high limit holds what its calls cost, not one
    entry per call: a 100,000-task batch must not grow the node's memory
    (issue 7). The limit still holds to the call."""
    hour = Window("requests_per_hour", 20_000, 3_600_000)
    tokens = Window("tokens_per_hour", 10_000_000, 3_600_000, Unit.TOKENS)
    call = Call("claude-test", 10, 20)

    async def scenario() -> tuple[int, int]:
        backend = MemoryLimitBackend()
        limiter = Limiter(backend, [hour, tokens])
        deadline_s = time.monotonic() + 60
        for number in range(hour.limit):
            reservation = await limiter.acquire(call, deadline_s=deadline_s)
            # Half settle to what they reserved, half to less.
            output = 20 if number % 2 else 5
            await limiter.settle(
                reservation, call, input_tokens=10, output_tokens=output
            )
        entries = max(len(w.entries) for w in backend._windows.values())
        verdict = await backend.acquire([hour], [1], "one-more", dry_run=True)
        return entries, verdict.wait_ms

    entries, wait_ms = _run(scenario())
    # Settled calls of one second merge; at most a compaction's worth of
    # entries (1,024) wait for the next one.
    assert entries <= 1_100
    assert wait_ms > 3_500_000
