"""The node's one way out: an HTTP proxy that allows CONNECT to the API hosts.

The proxy is `http://host:port` (a proxy on a network the node shares) or
`unix:///path` (a proxy's socket mounted into a container that has no
network at all). Every API call goes through it as a CONNECT tunnel, with TLS
end to end between the SDK and the API: the proxy sees host names, never
content or the key.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

PROBE_TIMEOUT_S = 5.0


class ProxyError(Exception):
    """The proxy could not be reached or did not speak HTTP."""


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """Where the proxy listens.

    Args:
        host: the proxy's host, for a TCP proxy.
        port: the proxy's port, for a TCP proxy.
        socket_path: the proxy's unix socket, instead of host and port.
    """

    host: str | None = None
    port: int | None = None
    socket_path: str | None = None

    @classmethod
    def parse(cls, url: str) -> EgressProxy:
        """Reads `http://host:port` or `unix:///path`.

        Raises:
            ConfigError: any other form.
        """
        parts = urlsplit(url)
        if parts.scheme == "unix" and parts.path:
            return cls(socket_path=parts.path)
        if parts.scheme == "http" and parts.hostname:
            try:
                port = parts.port or 3128
            except ValueError:
                port = None
            if port is not None:
                return cls(host=parts.hostname, port=port)
        raise ConfigError(
            f"configuration error: egressProxy: {url!r} is neither http://HOST:PORT "
            "nor unix:///PATH"
        )

    def __str__(self) -> str:
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        return f"http://{self.host}:{self.port}"

    def probe(self, host: str, port: int) -> int:
        """Asks the proxy for a tunnel to `host:port`; its HTTP status.

        Nothing goes through the tunnel: it is closed as soon as the proxy
        answers.

        Raises:
            ProxyError: the proxy cannot be reached or answered no HTTP.
        """
        request = (
            f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
        ).encode()
        try:
            with self._connect() as conn:
                conn.sendall(request)
                head = conn.recv(1024)
        except OSError as exc:
            raise ProxyError(exc.strerror or type(exc).__name__) from None
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise ProxyError(f"not an HTTP answer: {head[:40]!r}")
        return int(status_line[1])

    def _connect(self) -> socket.socket:
        if self.socket_path is not None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(PROBE_TIMEOUT_S)
            try:
                conn.connect(self.socket_path)
            except OSError:
                conn.close()
                raise
            return conn
        return socket.create_connection(
            (str(self.host), self.port or 0), PROBE_TIMEOUT_S
        )

    def http_client(self) -> Any:
        """The SDK's HTTP client with its usual limits, through the proxy."""
        import anthropic

        transport = self.transport(limits=anthropic.DEFAULT_CONNECTION_LIMITS)
        return anthropic.DefaultAsyncHttpxClient(transport=transport)

    def transport(self, **limits: Any) -> Any:
        """An `httpx2` transport that sends every request through the proxy."""
        import httpcore2
        import httpx2

        if self.socket_path is None:
            return httpx2.AsyncHTTPTransport(proxy=str(self), **limits)
        transport = httpx2.AsyncHTTPTransport(**limits)
        # httpx takes a proxy URL or a unix socket, not both, and its proxy
        # pool dials the proxy by TCP. A network backend that turns the dial
        # of the proxy's placeholder address into the socket, and refuses any
        # other, keeps the pool's CONNECT tunnels and TLS as they are.
        transport._pool = httpcore2.AsyncHTTPProxy(
            proxy_url=f"http://{_PLACEHOLDER[0]}:{_PLACEHOLDER[1]}/",
            ssl_context=httpx2.create_ssl_context(),
            network_backend=_unix_socket_backend(self.socket_path),
            **_pool_limits(limits),
        )
        return transport


# The proxy's address as the pool knows it; only the socket is ever dialled.
_PLACEHOLDER = ("egress-proxy.invalid", 3128)


def _unix_socket_backend(path: str) -> Any:
    import httpcore2

    class UnixSocketProxyBackend(httpcore2.AsyncNetworkBackend):
        """Dials the proxy's socket for its placeholder; nothing else."""

        def __init__(self) -> None:
            self._inner = httpcore2.AnyIOBackend()

        async def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
            local_address: str | None = None,
            socket_options: Any = None,
        ) -> Any:
            if (host, port) != _PLACEHOLDER:
                raise httpcore2.ConnectError(
                    f"no direct connection to {host}:{port}: the egress proxy is "
                    "the only way out"
                )
            return await self._inner.connect_unix_socket(path, timeout=timeout)

        async def connect_unix_socket(
            self,
            path: str,
            timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
            socket_options: Any = None,
        ) -> Any:
            raise httpcore2.ConnectError("no unix socket but the egress proxy's")

        async def sleep(self, seconds: float) -> None:
            await self._inner.sleep(seconds)

    return UnixSocketProxyBackend()


def _pool_limits(limits: dict[str, Any]) -> dict[str, Any]:
    given = limits.get("limits")
    if given is None:
        return {}
    return {
        "max_connections": given.max_connections,
        "max_keepalive_connections": given.max_keepalive_connections,
        "keepalive_expiry": given.keepalive_expiry,
    }
