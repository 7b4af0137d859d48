"""What the node records about each task: its span, its metrics, its audit trail.

One `Observer` per node. The worker opens a task's `process` span (the
OpenTelemetry messaging conventions for a consumer) and reports how the task
ended; the executor reports limiter waits, retries and each API call, whose
own span the SDK makes as a child of the task's. Nothing here records a
prompt or an answer: the SDK's span carries content only when the operator
sets `recordContent`.

With telemetry off the tracer and meter are the API's no-op ones, so the
calls below cost a few attribute look-ups per task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Status, StatusCode

from .errors import ApiCallError, TaskError
from .logs import AUDIT_LOGGER
from .retrying import RetryDetails
from .tasks import TaskResult
from .telemetry import Telemetry

audit_log = logging.getLogger(AUDIT_LOGGER)

PROVIDER = {"gen_ai.provider.name": "anthropic", "gen_ai.operation.name": "chat"}
TASK_ID = "mesh.task.id"
OUTCOME = "mesh.task.outcome"
ERROR_TYPE = "error.type"

# Bucket bounds in seconds from the GenAI semantic conventions, which fit an
# API call's duration better than the SDK's default (built for milliseconds).
DURATION_BUCKETS_S = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


@dataclass
class StreamFigures:
    """The task stream's backlog as the node last read it (serve only)."""

    lag: int | None = None
    pending: int | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a node's tasks come from, as its spans name it.

    Args:
        name: the stream key, or `stdin` / the batch file.
        system: `redis` for the stream; None for lines, which are no
            messaging system.
        group: the consumer group, for the stream.
    """

    name: str
    system: str | None = None
    group: str | None = None

    def attributes(self) -> dict[str, str]:
        if self.system is None:
            return {"mesh.source": self.name}
        attributes = {
            "messaging.system": self.system,
            "messaging.destination.name": self.name,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
        }
        if self.group is not None:
            attributes["messaging.consumer.group.name"] = self.group
        return attributes


class Observer:
    """Spans, metrics and the audit record of every task and API call.

    Args:
        telemetry: the tracer and meter.
        destination: where tasks come from.
        node_id: this node, on every span.
    """

    def __init__(
        self,
        telemetry: Telemetry | None = None,
        destination: Destination | None = None,
        node_id: str = "",
    ) -> None:
        self.telemetry = telemetry or Telemetry()
        self._destination = destination or Destination("tasks")
        self._span_name = f"process {self._destination.name}"
        self._node = node_id
        self._base = {**self._destination.attributes(), "messaging.client.id": node_id}
        self._metric_base = self._destination.attributes()
        self.stream = StreamFigures()
        meter = self.telemetry.meter
        self._tasks = meter.create_counter(
            "mesh.tasks.finished",
            unit="{task}",
            description="Tasks that got a result, by outcome and error type.",
        )
        self._task_duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="From taking a task to its result.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Tokens used per API call, by type.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self._operation = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="Duration of one API call.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        self._limiter_wait = meter.create_histogram(
            "mesh.limiter.wait.duration",
            unit="s",
            description="Time a task waited for the rate limits or budgets.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        self._in_flight = meter.create_up_down_counter(
            "mesh.tasks.in_flight", unit="{task}", description="Tasks running now."
        )
        meter.create_observable_gauge(
            "mesh.stream.lag",
            callbacks=[self._observe_lag],
            unit="{message}",
            description="Entries of the task stream not yet read by the group.",
        )
        meter.create_observable_gauge(
            "mesh.stream.pending",
            callbacks=[self._observe_pending],
            unit="{message}",
            description="Entries read by the group and not yet acknowledged.",
        )

    @contextmanager
    def task(
        self,
        *,
        source: str,
        entry_id: str | None,
        task_id: str | None,
        traceparent: str | None,
        start_time_ns: int,
    ) -> Iterator[trace.Span]:
        """The `process` span of one task, current while the task runs."""
        if not self.telemetry.tracing:
            # Off means no span and no trace context at all: a producer's
            # `traceparent` would otherwise come back as this task's.
            self._in_flight.add(1, self._metric_base)
            try:
                yield trace.INVALID_SPAN
            finally:
                self._in_flight.add(-1, self._metric_base)
            return
        attributes: dict[str, Any] = {**self._base, "mesh.task.source": source}
        if entry_id is not None:
            attributes["messaging.message.id"] = entry_id
        if task_id is not None:
            attributes[TASK_ID] = task_id
        span = self.telemetry.start_task_span(
            self._span_name,
            traceparent=traceparent,
            attributes=attributes,
            start_time_ns=start_time_ns,
        )
        self._in_flight.add(1, self._metric_base)
        try:
            # Outcomes are set by the calls below; an exception's message
            # could carry data, so it never becomes the span's status.
            with trace.use_span(
                span,
                end_on_exit=True,
                record_exception=False,
                set_status_on_exception=False,
            ):
                yield span
        finally:
            self._in_flight.add(-1, self._metric_base)

    def finished(self, result: TaskResult) -> None:
        """Records how a task ended, on its span and in the metrics."""
        outcome = "succeeded" if result.success else "failed"
        attributes: dict[str, Any] = {**self._metric_base, OUTCOME: outcome}
        span = trace.get_current_span()
        span.set_attribute(OUTCOME, outcome)
        if result.error is not None:
            attributes[ERROR_TYPE] = str(result.error.type)
            span.set_attribute(ERROR_TYPE, str(result.error.type))
            span.set_status(Status(StatusCode.ERROR))
        self._tasks.add(1, attributes)
        self._task_duration.record(result.metadata.durationMs / 1000, attributes)

    def ended_without_result(self, outcome: str, reason: str | None = None) -> None:
        """A task this node let go without a result: skipped, deferred, released."""
        span = trace.get_current_span()
        span.set_attribute(OUTCOME, outcome)
        if reason is not None:
            span.add_event(f"task.{outcome}", {"reason": reason})

    def crashed(self, error: BaseException) -> None:
        """A fault in the node itself; the message stays out of the span."""
        span = trace.get_current_span()
        span.set_attribute(OUTCOME, "crashed")
        span.set_attribute(ERROR_TYPE, type(error).__qualname__)
        span.set_status(Status(StatusCode.ERROR))

    def limiter_waited(self, seconds: float, reason: str) -> None:
        """A wait for the rate limits or a budget, as an event and a metric."""
        trace.get_current_span().add_event(
            "limiter.wait", {"wait_ms": round(seconds * 1000), "reason": reason}
        )
        self._limiter_wait.record(seconds, {"reason": reason})

    def retry(self, details: RetryDetails) -> None:
        """A retry the policy scheduled, and why."""
        error = details.error
        event: dict[str, Any] = {
            "attempt": details.attempt,
            ERROR_TYPE: str(error.error_type),
            "wait_ms": round(details.wait_s * 1000),
        }
        if error.status_code is not None:
            event["http.response.status_code"] = error.status_code
        trace.get_current_span().add_event("retry", event)

    def api_call(self, call: ApiCall) -> None:
        """One API call: its audit record and its GenAI metrics."""
        attributes: dict[str, Any] = {**PROVIDER, "gen_ai.request.model": call.model}
        if call.response_model is not None:
            attributes["gen_ai.response.model"] = call.response_model
        if call.error_type is not None:
            attributes[ERROR_TYPE] = call.error_type
        self._operation.record(call.duration_s, attributes)
        if call.error_type is None:
            for kind, count in (
                ("input", call.input_tokens),
                ("output", call.output_tokens),
            ):
                self._tokens.record(count, {**attributes, "gen_ai.token.type": kind})
        audit_log.info("api.call", extra={**call.audit_fields(), "node": self._node})

    def _observe_lag(self, _options: CallbackOptions) -> list[Observation]:
        lag = self.stream.lag
        return [] if lag is None else [Observation(lag, self._metric_base)]

    def _observe_pending(self, _options: CallbackOptions) -> list[Observation]:
        pending = self.stream.pending
        return [] if pending is None else [Observation(pending, self._metric_base)]


@dataclass(frozen=True, slots=True)
class ApiCall:
    """What the audit trail keeps of one API call; never its content.

    Args:
        task_id: the task it served.
        model: the model asked for.
        attempt: 1 for the first call of a task, 2 for its first retry, ...
        duration_s: from sending the request to the answer or the error.
        status: the HTTP status, or None when no response came.
        request_id: the API's `request-id`, when it sent one.
        input_tokens: as the API counted them (0 on failure).
        output_tokens: as the API counted them (0 on failure).
        response_model: the model that answered.
        error_type: why the call failed, if it did (`cancelled` when the
            task's deadline or a stop cut it short).
    """

    task_id: str
    model: str
    attempt: int
    duration_s: float
    status: int | None
    request_id: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    response_model: str | None = None
    error_type: str | None = None

    @classmethod
    def failed(
        cls, task_id: str, model: str, attempt: int, duration_s: float, error: TaskError
    ) -> ApiCall:
        """The record of a call that raised `error`."""
        api_error = error if isinstance(error, ApiCallError) else None
        return cls(
            task_id,
            model,
            attempt,
            duration_s,
            status=api_error.status_code if api_error else None,
            request_id=api_error.request_id if api_error else None,
            error_type=str(error.error_type),
        )

    def audit_fields(self) -> Mapping[str, Any]:
        """The audit record's fields."""
        return {
            "task_id": self.task_id,
            "model": self.model,
            "status": self.status,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "duration_ms": round(self.duration_s * 1000),
            "request_id": self.request_id,
            "attempt": self.attempt,
            "error_type": self.error_type,
        }
