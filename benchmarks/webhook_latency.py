"""Commit-to-POST latency of webhooks: from the commit of the transaction that wrote an outbox
event to the moment the receiver gets the POST, on loopback. Target: p95 under 1 second.

Each event is written and committed the way the poll pipeline does it, then handed to the
after-commit path at once; a receiver on 127.0.0.1 notes when each POST arrives. Two ways of
running the after-commit path are measured:

- per call: `fan_out_and_deliver` in a fresh event loop with a fresh HTTP client per call (what
  a task that runs it with `asyncio.run` would do);
- kept loop: `fan_out_and_deliver` on one event loop and one `WebhookSender` kept across calls
  (what a worker process that keeps its loop does).

The baseline, measured in the same run against the same receiver, is one signed POST by the kept
sender with no database work at all: the floor the two paths above are compared with.

    uv run python benchmarks/webhook_latency.py --events 200

It uses the configured servers (SHIPMON_DATABASE_URL, or the embedded ones), under an account
of its own that it deletes at the end. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from httpx_aiohttp import AiohttpTransport
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from worker.core.config import load_settings
from worker.core.crypto import encrypt
from worker.core.db import session_factory, upgrade
from worker.core.servers import resolve
from worker.domain.models import Account, OutboxEvent, Shipment
from worker.domain.vocabulary import EventType
from worker.notify.delivery import fan_out_and_deliver
from worker.notify.webhooks.endpoints import add_endpoint
from worker.notify.webhooks.sender import WebhookSender
from worker.notify.webhooks.signing import event_body


class Receiver:
    """An HTTP server on a free loopback port that notes when each webhook-id arrives."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.arrived = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_post("/webhooks", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return int(self._runner.addresses[0][1])

    async def _handle(self, request: web.Request) -> web.Response:
        arrived = time.perf_counter()
        await request.read()
        with self.arrived:
            self.arrivals[request.headers["webhook-id"]] = arrived
            self.arrived.notify_all()
        return web.Response(status=204)

    def wait_for(self, event_id: str, timeout: float = 30) -> float:
        with self.arrived:
            if not self.arrived.wait_for(lambda: event_id in self.arrivals, timeout):
                raise TimeoutError(f"webhook {event_id} never arrived")
            return self.arrivals[event_id]

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def write_event(sessions: sessionmaker[Session], shipment_id: int) -> tuple[int, str, float]:
    """Write one outbox event as the poll pipeline does; returns its ids and commit time."""
    with sessions() as s, s.begin():
        shipment = s.get_one(Shipment, shipment_id, with_for_update=True)
        shipment.last_sequence += 1
        event = OutboxEvent(
            event_id=f"evt_{secrets.token_hex(13)}",
            account_id=shipment.account_id,
            shipment_id=shipment.id,
            type=EventType.STATUS_CHANGED,
            sequence=shipment.last_sequence,
            data={"order_code": shipment.order_code, "sequence": shipment.last_sequence},
        )
        s.add(event)
        s.flush()
        ids = (event.id, event.event_id)
    return ids[0], ids[1], time.perf_counter()


def percentiles(samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "p50_ms": round(cuts[49] * 1000, 2),
        "p95_ms": round(cuts[94] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
        "max_ms": round(max(samples) * 1000, 2),
    }


def measure(events: int, one: Callable[[int], float]) -> list[float]:
    # A few rounds first, so connection set-up and first-import costs are not counted.
    for i in range(min(5, events)):
        one(i)
    return [one(i) for i in range(events)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200, help="events per measurement")
    parser.add_argument("--shipments", type=int, default=20, help="shipments the events go to")
    args = parser.parse_args()

    settings = load_settings().model_copy(update={"webhook_allow_private": True})
    servers = resolve(settings)
    upgrade(servers.database_url)
    sessions = session_factory(servers.database_url)
    receiver = Receiver()
    url = f"http://127.0.0.1:{receiver.port}/webhooks"
    with sessions.begin() as s:
        account = Account(
            name=f"bench-webhooks-{secrets.token_hex(4)}",
            api_key_encrypted=encrypt("bench", servers.secret_key),
            api_key_hint="nch",
        )
        s.add(account)
        s.flush()
        _, secret = add_endpoint(
            s, account, url, None, secret_key=servers.secret_key, allow_private=True
        )
        shipments = [Shipment(account_id=account.id, order_code=f"BENCH{i:05d}") for i in range(
            args.shipments)]  # fmt: skip
        s.add_all(shipments)
        s.flush()
        account_id, shipment_ids = account.id, [x.id for x in shipments]

    runner = asyncio.Runner()
    sender = WebhookSender(allow_private=True)
    try:

        def baseline(i: int) -> float:
            event_id = f"evt_base_{i}_{secrets.token_hex(4)}"
            body = event_body(event_id, EventType.STATUS_CHANGED, datetime.now(UTC), {})
            started = time.perf_counter()
            result = runner.run(sender.send(url, [secret], event_id, body))
            assert result.succeeded, result
            return receiver.wait_for(event_id) - started

        async def with_fresh_sender(event: int) -> int:
            async with WebhookSender(allow_private=settings.webhook_allow_private) as fresh:
                return await fan_out_and_deliver(
                    sessions, settings, fresh, [event], secret_key=servers.secret_key
                )

        def per_call(i: int) -> float:
            event, event_id, committed = write_event(sessions, shipment_ids[i % len(shipment_ids)])
            asyncio.run(with_fresh_sender(event))
            return receiver.wait_for(event_id) - committed

        def kept_loop(i: int) -> float:
            event, event_id, committed = write_event(sessions, shipment_ids[i % len(shipment_ids)])
            runner.run(
                fan_out_and_deliver(
                    sessions, settings, sender, [event], secret_key=servers.secret_key
                )
            )
            return receiver.wait_for(event_id) - committed

        figures: dict[str, Any] = {
            "events": args.events,
            "transport": AiohttpTransport.__name__,
        }
        for name, one in (("baseline", baseline), ("per_call", per_call), ("kept_loop", kept_loop)):
            figures[name] = percentiles(measure(args.events, one))
            row = figures[name]
            print(
                f"{name:>10}: p50 {row['p50_ms']:8.2f} ms  p95 {row['p95_ms']:8.2f} ms  "
                f"p99 {row['p99_ms']:8.2f} ms  max {row['max_ms']:8.2f} ms",
                flush=True,
            )
        worst = max(figures["per_call"]["p95_ms"], figures["kept_loop"]["p95_ms"])
        figures["target_p95_ms"] = 1000
        figures["meets_target"] = worst < 1000
        print(json.dumps(figures))
    finally:
        runner.run(sender.aclose())
        runner.close()
        receiver.close()
        with sessions.begin() as s:
            s.execute(delete(Account).where(Account.id == account_id))


if __name__ == "__main__":
    main()
