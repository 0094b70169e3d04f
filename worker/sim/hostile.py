"""A webhook receiver that misbehaves on purpose, for tests and fault benchmarks.

It listens on 127.0.0.1 only, from a thread of its own, and answers each path with one kind of
trouble a real receiver has been seen to make: NUL bytes, a 10 MB body, a tarpit that sends
one byte at a time and never finishes, a connection reset. It counts the requests per kind, those
finished, and the most that were open at once, which is what a sender's fairness is judged by.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from enum import StrEnum
from typing import Any

from aiohttp import web

__all__ = ["HUGE_BODY", "NUL_BODY", "HostileReceiver", "Trouble"]

NUL_BODY = b"broken\x00receiver\x00"
HUGE_BODY = 10 * 1024 * 1024


class Trouble(StrEnum):
    """What the receiver does with a request, one per path."""

    NUL = "nul"  # 500 with NUL bytes in the body
    HUGE = "huge"  # 200 with a 10 MB body
    TARPIT = "tarpit"  # 200 and then a byte every `tarpit_interval` seconds, without end
    RESET = "reset"  # the connection is reset before any answer


class HostileReceiver:
    """Serves every `Trouble` on a free loopback port; `url(trouble)` is where to send."""

    def __init__(self, *, tarpit_interval: float = 1.0) -> None:
        self.tarpit_interval = tarpit_interval
        self.requests: Counter[Trouble] = Counter()
        self.most_open: Counter[Trouble] = Counter()
        # Requests answered in full, or given up by the sender.
        self.finished: Counter[Trouble] = Counter()
        self._open: Counter[Trouble] = Counter()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def __enter__(self) -> HostileReceiver:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def url(self, trouble: Trouble) -> str:
        return f"http://127.0.0.1:{self.port}/{trouble.value}"

    def start(self) -> None:
        self._thread.start()

        async def start() -> None:
            app = web.Application()
            handlers: dict[Trouble, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
                Trouble.NUL: self._nul,
                Trouble.HUGE: self._huge,
                Trouble.TARPIT: self._tarpit,
                Trouble.RESET: self._reset,
            }
            for trouble, handler in handlers.items():
                app.router.add_post(f"/{trouble.value}", self._counted(trouble, handler))
            # A handler whose client gave up is cancelled: a tarpit stops when the sender does.
            self._runner = web.AppRunner(app, handler_cancellation=True)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = self._runner.addresses[0][1]

        self._run(start())

    def close(self) -> None:
        if self._runner is not None:
            self._run(self._runner.cleanup())
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def _counted(
        self, trouble: Trouble, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def counted(request: web.Request) -> web.StreamResponse:
            with self._lock:
                self.requests[trouble] += 1
                self._open[trouble] += 1
                self.most_open[trouble] = max(self.most_open[trouble], self._open[trouble])
            try:
                await request.read()
                return await handler(request)
            finally:
                with self._lock:
                    self._open[trouble] -= 1
                    self.finished[trouble] += 1

        return counted

    async def _nul(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, body=NUL_BODY)

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_length = HUGE_BODY
        await response.prepare(request)
        chunk = b"x" * 65536
        # A sender that has read enough closes the connection: that ends the answer too.
        with contextlib.suppress(ConnectionError):
            for _ in range(HUGE_BODY // len(chunk)):
                await response.write(chunk)
            await response.write_eof()
        return response

    async def _tarpit(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_length = HUGE_BODY
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(b".")
                await asyncio.sleep(self.tarpit_interval)
        return response

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Linger zero: closing sends RST, not FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.close()
        # Never reaches the sender: the connection is gone.
        return web.Response(status=500)
