"""A loopback OTLP/HTTP receiver that keeps what nodes export, decoded.

It plays the OpenTelemetry Collector's part for the tests: `POST /v1/traces`
and `POST /v1/metrics` with protobuf bodies, answered 200. Every raw body is
kept as well, so that a test can search the exported bytes.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from .support import wait_for


@dataclass(frozen=True)
class ExportedSpan:
    """One span as it arrived, with its resource's attributes."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int
    events: list[tuple[str, dict[str, Any]]]
    links: list[tuple[str, str]]


# The protobuf enum values of `Span.SpanKind`.
KIND_CLIENT, KIND_CONSUMER = 3, 5
# `Status.StatusCode`.
STATUS_ERROR = 2


def value_of(value: AnyValue) -> Any:
    """The Python value of an OTLP attribute value."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def attributes_of(attributes: Iterator[KeyValue] | Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in attributes}


@dataclass
class OtlpReceiver:
    """The receiver's server and what it has received."""

    server: ThreadingHTTPServer
    raw: list[bytes] = field(default_factory=list)
    spans: list[ExportedSpan] = field(default_factory=list)
    metrics: list[ExportMetricsServiceRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        """The base URL for `OTEL_EXPORTER_OTLP_ENDPOINT`."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def received(self, path: str, body: bytes) -> None:
        with self.lock:
            self.raw.append(body)
            if path == "/v1/traces":
                request = ExportTraceServiceRequest.FromString(body)
                self.spans.extend(_spans(request))
            elif path == "/v1/metrics":
                self.metrics.append(ExportMetricsServiceRequest.FromString(body))

    def spans_named(self, name: str) -> list[ExportedSpan]:
        with self.lock:
            return [span for span in self.spans if span.name == name]

    def wait_for_spans(
        self, name: str, count: int, timeout_s: float = 30
    ) -> list[ExportedSpan]:
        """Waits until at least `count` spans of this name have arrived."""
        wait_for(
            lambda: len(self.spans_named(name)) >= count,
            timeout_s=timeout_s,
            what=f"{count} exported {name!r} spans",
        )
        return self.spans_named(name)

    def data_points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """Every data point of a metric received so far, with its attributes."""
        points = []
        with self.lock:
            requests = list(self.metrics)
        for request in requests:
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    for item in scope.metrics:
                        if item.name != metric:
                            continue
                        kind = item.WhichOneof("data")
                        for point in getattr(item, kind).data_points:
                            points.append((attributes_of(point.attributes), point))
        return points

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _spans(request: ExportTraceServiceRequest) -> Iterator[ExportedSpan]:
    for resource_spans in request.resource_spans:
        resource = attributes_of(resource_spans.resource.attributes)
        for scope in resource_spans.scope_spans:
            for span in scope.spans:
                yield ExportedSpan(
                    name=span.name,
                    kind=span.kind,
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    attributes=attributes_of(span.attributes),
                    resource=resource,
                    status_code=span.status.code,
                    events=[(e.name, attributes_of(e.attributes)) for e in span.events],
                    links=[
                        (link.trace_id.hex(), link.span_id.hex()) for link in span.links
                    ],
                )


def start_receiver() -> OtlpReceiver:
    """Starts a receiver on a free loopback port, serving on a thread."""
    receiver: OtlpReceiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            receiver.received(self.path, body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = OtlpReceiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return receiver
