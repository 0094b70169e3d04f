"""Bounds on what a caller may send: body size (before parsing) and requests per token."""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
import redis.asyncio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.api.problems import ApiErrorCode, problem_response

# 10,000 order codes of 20 characters fit in well under this.
MAX_BODY_BYTES = 1024 * 1024
_TOO_LARGE = f"the request body is over {MAX_BODY_BYTES} bytes; send at most 10,000 codes a call"


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, before the application parses anything.

    A declared Content-Length is checked first; a chunked body is read up to the limit and
    handed on whole, so no route ever sees more than `limit` bytes.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(413, ApiErrorCode.PAYLOAD_TOO_LARGE, _TOO_LARGE)
        # The rest of the body is left unread; the server closes the connection after this.
        response.headers["connection"] = "close"
        await response(scope, receive, send)


# Take `ARGV[1]` requests of the window at once; the window's key expires with it.
_TAKE = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], 2) end
return n
"""
# A process takes this share of a token's limit from Redis at a time, and spends it locally.
LEASE_SHARE = 20
MAX_LEASE = 100


class _Leases:
    """Requests leased from Redis and not yet spent, per token hash, in the current second."""

    def __init__(self) -> None:
        self.window = 0
        self.left: dict[str, int] = {}

    def spend(self, token_hash: str, now: float) -> bool:
        if int(now) != self.window:  # a new second: every lease of the last one is void
            self.window, self.left = int(now), {}
        left = self.left.get(token_hash, 0)
        if left > 0:
            self.left[token_hash] = left - 1
        return left > 0

    def keep(self, token_hash: str, count: int, now: float) -> None:
        if int(now) == self.window and count > 0:
            self.left[token_hash] = self.left.get(token_hash, 0) + count


class RateLimiter:
    """A fixed one-second window per token, counted in Redis so every API process shares it.

    A process leases a few requests of the window at a time (a twentieth of the limit, at most
    100) and spends them without asking Redis again; a lease is granted only from what the
    window has left, so all processes together never pass the limit. What one process leased
    and did not spend is at most one lease, lost to the others for the rest of that second.

    The window is keyed by the presented token's hash, so a request is counted before the
    database is asked whether the token is valid: a flood with one token, valid or not, is
    turned away by Redis alone.
    """

    def __init__(
        self, client: redis.Redis[Any], aclient: redis.asyncio.Redis[Any], per_second: int
    ) -> None:
        self.per_second = per_second
        self.lease = max(1, min(MAX_LEASE, per_second // LEASE_SHARE))
        self._take = client.register_script(_TAKE)
        self._take_async = aclient.register_script(_TAKE)
        # The threadpool's routes and the event loop's lease apart, so neither races the other.
        self._lock = threading.Lock()
        self._leases = _Leases()
        self._leases_async = _Leases()

    def retry_after(self, token_hash: str) -> float | None:
        """None when the request may go ahead, else the seconds to wait."""
        now = time.time()
        with self._lock:
            if self._leases.spend(token_hash, now):
                return None
            taken = int(self._take(keys=[self._key(token_hash, now)], args=[self.lease]))
            return self._granted(self._leases, token_hash, taken, now)

    async def retry_after_async(self, token_hash: str) -> float | None:
        """`retry_after` on the event loop."""
        now = time.time()
        if self._leases_async.spend(token_hash, now):
            return None
        key = self._key(token_hash, now)
        taken = int(await self._take_async(keys=[key], args=[self.lease]))
        return self._granted(self._leases_async, token_hash, taken, now)

    def _granted(self, leases: _Leases, token_hash: str, taken: int, now: float) -> float | None:
        """After a lease brought the window's count to `taken`: spend one of it, or refuse."""
        granted = min(self.lease, self.per_second - (taken - self.lease))
        if granted <= 0:
            return int(now) + 1 - now
        leases.keep(token_hash, granted - 1, now)
        return None

    @staticmethod
    def _key(token_hash: str, now: float) -> str:
        return f"shipmon:api:rate:{token_hash[:32]}:{int(now)}"
