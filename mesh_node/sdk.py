"""The Anthropic SDK client: which transport it uses, and built while the node starts.

Importing the SDK costs about 1.5 s of CPU on a small machine (some 3,800
modules, most of them models of endpoints the node never calls), more than the
whole rest of start-up. `PendingClient` imports and builds it in a thread, so
the node connects to Redis, joins its group and starts reading meanwhile; only
the first API call waits for it.

The transport is the SDK's aiohttp one, the cheapest it offers: measured per
`messages.create`, a millisecond or so of CPU less than its default httpx
transport. Its pool is sized to the node's concurrency, so that every task in
flight has a connection and none is opened and closed per call. Through an
egress proxy the client keeps httpx, whose proxy pool `egress` can point at a
unix socket.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import anthropic

    from .egress import EgressProxy

TRANSPORT_AIOHTTP = "aiohttp"
TRANSPORT_HTTPX = "httpx"


def transport_name(egress: EgressProxy | None) -> str:
    """The HTTP transport a client built with `build` uses."""
    return TRANSPORT_HTTPX if egress is not None else TRANSPORT_AIOHTTP


def build(
    *,
    api_key: str,
    base_url: str | None,
    concurrency: int,
    open_telemetry: Any,
    egress: EgressProxy | None,
) -> anthropic.AsyncAnthropic:
    """The SDK client the executor calls, with the SDK's retries off.

    Safe to run in a thread: neither transport opens a connection or binds
    to an event loop before its first request.
    """
    import anthropic
    import httpx2

    if egress is not None:
        http_client: Any = egress.http_client()
    else:
        # One connection per task in flight, all of them kept alive between
        # calls; a few spare for a rotated key's copy of the client, which
        # shares the pool.
        limits = httpx2.Limits(
            max_connections=concurrency + 4,
            max_keepalive_connections=concurrency + 4,
            keepalive_expiry=anthropic.DEFAULT_CONNECTION_LIMITS.keepalive_expiry,
        )
        http_client = anthropic.DefaultAioHttpClient(limits=limits)
    return anthropic.AsyncAnthropic(
        api_key=api_key,
        base_url=base_url,
        max_retries=0,
        open_telemetry=open_telemetry,
        http_client=http_client,
    )


class PendingClient:
    """An SDK client being built in a thread; `get` waits for it once.

    Args:
        build: makes the client; runs off the event loop.
    """

    def __init__(self, build: Callable[[], anthropic.AsyncAnthropic]) -> None:
        self._future = asyncio.ensure_future(asyncio.to_thread(build))
        self._future.add_done_callback(_freeze)
        self._client: anthropic.AsyncAnthropic | None = None

    async def get(self) -> anthropic.AsyncAnthropic:
        """The client, once built.

        Raises:
            Exception: whatever building it raised, on every call.
        """
        if self._client is None:
            self._client = await asyncio.shield(self._future)
        return self._client

    def replace(self, client: anthropic.AsyncAnthropic) -> None:
        """Uses another client from now on (a rotated key's copy)."""
        self._client = client

    async def close(self) -> None:
        """Closes the client, waiting for it if it is still being built."""
        try:
            client = await self.get()
        except Exception:
            # It was never built, so there is nothing to close; the failure
            # was reported where the client was needed.
            return
        await client.close()


def _freeze(_built: object) -> None:
    """Moves everything alive once the SDK is loaded out of the collector's sight.

    Those some 200,000 objects (modules, classes, the SDK's models) live as
    long as the process, yet every full collection walked them all: 100 ms
    here, a stall of every task in flight each time. Frozen, a full
    collection only walks what the node made since.
    """
    gc.freeze()
