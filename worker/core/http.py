"""Outgoing HTTP: the one way shipmon pools connections for the carrier and for webhooks.

Both speak httpx over aiohttp (httpx's own async transport is too slow for the poll rate this
product needs). They differ in limits and in how names resolve, never in what an attempt is:
one request, sent once, over a pool that belongs to one event loop.
"""

from __future__ import annotations

import ssl
from functools import lru_cache
from types import TracebackType
from typing import Self

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver
from httpx_aiohttp import AiohttpTransport

__all__ = ["PooledClient", "aiohttp_transport", "ssl_context"]


@lru_cache(maxsize=1)
def ssl_context() -> ssl.SSLContext:
    """The certificate-checking TLS context of every outgoing connection, made once."""
    # Loading the CA bundle takes tens of milliseconds; a client per task must not pay it.
    return httpx.create_ssl_context()


def aiohttp_transport(
    *,
    max_connections: int,
    keepalive_seconds: float = 15.0,
    limit_per_host: int = 0,
    resolver: AbstractResolver | None = None,
) -> AiohttpTransport:
    """An httpx transport over one aiohttp pool, which it makes on first use inside the loop.

    `keepalive_seconds` defaults to aiohttp's own; `limit_per_host` 0 means no limit but
    `max_connections`; `resolver` replaces the system's name resolution.
    """

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=max_connections,
            limit_per_host=limit_per_host,
            keepalive_timeout=keepalive_seconds,
            resolver=resolver,
            ssl=ssl_context(),
        )
        # No proxy from the environment: the webhook guard must see the address actually
        # connected to, and a carrier URL (API key included) goes to the carrier alone.
        pool = aiohttp.ClientSession(connector=connector, trust_env=False)
        # aiohttp silently sends a request a second time when a kept-alive connection drops
        # before the answer; a carrier attempt costs quota and a webhook attempt gets a record
        # of its own, so a second attempt stays the caller's decision. The attribute is private
        # (aiohttp >= 3.11); tests fail if it stops doing this.
        pool._retry_connection = False
        return pool

    # Without `verify`, the transport would load the CA bundle again for a context it never uses.
    return AiohttpTransport(client=session, verify=ssl_context())


class PooledClient:
    """A client over one pooled httpx client; `async with` it, or `aclose()` it when done."""

    _http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the pooled connections; a later call opens a new pool."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None
