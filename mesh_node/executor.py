"""What happens to one admitted task: the API call, its retries and its result.

The executor owns the mapping from a `Task` to a Messages API request and from
the answer (or the failure) to the `TaskResult`; when and how many tasks run is
the worker's business.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import orjson

from . import logs
from .errors import (
    ApiCallError,
    DeadlineExceededError,
    ErrorType,
    PartialAnswerError,
    TaskDeferredError,
    TaskError,
    api_call_error,
)
from .keys import RotatingKey
from .observe import ApiCall, Observer
from .ratelimit.limiter import DEFAULT_PAUSE_S, Call, Limiter
from .retrying import RetryPolicy
from .settings import Settings
from .tasks import ResultError, ResultMetadata, Task, TaskResult, Usage, utc_timestamp
from .telemetry import current_traceparent

if TYPE_CHECKING:
    import anthropic
    from anthropic.types import Message, MessageParam, MetadataParam

    from .sdk import PendingClient

log = logging.getLogger(__name__)

# Above this `max_tokens` an answer may take longer than the ten minutes a
# non-streaming call is given (the SDK's rule: an hour per 128,000 tokens), so
# it is streamed.
STREAMING_MIN_TOKENS = 21_333


class Executor:
    """Runs tasks against the Messages API under the node's policy.

    Args:
        client: the SDK client, built with `max_retries=0`, or being built.
        settings: the node's settings (defaults, deadlines).
        policy: the retry policy.
        limiter: the rate limits and budgets of the API key.
        observer: told of limiter waits, retries and every API call.
        key: the API key the client was built with, when it may rotate.
    """

    def __init__(
        self,
        client: PendingClient,
        settings: Settings,
        policy: RetryPolicy,
        limiter: Limiter,
        observer: Observer | None = None,
        key: RotatingKey | None = None,
    ) -> None:
        self._client = client
        self._key = key
        self._settings = settings
        self._policy = policy
        self.limiter = limiter
        self.observer = observer or Observer()

    async def execute(
        self, task: Task, *, source: str, received_s: float
    ) -> TaskResult:
        """Runs one task to its result; never raises for a task's own failure.

        Args:
            task: the admitted task.
            source: where it came from (stream entry id, `line N`).
            received_s: when the node took it, on `time.monotonic`'s clock;
                the task's deadline counts from then.
        """
        model = task.model or self._settings.default_model
        tries = _Tries(Call(model, _input_estimate(task), self._max_tokens(task)))
        try:
            _check_not_expired(task)
            held_s = await self.limiter.hold(tries.call)
        except TaskError as exc:
            return self.failure(task.id, exc, source=source, model=model)
        if held_s > 0:
            self.observer.limiter_waited(held_s, "budget")
            received_s += held_s
        try:
            message = await self._within_deadline(task, model, received_s, tries)
        except TaskError as exc:
            if self._defers(exc):
                raise TaskDeferredError(exc) from None
            return self.failure(
                task.id,
                exc,
                source=source,
                model=model,
                attempts=tries.count,
                received_s=received_s,
            )
        text = message.text
        problem = self._answer_problem(text) or (
            None
            if text
            else f"the API returned an empty answer (stop reason {message.stop_reason})"
        )
        if problem is not None:
            return self.failure(
                task.id,
                TaskError(problem, ErrorType.API_ERROR),
                source=source,
                model=model,
                attempts=tries.count,
                received_s=received_s,
            )
        return self._success(task, message, text, source, tries.count, received_s)

    def _answer_problem(self, text: str) -> str | None:
        """Why an answer may not be published: not UTF-8, or over the size cap.

        Either is refused rather than repaired or cut: the answer was paid
        for, and a result that differs from it silently would be worse.
        """
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            return f"the answer is not valid UTF-8 (at character {exc.start})"
        limit = self._settings.max_response_bytes
        if size > limit:
            return f"the answer is {size} bytes, more than maxResponseBytes ({limit})"
        return None

    async def _within_deadline(
        self, task: Task, model: str, received_s: float, tries: _Tries
    ) -> Answer:
        """Runs the retry policy until an answer or the task's deadline."""
        deadline_s = received_s + self._budget_ms(task) / 1000

        async def attempt(_number: int) -> Answer:
            return await self._attempt(task, model, deadline_s, tries)

        try:
            async with asyncio.timeout_at(deadline_s):
                return await self._policy.call(
                    attempt, deadline_s=deadline_s, on_retry=self.observer.retry
                )
        except TimeoutError:
            raise DeadlineExceededError(
                f"no answer within {self._budget_ms(task)} ms"
            ) from None

    def _defers(self, error: TaskError) -> bool:
        """Whether a rate limit that outlasts the task hands it back instead."""
        return (
            error.error_type is ErrorType.RATE_LIMITED
            and error.retryable
            and self._settings.rate_limiting.on_long_wait == "release"
        )

    def failure(
        self,
        task_id: str | None,
        error: TaskError,
        *,
        source: str,
        model: str | None = None,
        attempts: int = 0,
        received_s: float | None = None,
    ) -> TaskResult:
        """Builds the failed result of a task, for the executor and the worker."""
        partial = error.partial if isinstance(error, PartialAnswerError) else None
        if partial is not None and self._answer_problem(partial) is not None:
            # What arrived of a cut-off answer goes out only if it passes the
            # checks a whole answer must.
            partial = None
        return TaskResult(
            taskId=task_id,
            success=False,
            response=partial,
            error=ResultError(
                type=error.error_type, message=error.message, retryable=error.retryable
            ),
            metadata=ResultMetadata(
                model=model,
                timestamp=utc_timestamp(),
                attempts=attempts,
                durationMs=_elapsed_ms(received_s),
                requestId=getattr(error, "request_id", None),
                node=self._settings.node_id,
                source=source,
                traceparent=current_traceparent(),
            ),
        )

    def _budget_ms(self, task: Task) -> int:
        limit_ms = self._settings.max_execution_time_ms
        return min(limit_ms, task.timeoutMs) if task.timeoutMs else limit_ms

    async def _attempt(
        self, task: Task, model: str, deadline_s: float, tries: _Tries
    ) -> Answer:
        """One API call inside the limiter: reserve, call, settle what was used."""
        await self._rotate_key()
        call = tries.call
        reservation = await self.limiter.acquire(call, deadline_s=deadline_s)
        if reservation.waited_s > 0.001:
            self.observer.limiter_waited(reservation.waited_s, reservation.waited_for)
        # Counted once the limiter lets the call go: a refusal is no attempt.
        tries.count += 1
        sent_s = time.monotonic()
        try:
            message, headers = await self._create(task, model, deadline_s)
        except TaskError as exc:
            self.observer.api_call(
                ApiCall.failed(
                    task.id, model, tries.count, time.monotonic() - sent_s, exc
                )
            )
            if isinstance(exc, ApiCallError):
                await self.limiter.settle(
                    reservation, call, input_tokens=0, output_tokens=0
                )
                await self._after_refusal(exc)
            raise
        except asyncio.CancelledError:
            self.observer.api_call(
                ApiCall(
                    task.id,
                    model,
                    tries.count,
                    time.monotonic() - sent_s,
                    status=None,
                    error_type=str(ErrorType.CANCELLED),
                )
            )
            raise
        self.observer.api_call(
            ApiCall(
                task.id,
                model,
                tries.count,
                time.monotonic() - sent_s,
                status=200,
                request_id=headers.get("request-id"),
                input_tokens=message.input_tokens,
                output_tokens=message.output_tokens,
                response_model=message.model,
            )
        )
        await self.limiter.settle(
            reservation,
            call,
            input_tokens=message.input_tokens,
            output_tokens=message.output_tokens,
        )
        await self.limiter.observe(headers)
        return message

    async def _rotate_key(self) -> None:
        """Takes up a key rotated in its file; calls under way keep the old one."""
        key = self._key.changed() if self._key is not None else None
        if key is None:
            return
        logs.redact(key)
        # A copy shares the connection pool; only the key differs.
        self._client.replace((await self._client.get()).with_options(api_key=key))
        self.limiter.rekey(key)
        log.warning("api_key.rotated", extra={"limits": "now counted for the new key"})

    async def _after_refusal(self, error: ApiCallError) -> None:
        """A 429 pauses the whole key: every process using it waits it out."""
        if error.status_code != 429:
            return
        if error.retryable:
            await self.limiter.pause(error.retry_after_s or 1.0, "the API said 429")
        else:
            await self.limiter.pause(
                error.retry_after_s or DEFAULT_PAUSE_S, f"spend limit: {error.message}"
            )

    async def _create(
        self, task: Task, model: str, deadline_s: float
    ) -> tuple[Answer, Mapping[str, str]]:
        client = await self._client.get()
        import anthropic

        params = self._params(task, model, deadline_s)
        try:
            if params["max_tokens"] > STREAMING_MIN_TOKENS:
                return await self._stream(client, params)
            raw = await client.messages.with_raw_response.create(**params)
            body = await raw.read()
            return Answer.from_body(body, raw.headers.get("request-id")), raw.headers
        except anthropic.APIError as exc:
            raise api_call_error(exc) from None

    async def _stream(
        self, client: anthropic.AsyncAnthropic, params: dict[str, Any]
    ) -> tuple[Answer, Mapping[str, str]]:
        """A long answer, streamed and assembled into the same message.

        An error before any text is raised as it is, so the retry policy treats
        it like its status; after text has come, the answer is cut off and is
        reported with what arrived, not retried (it was already paid for).
        """
        import anthropic

        parts: list[str] = []
        try:
            async with client.messages.stream(**params) as stream:
                async for text in stream.text_stream:
                    parts.append(text)
                message = await stream.get_final_message()
                return Answer.from_message(message), stream.response.headers
        except anthropic.APIError as exc:
            if not parts:
                raise
            raise PartialAnswerError(api_call_error(exc), "".join(parts)) from None

    def _params(self, task: Task, model: str, deadline_s: float) -> dict[str, Any]:
        # The SDK no longer names `temperature`; it goes in the body as given,
        # and a model that refuses it answers 400 (`invalid_request`).
        extra = (
            {"temperature": task.temperature} if task.temperature is not None else None
        )
        return {
            "model": model,
            "max_tokens": self._max_tokens(task),
            "messages": cast("list[MessageParam]", task.turns()),
            "system": task.system if task.system is not None else _omit(),
            "stop_sequences": task.stop_sequences or _omit(),
            "metadata": _metadata(task),
            "extra_body": extra,
            "timeout": max(0.001, deadline_s - time.monotonic()),
        }

    def _max_tokens(self, task: Task) -> int:
        return task.max_tokens or self._settings.default_max_tokens

    def _success(
        self,
        task: Task,
        message: Answer,
        text: str,
        source: str,
        attempts: int,
        received_s: float,
    ) -> TaskResult:
        return TaskResult(
            taskId=task.id,
            success=True,
            response=text,
            metadata=ResultMetadata(
                model=message.model,
                usage=Usage(
                    input_tokens=message.input_tokens,
                    output_tokens=message.output_tokens,
                ),
                timestamp=utc_timestamp(),
                attempts=attempts,
                durationMs=_elapsed_ms(received_s),
                stopReason=message.stop_reason,
                requestId=message.request_id,
                node=self._settings.node_id,
                source=source,
                traceparent=current_traceparent(),
            ),
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """What the node keeps of a message.

    Read from the body with orjson rather than through the SDK's models: the
    SDK's `parse` builds a model of every block, and cost as much CPU as all
    the node's own handling of the answer.
    """

    text: str
    model: str | None
    stop_reason: str | None
    input_tokens: int
    output_tokens: int
    request_id: str | None = None

    @classmethod
    def from_body(cls, body: bytes, request_id: str | None) -> Answer:
        """The answer in a Messages API response body.

        Raises:
            TaskError: the body is not a message (`api_error`).
        """
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            # orjson refuses a lone surrogate escape, which the API's JSON may
            # carry; the standard parser keeps it, and the UTF-8 check of the
            # answer then reports it.
            try:
                data = json.loads(body)
            except ValueError:
                data = None
        try:
            usage = data.get("usage") or {}
            return cls(
                text="".join(
                    block["text"]
                    for block in data.get("content") or ()
                    if block.get("type") == "text"
                ),
                model=data.get("model"),
                stop_reason=data.get("stop_reason"),
                input_tokens=int(usage.get("input_tokens") or 0),
                output_tokens=int(usage.get("output_tokens") or 0),
                request_id=request_id,
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            raise TaskError(
                "unexpected answer from the API: not a message", ErrorType.API_ERROR
            ) from None

    @classmethod
    def from_message(cls, message: Message) -> Answer:
        """The answer of a message the SDK assembled (a streamed answer)."""
        return cls(
            text="".join(b.text for b in message.content if b.type == "text"),
            model=message.model,
            stop_reason=message.stop_reason,
            input_tokens=message.usage.input_tokens,
            output_tokens=message.usage.output_tokens,
            request_id=getattr(message, "_request_id", None),
        )


@dataclass(slots=True)
class _Tries:
    """What one task's calls may use, and how many it has made so far."""

    call: Call
    count: int = 0


def _check_not_expired(task: Task) -> None:
    if task.expiresAt is not None and task.expiresAt <= dt.datetime.now(dt.UTC):
        raise TaskError("expiresAt passed before the task started", ErrorType.EXPIRED)


def _input_estimate(task: Task) -> int:
    """An estimate of the input tokens, about 4 bytes each as English runs.

    Only in-flight reservations use it; each call is settled to the API's own
    count when it answers. Text that tokenizes denser (code, CJK) is under-
    estimated, so a budget can be overrun by that error for the calls in
    flight at the moment it fills; counting with the API's token-counting
    endpoint before each call would close that gap at one request per task.
    """
    return math.ceil(task.text_bytes() / 4) + 8


def _omit() -> Any:
    from anthropic import omit

    return omit


def _metadata(task: Task) -> MetadataParam | Any:
    if task.metadata is None or task.metadata.user_id is None:
        return _omit()
    return {"user_id": task.metadata.user_id}


def _elapsed_ms(since_s: float | None) -> int:
    return 0 if since_s is None else round((time.monotonic() - since_s) * 1000)
