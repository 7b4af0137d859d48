"""Traces and metrics through the standard OpenTelemetry SDK and exporters.

Configured by the standard variables only (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_EXPORTER`, `OTEL_METRICS_EXPORTER`,
`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL` and the rest that
the SDK and its exporters read themselves). With none of them set, telemetry is
off: the node uses the API's no-op tracer and meter, imports no exporter and
starts no thread.

Exports run on the SDK's background threads, so a slow or absent collector
never blocks the node. What they hold is bounded: spans beyond the queue are
dropped and counted here, and the first failure is logged once, as is the
recovery, instead of once per batch as the exporters would.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__
from .errors import ConfigError

log = logging.getLogger(__name__)

SERVICE_NAME = "mesh-node"
# Spans waiting for export at most; past it new spans are dropped and counted.
MAX_QUEUED_SPANS = 2048
# The same while exports fail. A span takes about 5.6 kB until it is sent, so
# a full queue held for a dead collector would cost a node 11 MB for spans
# that are most likely lost anyway; when an export succeeds again, the full
# queue is back.
MAX_QUEUED_SPANS_FAILING = 128
# Spans per export; the OTLP default of 512 holds more in memory per retry.
DEFAULT_EXPORT_BATCH = 128
# An export still running after this counts as failing: the OTLP exporter
# retries a refused connection for up to ten seconds before it says so, and
# the queue would fill meanwhile.
STALLED_EXPORT_S = 0.5
# An export still running after this is reported as failed: longer than a
# slow collector takes, so that a working one is not reported.
HUNG_EXPORT_S = 2.0
# How long shutdown may spend flushing, so that a dead collector cannot hold
# up a node that was asked to stop; once an export fails or hangs, the spans
# are lost anyway and the node waits only a moment more.
FLUSH_TIMEOUT_S = 5.0
FLUSH_TIMEOUT_FAILING_S = 0.5

_PROPAGATOR = TraceContextTextMapPropagator()

Exporter = Literal["otlp", "console", "none"]


@dataclass
class ExportCounts:
    """What the exporters lost, for logs and the heartbeat. Thread-safe."""

    spans_dropped: int = 0
    spans_failed: int = 0
    metric_exports_failed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, count: int) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + count)


class Telemetry:
    """The node's tracer and meter, and the providers behind them when on.

    Args:
        tracer_provider: the SDK provider, or None when traces are off.
        meter_provider: the SDK provider, or None when metrics are off.
        record_content: whether spans may carry prompts and answers.
        trace_context: `parent` makes a task's span a child of the producer's;
            `link` starts a new trace that links to it.
        counts: shared with the export wrappers.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        record_content: bool = False,
        trace_context: Literal["parent", "link"] = "parent",
        counts: ExportCounts | None = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._exporters: list[_WatchedSpanExporter | _WatchedMetricExporter] = []
        self.record_content = record_content
        self.trace_context = trace_context
        self.counts = counts or ExportCounts()
        self.tracer: Tracer = (
            tracer_provider.get_tracer("mesh_node", __version__)
            if tracer_provider is not None
            else trace.NoOpTracer()
        )
        self.meter: metrics.Meter = (
            meter_provider.get_meter("mesh_node", __version__)
            if meter_provider is not None
            else metrics.NoOpMeter("mesh_node")
        )

    @property
    def tracing(self) -> bool:
        """True when spans are recorded and exported."""
        return self._tracer_provider is not None

    def watch(self, *exporters: _WatchedSpanExporter | _WatchedMetricExporter) -> None:
        """Tells shutdown which exporters to ask whether they are failing."""
        self._exporters.extend(exporters)

    def sdk_option(self) -> Any:
        """The `open_telemetry` option of the SDK client.

        The SDK's own call span is the API call's span, a child of the task's.
        The option is given in full so that the SDK's environment variables
        cannot turn content recording on behind the operator's back, and the
        trace context is not propagated to the API, which has no use for it.
        """
        if self._tracer_provider is None:
            return False
        return {
            "tracer_provider": self._tracer_provider,
            "propagation": False,
            "traces": {
                "enabled": True,
                "content_mode": "content" if self.record_content else "metadata_only",
            },
        }

    def start_task_span(
        self,
        name: str,
        *,
        traceparent: str | None,
        attributes: Mapping[str, Any],
        start_time_ns: int,
    ) -> trace.Span:
        """Starts a task's `process` span, tied to the producer's trace."""
        producer = _producer_context(traceparent)
        if producer is None:
            return self.tracer.start_span(
                name,
                context=Context(),
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                start_time=start_time_ns,
            )
        if self.trace_context == "link":
            link = Link(trace.get_current_span(producer).get_span_context())
            return self.tracer.start_span(
                name,
                context=Context(),
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                links=[link],
                start_time=start_time_ns,
            )
        return self.tracer.start_span(
            name,
            context=producer,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            start_time=start_time_ns,
        )

    def shutdown(self) -> None:
        """Flushes what is queued, within `FLUSH_TIMEOUT_S`, then stops exporting."""
        providers = [p for p in (self._tracer_provider, self._meter_provider) if p]
        if not providers:
            return

        def flush() -> None:
            for provider in providers:
                provider.shutdown()

        # On a thread of its own: the SDK's shutdown waits on its exporter,
        # which waits on the collector, for longer than a stopping node may.
        unsent = sum(
            e.queued for e in self._exporters if isinstance(e, _WatchedSpanExporter)
        )
        flusher = threading.Thread(target=flush, name="telemetry-flush", daemon=True)
        flusher.start()
        # Waits for the flush while the exporters keep up; one that fails or
        # hangs (even in the flush itself) ends the wait at once.
        deadline_s = time.monotonic() + FLUSH_TIMEOUT_S
        timeout_s = FLUSH_TIMEOUT_S
        while flusher.is_alive() and time.monotonic() < deadline_s:
            if any(exporter.failing() for exporter in self._exporters):
                timeout_s = FLUSH_TIMEOUT_FAILING_S
                flusher.join(FLUSH_TIMEOUT_FAILING_S)
                break
            flusher.join(0.05)
        counts = self.counts
        fields = {
            "spans_dropped": counts.spans_dropped,
            "spans_failed": counts.spans_failed,
            "metric_exports_failed": counts.metric_exports_failed,
        }
        if flusher.is_alive():
            log.warning(
                "telemetry.flush_incomplete",
                extra={"timeout_s": timeout_s, "spans_unsent": unsent, **fields},
            )
        elif any(fields.values()):
            log.warning("telemetry.lost", extra=fields)


def current_traceparent() -> str | None:
    """The W3C `traceparent` of the current span, or None when it has none."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    flags = int(context.trace_flags)
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"


def _producer_context(traceparent: str | None) -> Context | None:
    if not traceparent:
        return None
    context = _PROPAGATOR.extract({"traceparent": traceparent})
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def from_environment(
    environ: Mapping[str, str],
    *,
    node_id: str,
    record_content: bool = False,
    trace_context: Literal["parent", "link"] = "parent",
) -> Telemetry:
    """Builds the node's telemetry from the standard `OTEL_*` variables.

    Traces and metrics each go to the exporter that `OTEL_TRACES_EXPORTER` and
    `OTEL_METRICS_EXPORTER` name; when a variable is unset, to OTLP if an
    OTLP endpoint is set, else nowhere. `OTEL_SDK_DISABLED=true` turns both off.

    Raises:
        ConfigError: an exporter or protocol this node cannot provide.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Telemetry(record_content=record_content, trace_context=trace_context)
    traces = _exporter_choice(environ, "TRACES")
    meters = _exporter_choice(environ, "METRICS")
    if traces == "none" and meters == "none":
        return Telemetry(record_content=record_content, trace_context=trace_context)
    for signal, chosen in (("TRACES", traces), ("METRICS", meters)):
        if chosen == "otlp":
            _check_endpoint(environ, signal)
    counts = ExportCounts()
    resource = _resource(node_id)
    watched: list[_WatchedSpanExporter | _WatchedMetricExporter] = []
    tracer_provider = meter_provider = None
    try:
        if traces != "none":
            tracer_provider = _tracer_provider(
                traces, environ, resource, counts, watched
            )
        if meters != "none":
            meter_provider = _meter_provider(meters, environ, resource, counts, watched)
    except ValueError as exc:
        # The SDK refuses some values of its own variables (a delay of 0,
        # say) only when it is built; that is a configuration error too.
        raise ConfigError(
            f"configuration error: OpenTelemetry settings: {exc}"
        ) from None
    _quiet_exporter_logs()
    telemetry = Telemetry(
        tracer_provider,
        meter_provider,
        record_content=record_content,
        trace_context=trace_context,
        counts=counts,
    )
    telemetry.watch(*watched)
    return telemetry


def _exporter_choice(environ: Mapping[str, str], signal: str) -> Exporter:
    name = f"OTEL_{signal}_EXPORTER"
    chosen = environ.get(name, "").strip().lower()
    if not chosen:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
            f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
        )
        return "otlp" if endpoint else "none"
    if chosen not in ("otlp", "console", "none"):
        raise ConfigError(
            f"configuration error: {name}: {chosen!r} is not supported; use otlp, "
            "console or none"
        )
    return chosen  # type: ignore[return-value]


def _check_endpoint(environ: Mapping[str, str], signal: str) -> None:
    """Refuses at start what the exporter would only fail on at every export."""
    for name in (
        f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ):
        endpoint = environ.get(name, "").strip()
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"configuration error: {name}: {endpoint!r} must start with "
                "http:// or https://"
            )
    for name in (
        f"OTEL_EXPORTER_OTLP_{signal}_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
    ):
        path = environ.get(name, "").strip()
        if path and not os.path.isfile(path):
            raise ConfigError(f"configuration error: {name}: no file at {path}")


def _protocol(environ: Mapping[str, str], signal: str) -> str:
    name = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    if not environ.get(name):
        name = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = environ.get(name, "").strip() or "http/protobuf"
    if protocol == "http/protobuf":
        return protocol
    if protocol == "grpc":
        try:
            import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"configuration error: {name}: grpc needs the "
                "opentelemetry-exporter-otlp-proto-grpc package, which this "
                "installation lacks; use http/protobuf"
            ) from None
        return protocol
    raise ConfigError(
        f"configuration error: {name}: {protocol!r} is not supported; use "
        "http/protobuf or grpc"
    )


def _resource(node_id: str) -> Resource:
    # What the operator set (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME) wins
    # over the node's own defaults; the SDK's placeholders do not.
    configured = OTELResourceDetector().detect().attributes
    return Resource.create(
        {
            "service.name": SERVICE_NAME,
            "service.instance.id": node_id,
            "service.version": __version__,
            **configured,
        }
    )


def _tracer_provider(
    exporter_name: Exporter,
    environ: Mapping[str, str],
    resource: Resource,
    counts: ExportCounts,
    watched: list[_WatchedSpanExporter | _WatchedMetricExporter],
) -> TracerProvider:
    exporter: SpanExporter
    if exporter_name == "console":
        # stdout carries results only, and stderr one JSON object a line.
        exporter = ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    elif _protocol(environ, "TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        exporter = GrpcSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter(**_http_transport(environ, "TRACES"))
    queue = _bsp_number(environ, "OTEL_BSP_MAX_QUEUE_SIZE", MAX_QUEUED_SPANS, 1 << 20)
    spans = _WatchedSpanExporter(exporter, counts, queue)
    watched.append(spans)
    batch = BatchSpanProcessor(
        spans,
        max_queue_size=queue,
        max_export_batch_size=_bsp_number(
            environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", DEFAULT_EXPORT_BATCH, queue
        ),
    )
    # The sampler OTEL_TRACES_SAMPLER names, which a provider reads for itself.
    configured = TracerProvider(shutdown_on_exit=False).sampler
    # Shut down by `Telemetry.shutdown`, within its bound, not at exit.
    provider = TracerProvider(
        resource=resource,
        sampler=_Shedding(configured, spans, counts),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(_BoundedSpanProcessor(batch, spans, counts))
    return provider


def _http_transport(environ: Mapping[str, str], signal: str) -> dict[str, Any]:
    """The OTLP/HTTP exporter's transport: urllib3 when it can be had.

    The exporter's default transport imports `requests`, which loads every CA
    certificate of `certifi` into a TLS context as it is imported: 4.5 MB of
    resident memory on every node, collector or not. urllib3 (which `requests`
    itself runs on) reads the same TLS settings and loads certificates only
    for an `https` endpoint. The transport is chosen through the exporter's
    underscored `_transport` argument; a release without it gets `{}`, the
    default transport, and works as before at the old cost.
    """
    try:
        from opentelemetry.exporter.http.transport._urllib3 import (
            Urllib3HTTPTransport,
        )
    except ImportError:
        return {}

    def pick(name: str) -> str | None:
        return environ.get(f"OTEL_EXPORTER_OTLP_{signal}_{name}") or environ.get(
            f"OTEL_EXPORTER_OTLP_{name}"
        )

    verify: bool | str = pick("CERTIFICATE") or True
    key, certificate = pick("CLIENT_KEY"), pick("CLIENT_CERTIFICATE")
    cert = (certificate, key) if certificate and key else certificate
    return {"_transport": Urllib3HTTPTransport(verify=verify, cert=cert)}


def _bsp_number(environ: Mapping[str, str], name: str, default: int, high: int) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return min(default, high)
    if not text.isdigit() or not 1 <= int(text) <= high:
        raise ConfigError(
            f"configuration error: {name}: must be a whole number from 1 to {high}"
        )
    return int(text)


def _meter_provider(
    exporter_name: Exporter,
    environ: Mapping[str, str],
    resource: Resource,
    counts: ExportCounts,
    watched: list[_WatchedSpanExporter | _WatchedMetricExporter],
) -> MeterProvider:
    exporter: MetricExporter
    if exporter_name == "console":
        exporter = ConsoleMetricExporter(
            out=sys.stderr,
            formatter=lambda metrics: metrics.to_json(indent=None) + "\n",
        )
    elif _protocol(environ, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        exporter = GrpcMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter,
        )

        exporter = OTLPMetricExporter(**_http_transport(environ, "METRICS"))
    metric_exporter = _WatchedMetricExporter(exporter, counts)
    watched.append(metric_exporter)
    reader = PeriodicExportingMetricReader(metric_exporter)
    return MeterProvider(
        resource=resource, metric_readers=[reader], shutdown_on_exit=False
    )


def _quiet_exporter_logs() -> None:
    # The exporters log every failed batch and the batch processor every
    # dropped span; the wrappers below say it once instead.
    logging.getLogger("opentelemetry.exporter").setLevel(logging.CRITICAL)
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)


class _FailureNotice:
    """Logs the first failure of a run of failed exports, and the recovery."""

    def __init__(self, signal: str) -> None:
        self._signal = signal
        self._failing = False
        # Reported from the exporter's thread and, for a hung export, from
        # whichever thread notices it: one line per run of failures.
        self._lock = threading.Lock()

    @property
    def failing(self) -> bool:
        """True from a failed export until the next one succeeds."""
        return self._failing

    def report(self, ok: bool, lost: int) -> None:
        with self._lock:
            changed = ok == self._failing
            self._failing = not ok
        if changed and not ok:
            log.warning(
                "telemetry.export_failed",
                extra={"signal": self._signal, "lost": lost},
            )
        elif changed:
            log.info("telemetry.export_recovered", extra={"signal": self._signal})


class _WatchedSpanExporter(SpanExporter):
    """Counts the spans handed to the exporter, and the ones it failed to send."""

    def __init__(self, inner: SpanExporter, counts: ExportCounts, queue: int) -> None:
        self._inner = inner
        self._counts = counts
        self._queue = queue
        self._notice = _FailureNotice("traces")
        self._lock = threading.Lock()
        self.queued = 0
        self._export_started_s: float | None = None
        self._exporting = 0

    def failing(self) -> bool:
        """Exports fail, or the one under way has hung."""
        started_s = self._export_started_s
        stalled = started_s is not None and (
            time.monotonic() - started_s > STALLED_EXPORT_S
        )
        if started_s is not None and time.monotonic() - started_s > HUNG_EXPORT_S:
            # Said now rather than when the exporter gives up (some ten
            # seconds of retries against a refused connection): a node that
            # stops meanwhile would otherwise never say that exports failed.
            self._notice.report(False, self._exporting)
        return stalled or self._notice.failing

    def recovered(self) -> bool:
        """Whether an export succeeded since the last failure was reported."""
        return not self._notice.failing

    def _bound(self) -> int:
        if self.failing():
            return min(MAX_QUEUED_SPANS_FAILING, self._queue)
        return self._queue

    def full(self) -> bool:
        """Whether the queue has no room left, for the sampler."""
        return self.queued >= self._bound()

    def enqueued(self) -> bool:
        """Takes one place in the queue, or says there is none."""
        bound = self._bound()
        with self._lock:
            if self.queued >= bound:
                return False
            self.queued += 1
            return True

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.queued = max(0, self.queued - len(spans))
        self._exporting = len(spans)
        self._export_started_s = time.monotonic()
        try:
            result = self._inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        finally:
            self._export_started_s = None
        ok = result is SpanExportResult.SUCCESS
        if not ok:
            self._counts.add("spans_failed", len(spans))
        self._notice.report(ok, len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))


class _Shedding(Sampler):
    """Records no new span while the export queue is full.

    Dropping spans only once they end would still build each one (about
    5.6 kB of attributes and events) and churn the heap; a span that is never
    recorded costs next to nothing, and its children are not recorded either.
    """

    def __init__(
        self, inner: Sampler, exporter: _WatchedSpanExporter, counts: ExportCounts
    ) -> None:
        self._inner = inner
        self._exporter = exporter
        self._counts = counts

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if self._exporter.full():
            self._counts.add("spans_dropped", 1)
            return SamplingResult(Decision.DROP)
        return self._inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"Shedding({self._inner.get_description()})"


class _BoundedSpanProcessor(SpanProcessor):
    """Drops, counts and reports once the spans that would overflow the queue."""

    def __init__(
        self, inner: SpanProcessor, exporter: _WatchedSpanExporter, counts: ExportCounts
    ) -> None:
        self._inner = inner
        self._exporter = exporter
        self._counts = counts
        self._reported = False

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self._exporter.enqueued():
            self._inner.on_end(span)
            if self._reported and self._exporter.recovered():
                # Said once per outage: the next one is reported again.
                self._reported = False
            return
        self._counts.add("spans_dropped", 1)
        if not self._reported:
            self._reported = True
            log.warning(
                "telemetry.spans_dropped", extra={"reason": "export queue full"}
            )

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))


class _WatchedMetricExporter(MetricExporter):
    """Counts the metric exports that failed."""

    def __init__(self, inner: MetricExporter, counts: ExportCounts) -> None:
        # The reader asks the exporter for these; they are the inner one's.
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._counts = counts
        self._notice = _FailureNotice("metrics")

    def failing(self) -> bool:
        """The last export failed."""
        return self._notice.failing

    def export(
        self,
        metrics_data: MetricsData,
        timeout_millis: float = 10_000,
        **kwargs: Any,
    ) -> MetricExportResult:
        try:
            result = self._inner.export(metrics_data, timeout_millis, **kwargs)
        except Exception:
            result = MetricExportResult.FAILURE
        ok = result is MetricExportResult.SUCCESS
        if not ok:
            self._counts.add("metric_exports_failed", 1)
        self._notice.report(ok, 1)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)
