"""The 247Express tracking client: one HTTP attempt per call, turned into a typed result.

Everything the carrier can answer ends as either a `TrackingResult` (`worker.carrier.parse`) or
a `CarrierError` (`worker.carrier.errors`); this module maps what the transport raises and what
HTTP status comes back onto them. Retrying is the caller's decision, because every attempt
costs quota.

API keys travel in the query string, so they are kept out of every message this module makes,
every exception it raises (including their causes) and every log line of the HTTP libraries
(`worker.carrier.redact`).
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient

from worker.carrier.errors import (
    ERROR_CLASSES,
    CarrierError,
    CarrierErrorCode,
    CarrierHTTPStatusError,
    CarrierTimeout,
    CarrierTransportError,
    MalformedResponse,
)
from worker.carrier.parse import TrackingResult, parse_tracking
from worker.carrier.redact import redact, redact_http_logs, scrubbed, secret_forms
from worker.core.http import PooledClient, aiohttp_transport
from worker.domain.vocabulary import ErrorCode, validate_order_code

__all__ = ["DEFAULT_TIMEOUT", "MAX_BODY_BYTES", "TRACKING_PATH", "CarrierClient"]

TRACKING_PATH = "/api/Order/v1/Tracking"
DEFAULT_TIMEOUT = httpx.Timeout(15, connect=5)
# A real answer is a few KB; anything past this (decompressed, so a gzip bomb too) is refused.
MAX_BODY_BYTES = 2 * 1024 * 1024


class CarrierClient(PooledClient):
    """Tracks orders over one pooled keep-alive connection pool, bound to one event loop.

    Use `async with CarrierClient(base_url) as carrier: await carrier.track(code, key)`; make
    one client per event loop (aiohttp's pool cannot move between loops).
    """

    # Polls arrive in batches; a pooled connection should outlive the gap between two.
    _KEEPALIVE_SECONDS = 30.0

    def __init__(
        self,
        base_url: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport` replaces the aiohttp transport (tests, or benchmarks comparing them)."""
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.max_connections = max_connections
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = None
        parts = (self.timeout.pool, self.timeout.connect, self.timeout.write, self.timeout.read)
        # aiohttp restarts its read timer with every chunk, so a server trickling bytes could
        # hold a poll forever; the sum of the phases bounds the whole attempt.
        self._deadline = None if None in parts else sum(p for p in parts if p is not None)
        redact_http_logs()

    def __repr__(self) -> str:
        return f"CarrierClient(base_url={self.base_url!r})"

    @property
    def transport_name(self) -> str:
        """The HTTP transport in use, for benchmarks and diagnostics."""
        return type(self._transport).__name__ if self._transport else AiohttpTransport.__name__

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._loop is not None and loop is not self._loop:
            raise RuntimeError(
                "this CarrierClient belongs to another event loop; make one per loop"
            )
        if self._http is None:
            self._loop = loop
            transport = self._transport or aiohttp_transport(
                max_connections=self.max_connections, keepalive_seconds=self._KEEPALIVE_SECONDS
            )
            self._http = HttpxAiohttpClient(
                base_url=self.base_url,
                timeout=self.timeout,
                transport=transport,
                headers={"Accept": "application/json", "User-Agent": "shipmon"},
            )
        return self._http

    async def track(self, order_code: str, api_key: str) -> TrackingResult:
        """The carrier's tracking of `order_code`, in one HTTP attempt; raises CarrierError."""
        refused = ErrorCode.MISSING_APIKEY if not api_key else validate_order_code(order_code)
        if refused is not None:
            # The carrier would refuse it too, and the attempt would still cost quota.
            raise ERROR_CLASSES[refused](
                f"{refused.value}: {refused.message} (not sent to the carrier)",
                order_code=order_code,
                code_raw=refused.value,
                carrier_message=None,
            )
        http = self._client()
        secrets = secret_forms(api_key)
        # One absolute URL, parsed once: httpx would parse a path and its params three times,
        # a twentieth of a poll's CPU. urlencode's quote_plus is one of the key's secret forms.
        query = urlencode({"ordercode": order_code, "apikey": api_key})
        url = httpx.URL(f"{self.base_url}{TRACKING_PATH}?{query}")
        try:
            async with (
                asyncio.timeout(self._deadline),
                http.stream("GET", url) as response,
            ):
                body = await _read_body(response, order_code)
        except (httpx.RequestError, aiohttp.ClientError, TimeoutError) as error:
            failure = _transport_failure(error, order_code, secrets, self._deadline)
            raise failure from scrubbed(error, secrets)
        try:
            if response.is_success:
                return parse_tracking(body, order_code)
            raise _status_failure(response, body, order_code)
        except CarrierErrorCode as error:
            # The carrier's errorMessage is its own text; an echo of the key must not travel on.
            if error.carrier_message is not None:
                error.carrier_message = redact(error.carrier_message, secrets)
            error.message = redact(error.message, secrets)
            error.args = (error.message,)
            raise


async def _read_body(response: httpx.Response, order_code: str) -> bytes:
    """The decoded body, read no further than MAX_BODY_BYTES; past that, MalformedResponse."""
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise MalformedResponse(
                f"response body is over {MAX_BODY_BYTES} bytes once decompressed "
                "(a tracking answer is a few KB); not read further",
                order_code=order_code,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _status_failure(response: httpx.Response, body: bytes, order_code: str) -> CarrierError:
    """The error for a non-2xx answer: the carrier's own error code if the body has one."""
    try:
        parse_tracking(body, order_code)
    except CarrierErrorCode as error:
        return error
    except CarrierError:
        pass
    reason = f" {response.reason_phrase}" if response.reason_phrase else ""
    return CarrierHTTPStatusError(
        f"HTTP {response.status_code}{reason} from carrier",
        order_code=order_code,
        status_code=response.status_code,
    )


def _transport_failure(
    error: BaseException, order_code: str, secrets: tuple[str, ...], deadline: float | None
) -> CarrierError:
    """Our error for an exception raised while sending or receiving, described for ops."""
    # httpx-aiohttp maps aiohttp's errors coarsely (a dropped connection becomes ConnectTimeout),
    # so the aiohttp cause, when there is one, decides.
    cause = error.__cause__ if isinstance(error.__cause__, aiohttp.ClientError) else error
    detail = redact(f"{type(cause).__name__}: {cause}", secrets)
    if isinstance(cause, httpx.DecodingError):
        return MalformedResponse(
            f"response body could not be decoded ({detail})", order_code=order_code
        )
    if type(cause) is TimeoutError:
        return CarrierTimeout(f"no complete answer within {deadline:g} s", order_code=order_code)
    if isinstance(cause, aiohttp.ConnectionTimeoutError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return CarrierTimeout(
            f"timed out connecting to the carrier ({detail})", order_code=order_code
        )
    if isinstance(cause, TimeoutError | httpx.TimeoutException):
        return CarrierTimeout(
            f"timed out waiting for the carrier ({detail})", order_code=order_code
        )
    if isinstance(cause, aiohttp.ClientConnectorError | httpx.ConnectError):
        what = "could not connect to the carrier"
    elif isinstance(cause, aiohttp.ServerDisconnectedError | httpx.RemoteProtocolError):
        what = "the carrier closed the connection before answering"
    elif isinstance(cause, aiohttp.ClientPayloadError | httpx.ReadError):
        what = "the response body was cut off"
    elif isinstance(cause, aiohttp.ClientResponseError):
        what = "the carrier sent an invalid HTTP response"
    else:
        what = "the connection to the carrier failed"
    return CarrierTransportError(f"{what} ({detail})", order_code=order_code)
