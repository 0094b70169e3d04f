"""Bounds on what a caller may send: body size (before parsing) and requests per token."""

from __future__ import annotations

import time
from typing import Any

import redis
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


class RateLimiter:
    """A fixed one-second window per token, counted in Redis so every API process shares it."""

    def __init__(self, client: redis.Redis[Any], per_second: int) -> None:
        self.redis = client
        self.per_second = per_second

    def retry_after(self, token_id: int) -> float | None:
        """None when the request may go ahead, else the seconds to wait."""
        now = time.time()
        window = int(now)
        key = f"shipmon:api:rate:{token_id}:{window}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 2)
        count = int(pipe.execute()[0])
        if count <= self.per_second:
            return None
        return window + 1 - now
