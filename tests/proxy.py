"""A CONNECT-only egress proxy of the tests' own, on a unix socket or loopback.

It plays the part Squid plays in a deployment: a CONNECT to an allowed
`host:port` gets `200` and a tunnel to wherever the test maps that name
(the simulator on loopback, say); anything else gets `403`. It never
resolves a name and never dials anything but the mapped loopback targets.
"""

from __future__ import annotations

import contextlib
import select
import socket
import socketserver
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

TUNNEL_IDLE_S = 30.0


@dataclass
class ProxyLog:
    """What went through the proxy."""

    requests: list[str] = field(default_factory=list)
    tunnelled: bytearray = field(default_factory=bytearray)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            head += chunk
        first = head.split(b"\r\n", 1)[0].decode(errors="replace")
        with self.server.log.lock:
            self.server.log.requests.append(first)
        parts = first.split()
        authority = parts[1] if len(parts) == 3 and parts[0] == "CONNECT" else ""
        if authority not in self.server.allowed:
            self.request.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        target = self.server.allowed[authority]
        if target is None:
            self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            return
        with socket.create_connection(target, timeout=5) as upstream:
            self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self._pipe(upstream)

    def _pipe(self, upstream: socket.socket) -> None:
        ends = [self.request, upstream]
        while True:
            ready, _, _ = select.select(ends, [], [], TUNNEL_IDLE_S)
            if not ready:
                return
            for end in ready:
                data = end.recv(65536)
                if not data:
                    return
                if end is self.request:
                    with self.server.log.lock:
                        self.server.log.tunnelled += data
                (upstream if end is self.request else self.request).sendall(data)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allowed: Mapping[str, tuple[str, int] | None]
    log: ProxyLog


@contextlib.contextmanager
def connect_proxy(
    path: Path, allowed: Mapping[str, tuple[str, int] | None]
) -> Iterator[ProxyLog]:
    """Serves the proxy on the unix socket `path` until the block ends.

    Args:
        path: where the socket goes.
        allowed: `host:port` a CONNECT may ask for, each with the loopback
            address the tunnel goes to, or None for a tunnel that closes at
            once (enough for `audit`'s probes).
    """
    server = _Server(str(path), _Handler)
    server.allowed = allowed
    server.log = ProxyLog()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.log
    finally:
        server.shutdown()
        server.server_close()
        path.unlink(missing_ok=True)
