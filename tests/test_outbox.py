"""The outbox: fan-out into deliveries, in-order delivery per shipment and destination, retries
kept in PostgreSQL, a worker killed mid-delivery, replays and the notification commands.

These tests commit real rows (the delivery loop opens sessions of its own), each under an
account of its own that is deleted afterwards. Receivers are real HTTP servers on loopback that
verify every signature with the official Standard Webhooks library. Time moves by passing
`now`, never by sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook, WebhookVerificationError
from typer.testing import CliRunner

from tests.conftest import RunServers, make_account
from worker.cli import app
from worker.core.config import Settings, get_settings
from worker.core.db import session_factory
from worker.domain.models import (
    Account,
    Delivery,
    DeliveryAttempt,
    EmailRecipient,
    OutboxEvent,
    Shipment,
    WebhookEndpoint,
)
from worker.domain.vocabulary import EventType
from worker.notify.delivery import DEFAULT_LEASE, _claim, _record, fan_out_and_deliver
from worker.notify.outbox import fan_out
from worker.notify.replay import replay
from worker.notify.webhooks.endpoints import add_endpoint, set_endpoint_enabled
from worker.notify.webhooks.sender import RETRY_DELAYS, AttemptResult, WebhookSender

T0 = datetime.now(UTC).replace(microsecond=0)

# --- A real receiver -------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    event_id: str
    type: str
    order_code: str
    sequence: int
    headers: dict[str, str]


Answer = Callable[[Received], Awaitable[tuple[int, dict[str, str]]]]


async def ok(received: Received) -> tuple[int, dict[str, str]]:
    return 200, {}


def always(status: int, headers: dict[str, str] | None = None) -> Answer:
    async def answer(received: Received) -> tuple[int, dict[str, str]]:
        return status, headers or {}

    return answer


class Receiver:
    """A webhook receiver on a free loopback port, serving from a thread of its own.

    It verifies every request with the endpoint's secret (set `secret` once it is known) and
    answers as `answer` says; requests that fail verification are kept in `rejected`.
    """

    def __init__(self, answer: Answer = ok) -> None:
        self.answer = answer
        self.secret: str | None = None
        self.received: list[Received] = []
        self.rejected: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks"

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def start(self) -> None:
        """Listen (again, on the same port once it has one)."""

        async def start() -> None:
            app = web.Application()
            app.router.add_post("/webhooks", self._handle)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            self.port = self._runner.addresses[0][1]

        self._run(start())

    def stop(self) -> None:
        """Stop listening: connections are refused until `start`."""
        if self._runner is not None:
            self._run(self._runner.cleanup())
            self._runner = None

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        try:
            assert self.secret is not None, "the receiver does not know its secret yet"
            document = Webhook(self.secret).verify(body, headers)
        except (AssertionError, WebhookVerificationError) as error:
            self.rejected.append(str(error))
            return web.Response(status=400, text=str(error))
        received = Received(
            event_id=document["id"],
            type=document["type"],
            order_code=document["data"]["order_code"],
            sequence=document["data"]["sequence"],
            headers={k.lower(): v for k, v in headers.items()},
        )
        self.received.append(received)
        status, extra = await self.answer(received)
        return web.Response(status=status, headers=extra, text=f"answered {status}")

    def sequences(self, order_code: str) -> list[int]:
        return [r.sequence for r in self.received if r.order_code == order_code]


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def make(answer: Answer = ok) -> Receiver:
        receiver = Receiver(answer)
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.close()


# --- Committed test data ---------------------------------------------------------------------


@dataclass
class World:
    """Accounts, shipments, endpoints and events, committed; deleted after the test."""

    sessions: sessionmaker[Session]
    settings: Settings
    secret_key: str
    accounts: list[int] = field(default_factory=list)

    def account(self, ops_email: str | None = None) -> int:
        with self.sessions.begin() as s:
            account = make_account(s)
            account.ops_email = ops_email
            self.accounts.append(account.id)
            return account.id

    def shipment(self, account_id: int) -> tuple[int, str]:
        code = f"SPX{secrets.token_hex(6).upper()}"
        with self.sessions.begin() as s:
            shipment = Shipment(account_id=account_id, order_code=code, status="IN_TRANSIT")
            s.add(shipment)
            s.flush()
            return shipment.id, code

    def endpoint(self, account_id: int, receiver: Receiver, events: list[str] | None = None) -> int:
        with self.sessions.begin() as s:
            endpoint, secret = add_endpoint(
                s, s.get_one(Account, account_id), receiver.url, events,
                secret_key=self.secret_key, allow_private=True,
            )  # fmt: skip
            receiver.secret = secret
            return endpoint.id

    def event(
        self, shipment_id: int, type_: str = EventType.STATUS_CHANGED, **data: Any
    ) -> tuple[int, str]:
        """An outbox event the way the poll pipeline writes it; returns (id, event_id)."""
        with self.sessions.begin() as s:
            shipment = s.get_one(Shipment, shipment_id, with_for_update=True)
            account = s.get_one(Account, shipment.account_id)
            shipment.last_sequence += 1
            event = OutboxEvent(
                event_id=f"evt_{secrets.token_hex(13)}",
                account_id=shipment.account_id,
                shipment_id=shipment.id,
                type=type_,
                sequence=shipment.last_sequence,
                data={
                    "order_code": shipment.order_code,
                    "account": account.name,
                    "sequence": shipment.last_sequence,
                    "previous_status": {"name": "IN_TRANSIT", "id": 24, "code": "DANGVANCHUYEN"},
                    "status": {
                        "name": "DELIVERING", "id": 25, "code": "DANGDIPHAT",
                        "tracking_name": "Đang đi phát",
                    },
                    "event_time": T0.isoformat(),
                    "seen_at": T0.isoformat(),
                    "delay": None,
                } | data,
            )  # fmt: skip
            s.add(event)
            s.flush()
            return event.id, event.event_id

    def deliver(
        self,
        now: datetime,
        event_ids: list[int] | None = None,
        *,
        sender: WebhookSender | None = None,
    ) -> int:
        """One run of the worker's delivery task, with an HTTP client of its own by default."""

        async def run() -> int:
            client = sender or WebhookSender(allow_private=self.settings.webhook_allow_private)
            async with client:
                return await fan_out_and_deliver(
                    self.sessions, self.settings, client, event_ids,
                    secret_key=self.secret_key, now=now,
                )  # fmt: skip

        return asyncio.run(run())

    def deliveries(self, endpoint_id: int) -> list[Delivery]:
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(Delivery)
                    .where(Delivery.endpoint_id == endpoint_id)
                    .order_by(Delivery.shipment_id, Delivery.sequence)
                )
            )

    def attempts(self, delivery_id: int) -> list[DeliveryAttempt]:
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(DeliveryAttempt)
                    .where(DeliveryAttempt.delivery_id == delivery_id)
                    .order_by(DeliveryAttempt.id)
                )
            )

    def endpoint_row(self, endpoint_id: int) -> WebhookEndpoint:
        with self.sessions() as s:
            return s.get_one(WebhookEndpoint, endpoint_id)


@pytest.fixture
def world(servers: RunServers) -> Iterator[World]:
    made = World(
        session_factory(servers.database_url),
        servers.settings(webhook_allow_private=True),
        servers.secret_key,
    )
    yield made
    with made.sessions.begin() as s:
        s.execute(delete(Account).where(Account.id.in_(made.accounts)))


# --- Fan-out ---------------------------------------------------------------------------------


def test_fan_out_follows_filters_skips_disabled_destinations_and_never_repeats(
    session: Session,
) -> None:
    account = make_account(session)
    other = make_account(session)
    shipment = Shipment(account_id=account.id, order_code="FAN00001")
    session.add(shipment)
    session.flush()

    def endpoint(owner: Account, events: list[str] | None, enabled: bool = True) -> int:
        row = WebhookEndpoint(
            account_id=owner.id, url="http://127.0.0.1:9/", secret_encrypted="x",
            event_types=events, enabled=enabled,
        )  # fmt: skip
        session.add(row)
        session.flush()
        return row.id

    every = endpoint(account, None)
    delays = endpoint(account, [EventType.DELAYED])
    endpoint(account, None, enabled=False)
    endpoint(other, None)
    recipient = EmailRecipient(
        account_id=account.id, address="ops@shop.example", event_types=[EventType.STALLED]
    )
    session.add(recipient)
    events = []
    for sequence, type_ in enumerate([EventType.STATUS_CHANGED, EventType.DELAYED], start=1):
        event = OutboxEvent(
            event_id=f"evt_fan{sequence}{secrets.token_hex(4)}", account_id=account.id,
            shipment_id=shipment.id, type=type_, sequence=sequence, data={},
        )  # fmt: skip
        session.add(event)
        events.append(event)
    session.flush()

    assert fan_out(session, [e.id for e in events], now=T0) == 3
    assert fan_out(session, [e.id for e in events], now=T0) == 0
    assert fan_out(session, None, now=T0) == 0
    made = session.execute(
        select(Delivery.endpoint_id, Delivery.sequence, Delivery.recipient_id)
        .join(OutboxEvent, OutboxEvent.id == Delivery.event_id)
        .where(OutboxEvent.account_id == account.id)
        .order_by(Delivery.endpoint_id, Delivery.sequence)
    ).all()
    assert [tuple(row) for row in made] == [(every, 1, None), (every, 2, None), (delays, 2, None)]
    assert all(e.fanned_out_at == T0 for e in events)


# --- Delivery --------------------------------------------------------------------------------


def test_every_event_type_arrives_signed_in_order_with_its_id(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    everything, delays_only = receivers(), receivers()
    account = world.account()
    shipment, code = world.shipment(account)
    all_id = world.endpoint(account, everything)
    world.endpoint(account, delays_only, events=[EventType.DELAYED])
    sent = [world.event(shipment, t)[1] for t in EventType]

    world.deliver(T0)

    assert everything.rejected == []
    assert [r.event_id for r in everything.received] == sent
    assert [r.type for r in everything.received] == [t.value for t in EventType]
    assert everything.sequences(code) == [1, 2, 3, 4, 5, 6]
    for received in everything.received:
        assert received.headers["webhook-id"] == received.event_id
        assert received.headers["content-type"] == "application/json"
        assert received.headers["user-agent"].startswith("shipmon-webhooks/")
    assert [r.type for r in delays_only.received] == [EventType.DELAYED]
    deliveries = world.deliveries(all_id)
    assert [d.state for d in deliveries] == ["succeeded"] * 6
    attempts = world.attempts(deliveries[0].id)
    assert [(a.status_code, a.response_excerpt) for a in attempts] == [(200, "answered 200")]
    assert attempts[0].duration_ms >= 0


def test_a_receiver_that_is_down_gets_everything_in_order_when_it_is_back(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()
    account = world.account()
    endpoint = world.endpoint(account, receiver)
    shipments = [world.shipment(account) for _ in range(2)]
    for shipment, _ in shipments:
        for _ in range(3):
            world.event(shipment)
    receiver.stop()

    world.deliver(T0)

    # Only the first event of each shipment was tried; the later ones wait behind it, and so
    # does an event that comes meanwhile.
    world.event(shipments[0][0])
    world.deliver(T0 + timedelta(seconds=1))
    deliveries = world.deliveries(endpoint)
    assert [(d.sequence, d.attempts) for d in deliveries] == [
        (1, 1), (2, 0), (3, 0), (4, 0), (1, 1), (2, 0), (3, 0),
    ]  # fmt: skip
    for line in (deliveries[:4], deliveries[4:]):
        retry = line[0].next_attempt_at
        assert T0 + RETRY_DELAYS[0] * 0.8 <= retry <= T0 + RETRY_DELAYS[0] * 1.2
        assert world.attempts(line[0].id)[0].status_code is None
        assert {d.next_attempt_at for d in line} == {retry}

    receiver.start()
    world.deliver(T0 + timedelta(seconds=3))  # not due yet: nothing happens
    assert receiver.received == []
    world.deliver(T0 + timedelta(seconds=7))

    assert receiver.rejected == []
    assert receiver.sequences(shipments[0][1]) == [1, 2, 3, 4]
    assert receiver.sequences(shipments[1][1]) == [1, 2, 3]
    assert {d.state for d in world.deliveries(endpoint)} == {"succeeded"}


def test_a_slow_endpoint_never_holds_up_another(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    fast_done = threading.Event()

    async def fast_answer(received: Received) -> tuple[int, dict[str, str]]:
        if len(fast.received) == 3:
            fast_done.set()
        return 200, {}

    async def slow_answer(received: Received) -> tuple[int, dict[str, str]]:
        # Answers only once the other endpoint got every event, or fails after a while.
        done = await asyncio.to_thread(fast_done.wait, 10)
        return (200 if done else 500), {}

    fast, slow = receivers(fast_answer), receivers(slow_answer)
    account = world.account()
    shipment, code = world.shipment(account)
    world.endpoint(account, slow)
    world.endpoint(account, fast)
    for _ in range(3):
        world.event(shipment)

    world.deliver(T0)

    assert fast_done.is_set()
    assert fast.sequences(code) == [1, 2, 3]
    assert slow.sequences(code) == [1, 2, 3]


def test_events_committed_while_a_run_delivers_go_out_with_that_run(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    """A busy notify worker takes new events into the run it is in, not a queued task."""
    account = world.account()
    first, first_code = world.shipment(account)
    later, later_code = world.shipment(account)

    async def answer(received: Received) -> tuple[int, dict[str, str]]:
        if received.order_code == first_code:  # meanwhile a poll commits a change of another
            await asyncio.to_thread(world.event, later)
        return 200, {}

    receiver = receivers(answer)
    world.endpoint(account, receiver)
    event_id, _ = world.event(first)

    world.deliver(T0, [event_id])

    assert receiver.sequences(first_code) == [1]
    assert receiver.sequences(later_code) == [1]


def test_410_disables_the_endpoint_and_enabling_it_resumes_in_order(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(always(410))
    account = world.account(ops_email="ops@shop.example")
    endpoint = world.endpoint(account, receiver)
    shipment, code = world.shipment(account)
    for _ in range(2):
        world.event(shipment)

    world.deliver(T0)

    row = world.endpoint_row(endpoint)
    assert not row.enabled
    assert row.disabled_reason == "the endpoint answered 410 Gone"
    assert len(receiver.received) == 1
    # Held, not dropped: nothing more is sent while the endpoint is disabled.
    world.deliver(T0 + timedelta(days=2))
    assert len(receiver.received) == 1
    assert [d.state for d in world.deliveries(endpoint)] == ["pending", "pending"]

    receiver.answer = ok
    with world.sessions.begin() as s:
        set_endpoint_enabled(s, s.get_one(WebhookEndpoint, endpoint), True, now=T0)
    world.deliver(T0)
    assert receiver.sequences(code) == [1, 1, 2]
    assert [d.state for d in world.deliveries(endpoint)] == ["succeeded", "succeeded"]


def test_retry_after_is_honoured(world: World, receivers: Callable[..., Receiver]) -> None:
    receiver = receivers(always(503, {"Retry-After": "3600"}))
    account = world.account()
    endpoint = world.endpoint(account, receiver)
    shipment, _ = world.shipment(account)
    world.event(shipment)

    world.deliver(T0)
    (delivery,) = world.deliveries(endpoint)
    assert delivery.next_attempt_at >= T0 + timedelta(hours=1)

    world.deliver(T0 + timedelta(minutes=59))
    assert len(receiver.received) == 1
    receiver.answer = always(429, {"Retry-After": "7200"})
    world.deliver(delivery.next_attempt_at)
    assert len(receiver.received) == 2
    (delivery,) = world.deliveries(endpoint)
    assert delivery.next_attempt_at >= T0 + timedelta(hours=3)
    assert [a.status_code for a in world.attempts(delivery.id)] == [503, 429]


def test_after_the_last_retry_a_delivery_is_dead_and_the_next_event_goes(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    async def refuse_the_first(received: Received) -> tuple[int, dict[str, str]]:
        return (500 if received.sequence == 1 else 200), {}

    receiver = receivers(refuse_the_first)
    account = world.account()
    endpoint = world.endpoint(account, receiver)
    shipment, code = world.shipment(account)
    world.event(shipment)
    world.event(shipment)

    now = T0
    moments = []
    for _ in range(len(RETRY_DELAYS) + 1):
        world.deliver(now)
        moments.append(now)
        first = world.deliveries(endpoint)[0]
        now = first.next_attempt_at

    first, second = world.deliveries(endpoint)
    assert (first.state, first.attempts) == ("dead", len(RETRY_DELAYS) + 1)
    assert second.state == "succeeded"
    assert receiver.sequences(code) == [1] * (len(RETRY_DELAYS) + 1) + [2]
    waits = [later - earlier for earlier, later in itertools.pairwise(moments)]
    for wait, nominal in zip(waits, RETRY_DELAYS, strict=True):
        assert nominal * 0.8 <= wait <= nominal * 1.2
    attempts = world.attempts(first.id)
    assert [a.status_code for a in attempts] == [500] * (len(RETRY_DELAYS) + 1)
    assert attempts[0].response_excerpt == "answered 500"


def test_an_endpoint_failing_for_five_days_is_disabled(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(always(500))
    account = world.account()
    endpoint = world.endpoint(account, receiver)
    shipment, _ = world.shipment(account)
    world.event(shipment)
    world.deliver(T0)
    assert world.endpoint_row(endpoint).failing_since == T0

    # The first event is long dead by now; a new one fails too, on the fifth day.
    with world.sessions.begin() as s:
        s.execute(update(Delivery).where(Delivery.endpoint_id == endpoint).values(state="dead"))
    world.event(shipment)
    world.deliver(T0 + timedelta(days=4, hours=23))
    assert world.endpoint_row(endpoint).enabled
    world.deliver(T0 + timedelta(days=5))  # the retry, five days after the first failure

    row = world.endpoint_row(endpoint)
    assert not row.enabled
    assert row.disabled_reason is not None and "every attempt failed since" in row.disabled_reason


def test_an_earlier_event_not_yet_fanned_out_holds_the_later_one(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()
    account = world.account()
    world.endpoint(account, receiver)
    shipment, code = world.shipment(account)
    world.event(shipment)
    second, _ = world.event(shipment)

    world.deliver(T0, [second])
    assert receiver.received == []
    world.deliver(T0)
    assert receiver.sequences(code) == [1, 2]


class _BrokenFor(WebhookSender):
    """A sender whose attempts at one URL fail in a way no attempt should (a bug, say)."""

    def __init__(self, url: str) -> None:
        super().__init__(allow_private=True)
        self.url = url

    async def send(self, url: str, *args: Any) -> AttemptResult:
        if url == self.url:
            raise RuntimeError("unexpected\x00failure")
        return await super().send(url, *args)


def test_an_attempt_that_fails_unexpectedly_is_recorded_and_stops_no_other(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    broken, healthy = receivers(), receivers()
    account, other = world.account(), world.account()
    broken_id = world.endpoint(account, broken)
    world.endpoint(other, healthy)
    for owner in (account, other):
        shipment, _ = world.shipment(owner)
        for _ in range(3):
            world.event(shipment)

    assert world.deliver(T0, sender=_BrokenFor(broken.url)) == 4
    assert len(healthy.received) == 3
    first = world.deliveries(broken_id)[0]
    assert first.state == "pending"
    assert T0 + RETRY_DELAYS[0] * 0.8 <= first.next_attempt_at <= T0 + RETRY_DELAYS[0] * 1.2
    (failure,) = world.attempts(first.id)
    assert failure.error == "internal error: RuntimeError: unexpected\ufffdfailure"


# --- At least once ---------------------------------------------------------------------------

CHILD = """
import asyncio
import sys
from datetime import datetime
from worker.core.config import load_settings
from worker.core.db import session_factory
from worker.notify.delivery import fan_out_and_deliver
from worker.notify.webhooks.sender import WebhookSender

settings = load_settings()

async def run():
    async with WebhookSender(allow_private=settings.webhook_allow_private) as sender:
        await fan_out_and_deliver(
            session_factory(settings.database_url), settings, sender,
            secret_key=settings.secret_key.get_secret_value(),
            now=datetime.fromisoformat(sys.argv[1]),
        )

asyncio.run(run())
"""


def test_a_worker_killed_mid_delivery_loses_nothing(
    world: World, receivers: Callable[..., Receiver], servers: RunServers
) -> None:
    arrived, release = threading.Event(), threading.Event()

    async def hold(received: Received) -> tuple[int, dict[str, str]]:
        arrived.set()
        await asyncio.to_thread(release.wait, 30)
        return 200, {}

    receiver = receivers(hold)
    account = world.account()
    endpoint = world.endpoint(account, receiver)
    shipment, _ = world.shipment(account)
    _, event_id = world.event(shipment)

    env = servers.env(SHIPMON_WEBHOOK_ALLOW_PRIVATE="true")
    child = subprocess.Popen([sys.executable, "-c", CHILD, T0.isoformat()], env=env)
    try:
        assert arrived.wait(60), "the worker never sent the webhook"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        release.set()
        if child.poll() is None:
            child.kill()
            child.wait()

    (delivery,) = world.deliveries(endpoint)
    assert delivery.state == "pending"
    assert delivery.next_attempt_at == T0 + DEFAULT_LEASE
    world.deliver(T0 + DEFAULT_LEASE - timedelta(seconds=1))
    assert len(receiver.received) == 1
    world.deliver(T0 + DEFAULT_LEASE)

    assert [r.event_id for r in receiver.received] == [event_id, event_id]
    (delivery,) = world.deliveries(endpoint)
    assert delivery.state == "succeeded"
    assert receiver.rejected == []


# --- Locks -----------------------------------------------------------------------------------


def _blocked_or_done(sessions: sessionmaker[Session], thread: threading.Thread) -> None:
    """Wait until another connection of this database waits for a lock, or `thread` ends."""
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    with sessions() as s:
        while thread.is_alive() and datetime.now(UTC) < deadline:
            waiting = s.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
            if waiting:
                return
            thread.join(0.02)


def test_recording_an_attempt_never_deadlocks_with_a_fan_out(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    # The interleaving seen in the fault runs, on two real connections: a fan-out has inserted
    # a delivery for the endpoint (KEY SHARE on it, by the foreign key) when an attempt at
    # another delivery of that endpoint is recorded; then the fan-out, for a later event of the
    # recorded delivery's shipment, locks that delivery to queue behind it.
    receiver = receivers()
    account = world.account()
    endpoint = world.endpoint(account, receiver)
    shipment, _ = world.shipment(account)
    other_shipment, _ = world.shipment(account)
    world.event(shipment)
    with world.sessions.begin() as s:
        fan_out(s, now=T0)
    (claim,), _ = _claim(world.sessions, world.settings, world.secret_key, 1, T0, DEFAULT_LEASE)
    other_event, _ = world.event(other_shipment)
    later_event, _ = world.event(shipment)

    errors: list[BaseException] = []

    def record() -> None:
        try:
            _record(world.sessions, claim, AttemptResult(False, 5, status_code=500), T0, T0, None)
        except BaseException as error:
            errors.append(error)

    with world.sessions.begin() as fanning:
        fan_out(fanning, [other_event], now=T0)
        recorder = threading.Thread(target=record)
        recorder.start()
        _blocked_or_done(world.sessions, recorder)
        fan_out(fanning, [later_event], now=T0)
    recorder.join(30)

    assert errors == []
    first, later = world.deliveries(endpoint)[:2]
    assert (first.sequence, first.state, first.attempts) == (1, "pending", 1)
    assert [a.status_code for a in world.attempts(first.id)] == [500]
    # Queued behind the retry it was fanned out behind.
    assert later.sequence == 2
    assert later.next_attempt_at == first.next_attempt_at > T0 + timedelta(seconds=3)


# --- Replays ---------------------------------------------------------------------------------


def test_replay_resends_an_event_with_the_same_webhook_id(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()
    account = world.account()
    endpoint = world.endpoint(account, receiver)
    shipment, _ = world.shipment(account)
    _, event_id = world.event(shipment)
    world.deliver(T0)

    outcomes = replay(
        world.sessions, world.settings, secret_key=world.secret_key, event_id=event_id
    )

    assert [(o.event_id, o.endpoint_id, o.result.succeeded) for o in outcomes] == [
        (event_id, endpoint, True)
    ]
    assert [r.headers["webhook-id"] for r in receiver.received] == [event_id, event_id]
    assert receiver.rejected == []
    assert len(world.attempts(outcomes[0].delivery_id)) == 2


def test_replay_of_failures_since_a_time_completes_what_it_delivers(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    failing, other = receivers(always(500)), receivers(always(500))
    account = world.account()
    endpoint = world.endpoint(account, failing)
    other_endpoint = world.endpoint(account, other)
    shipment, code = world.shipment(account)
    for _ in range(3):
        world.event(shipment)
    with world.sessions.begin() as s:  # the first event gave up long ago
        fan_out(s, now=T0)
        s.execute(update(Delivery).where(Delivery.sequence == 1, Delivery.endpoint_id.in_(
            [endpoint, other_endpoint])).values(state="dead"))  # fmt: skip
    world.deliver(T0)

    failing.answer = ok
    later = replay(
        world.sessions, world.settings, secret_key=world.secret_key,
        failed_since=datetime.now(UTC) + timedelta(minutes=1),
    )  # fmt: skip
    assert later == []
    outcomes = replay(
        world.sessions, world.settings, secret_key=world.secret_key,
        failed_since=T0 - timedelta(minutes=1), endpoint_id=endpoint, now=T0,
    )  # fmt: skip

    assert [(o.endpoint_id, o.result.succeeded) for o in outcomes] == [(endpoint, True)]
    assert failing.sequences(code) == [2, 2]
    # The third event no longer waits for the second one's retry.
    world.deliver(T0 + timedelta(seconds=1))
    assert failing.sequences(code) == [2, 2, 3]
    assert [d.state for d in world.deliveries(endpoint)] == ["dead", "succeeded", "succeeded"]
    assert [d.state for d in world.deliveries(other_endpoint)] == ["dead", "pending", "pending"]


# --- The commands ----------------------------------------------------------------------------


@pytest.fixture
def shipmon(servers: RunServers) -> Callable[..., Any]:
    runner = CliRunner()

    def run(*args: str, **env: str) -> Any:
        get_settings.cache_clear()
        try:
            return runner.invoke(app, list(args), env=servers.env(**env))
        finally:
            get_settings.cache_clear()

    return run


def test_endpoint_commands(
    world: World, receivers: Callable[..., Receiver], shipmon: Callable[..., Any]
) -> None:
    receiver = receivers()
    account = world.account()
    with world.sessions() as s:
        name = s.get_one(Account, account).name

    refused = shipmon("endpoint", "add", name, receiver.url)
    assert refused.exit_code == 2
    assert "public addresses" in refused.output

    private = {"SHIPMON_WEBHOOK_ALLOW_PRIVATE": "true"}
    added = shipmon("endpoint", "add", name, receiver.url, "--events",
                    "shipment.delayed,shipment.stalled", "--json", **private)  # fmt: skip
    assert added.exit_code == 0, added.output
    created = json.loads(added.output)
    assert created["secret"].startswith("whsec_")
    receiver.secret = created["secret"]
    bad_type = shipmon("endpoint", "add", name, receiver.url, "--events", "shipment.lost")
    assert bad_type.exit_code == 2

    listed = json.loads(shipmon("endpoint", "list", "--account", name, "--json").output)
    assert [(e["id"], e["events"], e["enabled"]) for e in listed] == [
        (created["id"], ["shipment.delayed", "shipment.stalled"], True)
    ]
    assert created["secret"] not in json.dumps(listed)

    tested = shipmon("endpoint", "test", str(created["id"]), **private)
    assert tested.exit_code == 0, tested.output
    assert "HTTP 200" in tested.output
    assert receiver.received[-1].type == "shipment.status_changed"

    rotated = shipmon("endpoint", "rotate-secret", str(created["id"]), "--json")
    new_secret = json.loads(rotated.output)["secret"]
    assert new_secret.startswith("whsec_") and new_secret != created["secret"]
    # The receiver still knows only the old secret, which keeps signing for a day.
    assert shipmon("endpoint", "test", str(created["id"]), **private).exit_code == 0
    assert receiver.rejected == []

    assert shipmon("endpoint", "disable", str(created["id"])).exit_code == 0
    listed = json.loads(shipmon("endpoint", "list", "--account", name, "--json").output)
    assert (listed[0]["enabled"], listed[0]["disabled_reason"]) == (
        False, "disabled by an operator",
    )  # fmt: skip
    assert shipmon("endpoint", "enable", str(created["id"])).exit_code == 0
    assert shipmon("endpoint", "enable", "999999999").exit_code == 2


def test_email_and_replay_commands(
    world: World, receivers: Callable[..., Receiver], shipmon: Callable[..., Any]
) -> None:
    receiver = receivers()
    account = world.account()
    with world.sessions() as s:
        name = s.get_one(Account, account).name
    world.endpoint(account, receiver)
    shipment, _ = world.shipment(account)
    _, event_id = world.event(shipment)
    world.deliver(T0)

    assert shipmon("email", "add", name, "ops@shop.example", "--events",
                   "shipment.delayed").exit_code == 0  # fmt: skip
    assert shipmon("email", "add", name, "ops@shop.example").exit_code == 2
    assert shipmon("email", "add", name, "not-an-address").exit_code == 2
    listed = json.loads(shipmon("email", "list", "--account", name, "--json").output)
    assert [(r["address"], r["events"]) for r in listed] == [
        ("ops@shop.example", ["shipment.delayed"])
    ]
    assert shipmon("email", "remove", name, "ops@shop.example").exit_code == 0
    assert shipmon("email", "remove", name, "ops@shop.example").exit_code == 2
    with world.sessions() as s:
        left = s.scalar(select(func.count()).where(EmailRecipient.account_id == account))
    assert left == 0

    private = {"SHIPMON_WEBHOOK_ALLOW_PRIVATE": "true"}
    replayed = shipmon("webhooks", "replay", event_id, "--json", **private)
    assert replayed.exit_code == 0, replayed.output
    assert [r["event_id"] for r in json.loads(replayed.output)] == [event_id]
    assert [r.event_id for r in receiver.received] == [event_id, event_id]
    since = shipmon("webhooks", "replay", "--failed-since", "2h", "--json", **private)
    assert since.exit_code == 0, since.output
    assert shipmon("webhooks", "replay").exit_code == 2
    assert shipmon("webhooks", "replay", "--failed-since", "yesterday").exit_code == 2
