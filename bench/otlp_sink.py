"""A loopback OTLP/HTTP receiver that counts what a node exports, in its own process.

It answers `POST /v1/traces` and `POST /v1/metrics` with 200 like a collector,
decodes each trace export only far enough to count its spans, and serves the
counts as JSON on `GET /counts`. `tests/otlp.py` keeps every span as Python
objects, which suits a test of a few tasks; here it would spend the CPU that
the measured node needs, on the same two cores, and grow with every task.

    python -m bench.otlp_sink --port 4318
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)


class Counts:
    """Requests, bytes and spans received so far."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.figures = dict.fromkeys(
            ("trace_requests", "metric_requests", "spans", "bytes"), 0
        )

    def add(self, path: str, body: bytes) -> None:
        """Counts one export."""
        spans = 0
        if path == "/v1/traces":
            request = ExportTraceServiceRequest.FromString(body)
            spans = sum(
                len(scope.spans)
                for resource in request.resource_spans
                for scope in resource.scope_spans
            )
        with self.lock:
            self.figures["bytes"] += len(body)
            self.figures["spans"] += spans
            kind = "trace_requests" if path == "/v1/traces" else "metric_requests"
            self.figures[kind] += 1

    def as_json(self) -> bytes:
        """The counts, as a JSON object."""
        with self.lock:
            return json.dumps(self.figures).encode()


def handler_for(counts: Counts) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `counts`."""

    class Handler(BaseHTTPRequestHandler):
        # Keep-alive, as a collector answers: a connection per export would
        # charge the node for a TCP handshake no real deployment makes.
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            counts.add(self.path, body)
            self._answer(b"", "application/x-protobuf")

        def do_GET(self) -> None:
            self._answer(counts.as_json(), "application/json")

        def _answer(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def main() -> None:
    """Serves on 127.0.0.1 until killed; says `otlp.listening` on stderr."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler_for(Counts()))
    line = {"event": "otlp.listening", "port": server.server_address[1]}
    print(json.dumps(line), file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
