"""Tests of the Messages API simulator, driven through the real anthropic SDK."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime
from typing import Any

import aiohttp
import anthropic
import pytest
from anthropic.types import (
    Message,
    RawContentBlockDeltaEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    TextBlock,
    TextDelta,
)

from mesh_node import simulator as sim_module
from mesh_node.simulator import (
    FaultSpec,
    Simulator,
    SimulatorConfig,
    keys_from_env,
    parse_directives,
    prompt_key,
    serve_forever,
)

KEY = "sk-ant-test-xyz"
MODEL = "claude-sim-test"
StartSim = Callable[..., Simulator]


@pytest.fixture
def loop_runner() -> Iterator[asyncio.Runner]:
    """One event loop per test; the simulator and the clients live on it."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture
def start_sim(loop_runner: asyncio.Runner) -> Iterator[StartSim]:
    """Starts simulators on free loopback ports and stops them afterwards."""
    started: list[Simulator] = []

    def start(config: SimulatorConfig | None = None) -> Simulator:
        sim = Simulator(config or SimulatorConfig(port=0), rng=random.Random(7))
        loop_runner.run(sim.start())
        started.append(sim)
        return sim

    yield start
    for sim in started:
        loop_runner.run(sim.stop())


@pytest.fixture
def sim(start_sim: StartSim) -> Simulator:
    """A simulator with default settings on a free port."""
    return start_sim()


def client_for(
    sim: Simulator,
    *,
    api_key: str | None = KEY,
    auth_token: str | None = None,
    default_headers: dict[str, str] | None = None,
) -> anthropic.AsyncAnthropic:
    """Returns an SDK client aimed at the simulator, without retries."""
    if auth_token is not None:
        api_key = None
    return anthropic.AsyncAnthropic(
        api_key=api_key,
        auth_token=auth_token,
        base_url=sim.base_url,
        max_retries=0,
        default_headers=default_headers,
    )


async def ask(client: anthropic.AsyncAnthropic, text: str, **options: Any) -> Message:
    """Sends one user message and returns the parsed answer."""
    options.setdefault("max_tokens", 256)
    message: Message = await client.messages.create(
        model=MODEL, messages=[{"role": "user", "content": text}], **options
    )
    return message


def texts(message: Message) -> list[str]:
    """Returns the text of each text block of a message."""
    return [block.text for block in message.content if isinstance(block, TextBlock)]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Polls a condition until it holds, failing after a deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


async def raw_post(
    url: str, payload: object, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    """POSTs JSON with aiohttp and returns status, JSON body and headers."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=payload, headers=headers or {}) as resp,
    ):
        return resp.status, await resp.json(), dict(resp.headers)


def run(
    loop_runner: asyncio.Runner, scenario: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """Runs an async scenario on the test's loop."""
    loop_runner.run(scenario())


def test_success_returns_realistic_message(
    sim: Simulator, loop_runner: asyncio.Runner
) -> None:
    """A valid request gets a deterministic message, usage and a request id."""

    async def scenario() -> None:
        async with client_for(sim) as client:
            message = await ask(client, "Hello there", system="Be brief.")
        text = "Simulated reply to: Hello there"
        assert texts(message) == [text]
        assert message.id.startswith("msg_sim_")
        assert message.model == MODEL
        assert message.role == "assistant"
        assert message.stop_reason == "end_turn"
        assert message.stop_sequence is None
        chars = len("Be brief.") + len("Hello there")
        assert message.usage.input_tokens == math.ceil(chars / 4)
        assert message.usage.output_tokens == math.ceil(len(text) / 4)
        assert message._request_id is not None
        assert message._request_id.startswith("req_sim_")

    run(loop_runner, scenario)


@pytest.mark.parametrize("style", ["bearer", "x-api-key"])
def test_both_auth_header_styles_are_accepted(
    start_sim: StartSim, loop_runner: asyncio.Runner, style: str
) -> None:
    """A configured key is accepted as Bearer token and as x-api-key."""
    sim = start_sim(SimulatorConfig(port=0, api_keys=frozenset({KEY})))

    async def scenario() -> None:
        if style == "bearer":
            client = client_for(sim, auth_token=KEY)
            extra: dict[str, Any] = {}
        else:
            client = client_for(sim, default_headers={"X-Api-Key": KEY})
            # The SDK sends api_key as Bearer; drop it so only x-api-key is left.
            extra = {"extra_headers": {"Authorization": anthropic.omit}}
        async with client:
            message = await ask(client, "hi", **extra)
        assert texts(message) == ["Simulated reply to: hi"]

    run(loop_runner, scenario)


def test_wrong_key_raises_authentication_error(
    start_sim: StartSim, loop_runner: asyncio.Runner
) -> None:
    """A key outside api_keys gets 401 authentication_error, never echoed."""
    sim = start_sim(SimulatorConfig(port=0, api_keys=frozenset({KEY})))
    wrong = "sk-ant-test-wrong-key"

    async def scenario() -> None:
        async with client_for(sim, api_key=wrong) as client:
            with pytest.raises(anthropic.AuthenticationError) as caught:
                await ask(client, "hi")
        assert caught.value.status_code == 401
        assert caught.value.type == "authentication_error"
        assert caught.value.api_message == "invalid x-api-key"
        assert wrong not in caught.value.response.text
        assert caught.value.request_id is not None

    run(loop_runner, scenario)


def test_missing_key_and_version_are_rejected(
    sim: Simulator, loop_runner: asyncio.Runner
) -> None:
    """No key is a 401; a missing or malformed anthropic-version is a 400."""
    url = f"{sim.base_url}/v1/messages"
    body = {
        "model": MODEL,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "x"}],
    }

    async def scenario() -> None:
        status, payload, _ = await raw_post(
            url, body, {"anthropic-version": "2023-06-01"}
        )
        assert (status, payload["error"]["type"]) == (401, "authentication_error")
        assert payload["request_id"].startswith("req_")
        for version in (None, "2023/06/01", "2023-13-40"):
            headers = {"x-api-key": KEY}
            if version is not None:
                headers["anthropic-version"] = version
            status, payload, _ = await raw_post(url, body, headers)
            assert status == 400
            assert payload["error"]["type"] == "invalid_request_error"
            assert payload["error"]["message"].startswith("anthropic-version")

    run(loop_runner, scenario)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages.0.role"),
        ({"messages": []}, "messages:"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages.0.content"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": ""}, "model"),
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"system": [{"type": "image"}]}, "system.0"),
        ({"extra_body": {"metadata": "x"}}, "metadata"),
        ({"extra_body": {"stop_sequences": [1]}}, "stop_sequences"),
        (
            {"messages": [{"role": "user", "content": "[[sim:bogus=1]]"}]},
            "messages.0.content",
        ),
    ],
)
def test_invalid_body_names_the_field(
    sim: Simulator, loop_runner: asyncio.Runner, options: dict[str, Any], field: str
) -> None:
    """An invalid body is a 400 invalid_request_error naming the field."""
    request: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
        **options,
    }

    async def scenario() -> None:
        async with client_for(sim) as client:
            with pytest.raises(anthropic.BadRequestError) as caught:
                await client.messages.create(**request)
        assert caught.value.type == "invalid_request_error"
        assert caught.value.api_message is not None
        assert caught.value.api_message.startswith(field)

    run(loop_runner, scenario)


def test_rpm_limit_raises_rate_limit_error_with_retry_after(
    start_sim: StartSim, loop_runner: asyncio.Runner
) -> None:
    """Past rpm in the window, a 429 rate_limit_error carries retry-after."""
    sim = start_sim(SimulatorConfig(port=0, rpm=2))

    async def scenario() -> None:
        async with client_for(sim) as client:
            create = client.messages.with_raw_response.create
            for remaining in ("1", "0"):
                raw = await create(
                    model=MODEL,
                    max_tokens=16,
                    messages=[{"role": "user", "content": "hi"}],
                )
                assert raw.headers["anthropic-ratelimit-requests-limit"] == "2"
                assert (
                    raw.headers["anthropic-ratelimit-requests-remaining"] == remaining
                )
                reset = raw.headers["anthropic-ratelimit-requests-reset"]
                assert datetime.fromisoformat(reset).tzinfo is not None
            with pytest.raises(anthropic.RateLimitError) as caught:
                await ask(client, "hi")
        headers = caught.value.response.headers
        assert caught.value.type == "rate_limit_error"
        assert 1 <= int(headers["retry-after"]) <= 60
        assert 0 < int(headers["retry-after-ms"]) <= 60_000
        assert headers["anthropic-ratelimit-requests-remaining"] == "0"

    run(loop_runner, scenario)


def test_tpm_limit_counts_input_and_output_tokens(
    start_sim: StartSim, loop_runner: asyncio.Runner
) -> None:
    """Tokens of admitted requests fill the tpm window; the next one gets 429."""
    sim = start_sim(SimulatorConfig(port=0, tpm=20))
    # 3 input tokens ("Hello there") + 8 output tokens per request.
    per_request = 11

    async def scenario() -> None:
        async with client_for(sim) as client:
            raw = await client.messages.with_raw_response.create(
                model=MODEL,
                max_tokens=64,
                messages=[{"role": "user", "content": "Hello there"}],
            )
            for family in ("tokens", "input-tokens", "output-tokens"):
                prefix = f"anthropic-ratelimit-{family}"
                assert raw.headers[f"{prefix}-limit"] == "20"
                assert raw.headers[f"{prefix}-remaining"] == str(20 - per_request)
            assert "anthropic-ratelimit-requests-limit" not in raw.headers
            with pytest.raises(anthropic.RateLimitError) as caught:
                await ask(client, "Hello there")
        assert int(caught.value.response.headers["retry-after"]) >= 1

    run(loop_runner, scenario)


def test_unlimited_sends_no_rate_limit_headers(
    sim: Simulator, loop_runner: asyncio.Runner
) -> None:
    """Without rpm or tpm there are no anthropic-ratelimit headers."""

    async def scenario() -> None:
        async with client_for(sim) as client:
            raw = await client.messages.with_raw_response.create(
                model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}]
            )
        assert not [
            name for name in raw.headers if name.startswith("anthropic-ratelimit")
        ]
        assert raw.headers["request-id"].startswith("req_sim_")

    run(loop_runner, scenario)


def test_scripted_529_then_success(sim: Simulator, loop_runner: asyncio.Runner) -> None:
    """Queued faults are consumed one per request, in order."""
    sim.queue_faults([{"status": 529, "retry_after_s": 1}, {"status": 200}])

    async def scenario() -> None:
        async with client_for(sim) as client:
            with pytest.raises(anthropic.OverloadedError) as caught:
                await ask(client, "hi")
            message = await ask(client, "hi")
        assert caught.value.type == "overloaded_error"
        assert caught.value.response.headers["retry-after"] == "1"
        assert texts(message) == ["Simulated reply to: hi"]
        assert dict(sim.stats.by_status) == {"529": 1, "200": 1}

    run(loop_runner, scenario)


def test_scripted_faults_over_http(sim: Simulator, loop_runner: asyncio.Runner) -> None:
    """POST /_sim/faults queues faults and rejects bad entries atomically."""
    url = f"{sim.base_url}/_sim/faults"

    async def scenario() -> None:
        bad = {"faults": [{"kind": "cut"}, {"status": 302}]}
        status, payload, _ = await raw_post(url, bad)
        assert status == 400
        assert payload["error"]["message"].startswith("faults.1.status")
        status, payload, _ = await raw_post(url, {"faults": [{"kind": "cut"}]})
        assert (status, payload) == (200, {"queued": 1})
        async with client_for(sim) as client:
            with pytest.raises(anthropic.APIConnectionError):
                await ask(client, "hi")
            assert texts(await ask(client, "hi")) == ["Simulated reply to: hi"]

    run(loop_runner, scenario)


def test_queue_faults_rejects_invalid_entries_atomically(sim: Simulator) -> None:
    """queue_faults raises on a bad entry and queues none of the batch."""
    with pytest.raises(ValueError, match="status"):
        sim.queue_faults([{"status": 529}, {"status": 302}])
    with pytest.raises(ValueError, match="kind"):
        sim.queue_faults([{"kind": "explode"}])
    assert sim.queue_faults([FaultSpec(status=500)]) == 1


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (408, anthropic.RequestTimeoutError, "timeout_error"),
        (413, anthropic.ContentTooLargeError, "request_too_large"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (502, anthropic.InternalServerError, "api_error"),
        (503, anthropic.ServiceUnavailableError, "api_error"),
        (504, anthropic.GatewayTimeoutError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
def test_status_directive_answers_with_matching_error_type(
    sim: Simulator,
    loop_runner: asyncio.Runner,
    status: int,
    error_class: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    """[[sim:status=N]] answers N with the real API's error type for N."""

    async def scenario() -> None:
        async with client_for(sim) as client:
            with pytest.raises(error_class) as caught:
                await ask(client, f"[[sim:status={status}]] hi")
        assert caught.value.status_code == status
        assert caught.value.type == error_type
        if status == 429:
            assert caught.value.response.headers["retry-after"] == "1"

    run(loop_runner, scenario)


def test_retry_after_directive_sets_both_headers(
    sim: Simulator, loop_runner: asyncio.Runner
) -> None:
    """[[sim:status=503,retry_after_s=2]] sends retry-after 2 and 2000 ms."""

    async def scenario() -> None:
        async with client_for(sim) as client:
            with pytest.raises(anthropic.ServiceUnavailableError) as caught:
                await ask(client, "[[sim:status=503,retry_after_s=2]] hi")
        headers = caught.value.response.headers
        assert (headers["retry-after"], headers["retry-after-ms"]) == ("2", "2000")

    run(loop_runner, scenario)


def test_latency_from_config_and_directive_delays_answer(
    start_sim: StartSim, loop_runner: asyncio.Runner
) -> None:
    """Configured latency and [[sim:latency_ms=N]] add up before the answer."""
    sim = start_sim(SimulatorConfig(port=0, latency_ms=100))

    async def scenario() -> None:
        async with client_for(sim) as client:
            started = time.monotonic()
            message = await ask(client, "[[sim:latency_ms=150]] slow")
            elapsed_s = time.monotonic() - started
        assert elapsed_s >= 0.25
        assert texts(message) == ["Simulated reply to: slow"]

    run(loop_runner, scenario)


def test_fail_times_fails_identical_texts_then_succeeds(
    sim: Simulator, loop_runner: asyncio.Runner
) -> None:
    """[[sim:fail_times=2,status=529]] fails twice per text, then succeeds."""
    text = "[[sim:fail_times=2,status=529]] flaky"

    async def scenario() -> None:
        async with client_for(sim) as client:
            for _ in range(2):
                with pytest.raises(anthropic.OverloadedError):
                    await ask(client, text)
            assert texts(await ask(client, text)) == ["Simulated reply to: flaky"]
            with pytest.raises(anthropic.OverloadedError):
                await ask(client, text + " other")
        assert sim.stats.by_prompt[prompt_key(text)] == 3

    run(loop_runner, scenario)


async def _ask_cut(client: anthropic.AsyncAnthropic, stream: bool) -> None:
    """Sends a [[sim:cut]] request, streaming or not, and reads the answer."""
    if not stream:
        await ask(client, "[[sim:cut]] hi")
        return
    async with client.messages.stream(
        model=MODEL,
        max_tokens=256,
        messages=[{"role": "user", "content": "[[sim:cut]] hi"}],
    ) as events:
        await events.get_final_message()


@pytest.mark.parametrize("stream", [False, True])
def test_cut_raises_api_connection_error(
    sim: Simulator, loop_runner: asyncio.Runner, stream: bool
) -> None:
    """[[sim:cut]] starts the body, then closes the connection mid-way."""

    async def scenario() -> None:
        async with client_for(sim) as client:
            with pytest.raises(anthropic.APIConnectionError) as caught:
                await _ask_cut(client, stream)
            assert not isinstance(caught.value, anthropic.APITimeoutError)
            assert texts(await ask(client, "after")) == ["Simulated reply to: after"]
        assert sim.stats.by_status["cut"] == 1

    run(loop_runner, scenario)


def test_hang_raises_api_timeout_error(
    sim: Simulator, loop_runner: asyncio.Runner
) -> None:
    """[[sim:hang]] never answers, so a short client timeout fires."""

    async def scenario() -> None:
        async with client_for(sim) as client:
            with pytest.raises(anthropic.APITimeoutError):
                await ask(client, "[[sim:hang]] hi", timeout=0.3)
            await wait_until(lambda: sim.stats.by_status.get("hang") == 1)
            assert texts(await ask(client, "after")) == ["Simulated reply to: after"]

    run(loop_runner, scenario)


def test_hang_ends_when_simulator_stops(
    sim: Simulator, loop_runner: asyncio.Runner
) -> None:
    """Stopping the simulator ends a pending hang with a connection error."""

    async def scenario() -> None:
        async with client_for(sim) as client:
            pending = asyncio.ensure_future(ask(client, "[[sim:hang]] hi", timeout=30))
            await wait_until(lambda: sim.stats.requests == 1)
            await sim.stop()
            with pytest.raises(anthropic.APIConnectionError):
                await pending
        assert sim.stats.by_status["hang"] == 1

    run(loop_runner, scenario)


def test_empty_and_max_tokens_directives_shape_the_answer(
    sim: Simulator, loop_runner: asyncio.Runner
) -> None:
    """[[sim:empty]] gives no content; [[sim:max_tokens]] sets the stop reason."""

    async def scenario() -> None:
        async with client_for(sim) as client:
            empty = await ask(client, "[[sim:empty]] hi")
            capped = await ask(client, "[[sim:max_tokens]] hi")
            both = await ask(client, "[[sim:empty,max_tokens]] hi")
        assert (empty.content, empty.usage.output_tokens) == ([], 0)
        assert empty.stop_reason == "end_turn"
        assert capped.stop_reason == "max_tokens"
        assert texts(capped) == ["Simulated reply to: hi"]
        assert (both.content, both.stop_reason) == ([], "max_tokens")

    run(loop_runner, scenario)


def test_small_max_tokens_truncates_the_text(
    sim: Simulator, loop_runner: asyncio.Runner
) -> None:
    """A reply longer than max_tokens is cut to it, with stop_reason max_tokens."""

    async def scenario() -> None:
        async with client_for(sim) as client:
            message = await ask(client, "Hello there", max_tokens=2)
        assert texts(message) == ["Simulated reply to: Hello there"[:8]]
        assert (message.usage.output_tokens, message.stop_reason) == (2, "max_tokens")

    run(loop_runner, scenario)


async def _collect_raw_stream(
    client: anthropic.AsyncAnthropic, text: str, max_tokens: int
) -> tuple[list[str], str, str | None, int, int]:
    """Reads create(stream=True) and returns event types, text, stop, usage."""
    stream = await client.messages.create(
        model=MODEL,
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": text}],
        stream=True,
    )
    kinds: list[str] = []
    pieces: list[str] = []
    stop: str | None = None
    usage = (0, 0)
    async for event in stream:
        kinds.append(event.type)
        if isinstance(event, RawMessageStartEvent):
            usage = (event.message.usage.input_tokens, 0)
        if isinstance(event, RawContentBlockDeltaEvent) and isinstance(
            event.delta, TextDelta
        ):
            pieces.append(event.delta.text)
        if isinstance(event, RawMessageDeltaEvent):
            stop, usage = event.delta.stop_reason, (usage[0], event.usage.output_tokens)
    return kinds, "".join(pieces), stop, *usage


@pytest.mark.parametrize(
    ("text", "max_tokens"),
    [
        ("Tell me a story about a lighthouse keeper and the sea", 256),
        ("Hello there", 3),
        ("[[sim:empty]] hi", 256),
        ("[[sim:max_tokens]] hi", 256),
    ],
)
def test_streaming_matches_non_streaming(
    sim: Simulator, loop_runner: asyncio.Runner, text: str, max_tokens: int
) -> None:
    """stream() and create(stream=True) yield the non-streaming text and usage."""

    async def scenario() -> None:
        async with client_for(sim) as client:
            plain = await ask(client, text, max_tokens=max_tokens)
            async with client.messages.stream(
                model=MODEL,
                max_tokens=max_tokens,
                messages=[{"role": "user", "content": text}],
            ) as events:
                final = await events.get_final_message()
            raw = await _collect_raw_stream(client, text, max_tokens)
        assert texts(final) == texts(plain)
        assert final.usage.input_tokens == plain.usage.input_tokens
        assert final.usage.output_tokens == plain.usage.output_tokens
        assert final.stop_reason == plain.stop_reason
        kinds, joined, stop, input_tokens, output_tokens = raw
        assert (kinds[0], kinds[-1]) == ("message_start", "message_stop")
        assert joined == "".join(texts(plain))
        assert stop == plain.stop_reason
        assert (input_tokens, output_tokens) == (
            plain.usage.input_tokens,
            plain.usage.output_tokens,
        )
        if plain.content and len(joined) > 8:
            assert kinds.count("content_block_delta") >= 2

    run(loop_runner, scenario)


def test_stats_count_prompts_and_reset(
    start_sim: StartSim, loop_runner: asyncio.Runner
) -> None:
    """Stats count requests, outcomes and prompts, in-process and over HTTP."""
    sim = start_sim(SimulatorConfig(port=0, api_keys=frozenset({KEY})))

    async def scenario() -> None:
        billed: dict[str, list[int]] = {}
        async with client_for(sim) as client:
            for text in ("alpha", "alpha", "beta"):
                usage = (await ask(client, text)).usage
                total = billed.setdefault(prompt_key(text), [0, 0])
                total[0] += usage.input_tokens
                total[1] += usage.output_tokens
        async with client_for(sim, api_key="sk-ant-test-other") as client:
            with pytest.raises(anthropic.AuthenticationError):
                await ask(client, "alpha")
        stats = sim.stats
        assert stats.requests == 4
        assert dict(stats.by_status) == {"200": 3, "401": 1}
        assert dict(stats.by_prompt) == {prompt_key("alpha"): 2, prompt_key("beta"): 1}
        assert dict(stats.billed_by_prompt) == dict(stats.by_prompt)
        # The usage the answers reported, summed; the refused call adds none.
        assert {k: list(v) for k, v in stats.tokens_by_prompt.items()} == billed
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{sim.base_url}/_sim/stats") as resp:
                assert await resp.json() == stats.as_dict()
            async with http.post(f"{sim.base_url}/_sim/reset") as resp:
                assert resp.status == 200
        assert sim.stats.as_dict() == {
            "requests": 0,
            "by_status": {},
            "by_prompt": {},
            "billed_by_prompt": {},
            "tokens_by_prompt": {},
        }

    run(loop_runner, scenario)


def test_random_faults_follow_fail_rate(
    start_sim: StartSim, loop_runner: asyncio.Runner
) -> None:
    """With fail_rate 1 every request gets a retryable 429, 500 or 529."""
    sim = start_sim(SimulatorConfig(port=0, fail_rate=1.0))

    async def scenario() -> None:
        async with client_for(sim) as client:
            for _ in range(6):
                with pytest.raises(anthropic.APIStatusError) as caught:
                    await ask(client, "hi")
                assert caught.value.status_code in (429, 500, 529)
                if caught.value.status_code == 429:
                    assert caught.value.response.headers["retry-after"] == "1"

    run(loop_runner, scenario)


def test_unknown_route_returns_error_envelope(
    sim: Simulator, loop_runner: asyncio.Runner
) -> None:
    """An unknown route is a 404 not_found_error in the API's envelope."""

    async def scenario() -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{sim.base_url}/v1/nothing-here") as resp,
        ):
            payload = await resp.json()
        assert resp.status == 404
        assert payload["type"] == "error"
        assert payload["error"]["type"] == "not_found_error"

    run(loop_runner, scenario)


def test_handler_exception_does_not_kill_the_server(
    sim: Simulator, loop_runner: asyncio.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing handler answers 500 api_error and the server keeps serving."""

    def broken(*_: object) -> None:
        raise RuntimeError("boom")

    async def scenario() -> None:
        async with client_for(sim) as client:
            monkeypatch.setattr(sim_module, "_make_reply", broken)
            with pytest.raises(anthropic.InternalServerError) as caught:
                await ask(client, "hi")
            monkeypatch.undo()
            assert texts(await ask(client, "hi")) == ["Simulated reply to: hi"]
        assert caught.value.type == "api_error"

    run(loop_runner, scenario)


def test_parse_directives_combines_groups() -> None:
    """Several directives, in one group or many, combine into one FaultSpec."""
    spec = parse_directives("a [[sim:status=529, retry_after_s=2]] b [[sim:cut]]")
    assert spec == FaultSpec(status=529, retry_after_s=2.0, cut=True)
    assert parse_directives("no directives") == FaultSpec()
    with pytest.raises(ValueError, match="latency_ms"):
        parse_directives("[[sim:latency_ms=soon]]")


def test_keys_from_env_reads_comma_separated_keys() -> None:
    """MESH_SIM_API_KEYS is split on commas; unset or blank means any key."""
    assert keys_from_env({}) is None
    assert keys_from_env({"MESH_SIM_API_KEYS": " , "}) is None
    keys = keys_from_env({"MESH_SIM_API_KEYS": " sk-ant-test-a, sk-ant-test-b ,"})
    assert keys == frozenset({"sk-ant-test-a", "sk-ant-test-b"})


@pytest.mark.parametrize(
    "bad",
    [{"fail_rate": 1.5}, {"rpm": 0}, {"latency_ms": -1}, {"port": 70000}],
)
def test_config_rejects_out_of_range_values(bad: dict[str, Any]) -> None:
    """SimulatorConfig refuses settings the simulator cannot honour."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        SimulatorConfig(**bad)


def test_serve_forever_logs_port_prints_nothing_and_stops(
    loop_runner: asyncio.Runner,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """serve_forever logs simulator.listening with the bound port and stops on set."""
    caplog.set_level(logging.INFO, logger="mesh_node.simulator")

    def listening() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "simulator.listening"]

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(serve_forever(SimulatorConfig(port=0), stop))
        await wait_until(lambda: bool(listening()))
        record = listening()[0]
        assert record.__dict__["host"] == "127.0.0.1"
        base_url = f"http://127.0.0.1:{record.__dict__['port']}"
        async with anthropic.AsyncAnthropic(
            api_key=KEY, base_url=base_url, max_retries=0
        ) as client:
            assert texts(await ask(client, "hi")) == ["Simulated reply to: hi"]
        stop.set()
        await asyncio.wait_for(task, 10)

    run(loop_runner, scenario)
    assert capsys.readouterr().out == ""
