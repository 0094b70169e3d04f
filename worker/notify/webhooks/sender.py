"""Making one webhook attempt, and the retry schedule between attempts.

An attempt is one signed POST that is never resent by the HTTP library; whatever happens
(refusal by the guard, timeout, broken connection, any HTTP status) becomes an `AttemptResult`
that the outbox records.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import aiohttp
import httpx
from httpx_aiohttp import HttpxAiohttpClient

from worker.core.http import PooledClient, aiohttp_transport
from worker.notify.webhooks.guard import (
    GuardedResolver,
    Resolver,
    UnsafeDestination,
    check_literal,
    system_resolver,
)
from worker.notify.webhooks.signing import webhook_headers

__all__ = [
    "ATTEMPT_TIMEOUT",
    "CONNECT_TIMEOUT",
    "ERROR_LIMIT",
    "EXCERPT_LIMIT",
    "RETRY_DELAYS",
    "AttemptResult",
    "WebhookSender",
    "clean_text",
    "describe_error",
    "retry_delay",
]

CONNECT_TIMEOUT = 5.0
# The whole attempt: connecting, sending, and reading the answer.
ATTEMPT_TIMEOUT = 15.0
# Enough of a response body to see what went wrong, without storing a page of HTML per try.
EXCERPT_LIMIT = 20 * 1024
# An error's text is one line for ops, never a dump.
ERROR_LIMIT = 1000
# Waits before the 2nd, 3rd, ... 8th attempt, each counted from the previous attempt.
RETRY_DELAYS: tuple[timedelta, ...] = (
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
JITTER = 0.2
# A server's Retry-After is honoured up to the schedule's longest wait.
MAX_RETRY_AFTER = max(RETRY_DELAYS)


def retry_delay(
    attempts: int, retry_after: timedelta | None = None, rng: random.Random | None = None
) -> timedelta | None:
    """How long to wait after the `attempts`-th failed attempt; None when it was the last.

    The schedule's wait is jittered by ±20% so that a receiver coming back is not hit by every
    delivery at once; a server's Retry-After lengthens it, never shortens it.
    """
    if attempts < 1 or attempts > len(RETRY_DELAYS):
        return None
    factor = 1 + (rng or random).uniform(-JITTER, JITTER)
    delay = RETRY_DELAYS[attempts - 1] * factor
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


@dataclass(frozen=True)
class AttemptResult:
    """What one try at a delivery gave: an HTTP status or SMTP reply code, or an error."""

    succeeded: bool
    duration_ms: int
    status_code: int | None = None
    error: str | None = None
    response_excerpt: str | None = None
    # When the receiver asked to be left alone for a while (429 or 503 with Retry-After).
    retry_after: timedelta | None = None

    @property
    def gone(self) -> bool:
        """The receiver answered 410 Gone: it wants no more webhooks at this URL."""
        return self.status_code == 410


def _retry_after(value: str | None, now: datetime) -> timedelta | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return timedelta(seconds=int(value))
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(moment - now, timedelta(0))


class WebhookSender(PooledClient):
    """Makes webhook attempts over one pooled HTTP client; use one per event loop."""

    def __init__(
        self,
        *,
        allow_private: bool,
        resolver: Resolver = system_resolver,
        max_connections: int = 100,
        attempt_timeout: float = ATTEMPT_TIMEOUT,
    ) -> None:
        self._allow_private = allow_private
        self._resolver = resolver
        self._max_connections = max_connections
        self._attempt_timeout = attempt_timeout

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            transport = aiohttp_transport(
                max_connections=self._max_connections,
                # One slow receiver must not take every connection from the others.
                limit_per_host=max(1, self._max_connections // 4),
                resolver=GuardedResolver(self._resolver, self._allow_private),
            )
            self._http = HttpxAiohttpClient(
                transport=transport,
                timeout=httpx.Timeout(self._attempt_timeout, connect=CONNECT_TIMEOUT),
                follow_redirects=False,
                trust_env=False,
            )
        return self._http

    async def send(
        self, url: str, secrets_: Sequence[str], event_id: str, body: bytes
    ) -> AttemptResult:
        """POST `body` to `url`, signed now; every failure becomes an unsuccessful result."""
        started = time.perf_counter()

        def elapsed() -> int:
            return round((time.perf_counter() - started) * 1000)

        try:
            check_literal(url, allow_private=self._allow_private)
            headers = webhook_headers(secrets_, event_id, body, datetime.now(UTC))
            async with (
                asyncio.timeout(self._attempt_timeout),
                self._client().stream("POST", url, content=body, headers=headers) as response,
            ):
                excerpt = await _read_excerpt(response)
        except UnsafeDestination as error:
            return AttemptResult(False, elapsed(), error=f"refused: {error}")
        except TimeoutError:
            return AttemptResult(
                False, elapsed(), error=f"no answer within {self._attempt_timeout:g} s"
            )
        except (httpx.HTTPError, aiohttp.ClientError, OSError) as error:
            return AttemptResult(False, elapsed(), error=describe_error(error))
        retry_after = None
        if response.status_code in (429, 503):
            retry_after = _retry_after(response.headers.get("retry-after"), datetime.now(UTC))
        return AttemptResult(
            succeeded=response.is_success,
            duration_ms=elapsed(),
            status_code=response.status_code,
            response_excerpt=excerpt,
            retry_after=retry_after,
        )


def clean_text(text: str, limit: int) -> str:
    """`text` as PostgreSQL can store it: NUL bytes replaced, cut to `limit` characters.

    A receiver chooses every byte of its answer, and a text column refuses a NUL; one such
    answer must not make its attempt impossible to record.
    """
    return text[:limit].replace("\x00", "\N{REPLACEMENT CHARACTER}")


async def _read_excerpt(response: httpx.Response) -> str:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= EXCERPT_LIMIT:
            break
    return clean_text(b"".join(chunks)[:EXCERPT_LIMIT].decode(errors="replace"), EXCERPT_LIMIT)


def describe_error(error: BaseException) -> str:
    """An exception as one line for an attempt's record: its kind and what it says."""
    text = str(error).strip()
    name = type(error).__name__
    return f"{name}: {text}" if text else name
