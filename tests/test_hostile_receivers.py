"""Hostile webhook receivers: NUL bytes, 10 MB bodies, tarpits and connection resets.

The promise: every other account's webhooks arrive as usual, nothing crashes the delivery
loop, and every attempt at a hostile receiver is recorded and follows the retry schedule. The
receivers are real servers on 127.0.0.1 (`worker.sim.hostile`); time moves by passing `now`.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import delete, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from tests.conftest import RunServers
from tests.test_outbox import T0, Answer, Received, Receiver, World, ok
from worker.cli.run import start_system
from worker.core.db import session_factory
from worker.domain.models import Account, Delivery, DeliveryAttempt, OutboxEvent, Shipment
from worker.domain.vocabulary import EventType
from worker.notify.delivery import CIRCUIT_AFTER, CIRCUIT_REST, ENDPOINT_IN_FLIGHT
from worker.notify.webhooks.endpoints import add_endpoint
from worker.notify.webhooks.sender import EXCERPT_LIMIT, RETRY_DELAYS, WebhookSender
from worker.runtime.supervisor import Supervisor
from worker.sim.hostile import NUL_BODY, HostileReceiver, Trouble

ROOT = Path(__file__).resolve().parent.parent
# Long enough for a healthy loopback receiver, short enough to keep the tests quick.
ATTEMPT_TIMEOUT = 3.0


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


@pytest.fixture
def hostile() -> Iterator[HostileReceiver]:
    with HostileReceiver(tarpit_interval=1.0) as receiver:
        yield receiver


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def make(answer: Answer = ok) -> Receiver:
        started.append(Receiver(answer))
        return started[-1]

    yield make
    for receiver in started:
        receiver.close()


def hostile_endpoint(world: World, account_id: int, url: str) -> int:
    """An endpoint at a hostile receiver, which verifies nothing and needs no secret."""
    with world.sessions.begin() as s:
        endpoint, _ = add_endpoint(
            s, s.get_one(Account, account_id), url, None,
            secret_key=world.secret_key, allow_private=True,
        )  # fmt: skip
        return endpoint.id


def many_shipments(world: World, account_id: int, count: int) -> None:
    """`count` shipments of the account with one event each, written in one transaction."""
    prefix = secrets.token_hex(3).upper()
    codes = [f"TP{prefix}{n:06d}" for n in range(count)]
    shipments = [
        {"account_id": account_id, "order_code": code, "status": "IN_TRANSIT", "last_sequence": 1}
        for code in codes
    ]
    with world.sessions.begin() as s:
        ids = s.scalars(pg_insert(Shipment).values(shipments).returning(Shipment.id)).all()
        events = [
            {"event_id": f"evt_{secrets.token_hex(13)}", "account_id": account_id,
             "shipment_id": shipment_id, "type": EventType.STATUS_CHANGED, "sequence": 1,
             "data": {"order_code": code, "sequence": 1}}
            for code, shipment_id in zip(codes, ids, strict=True)
        ]  # fmt: skip
        s.execute(insert(OutboxEvent), events)


def deliver(world: World, now: Any) -> int:
    """One delivery run with a sender whose attempts end after ATTEMPT_TIMEOUT."""

    return world.deliver(
        now, sender=WebhookSender(allow_private=True, attempt_timeout=ATTEMPT_TIMEOUT)
    )


def attempts_of(world: World, endpoint_id: int) -> list[DeliveryAttempt]:
    with world.sessions() as s:
        return list(
            s.scalars(
                select(DeliveryAttempt)
                .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                .where(Delivery.endpoint_id == endpoint_id)
                .order_by(DeliveryAttempt.id)
            )
        )


def every_attempt_is_recorded(world: World, endpoint_id: int) -> None:
    with world.sessions() as s:
        claimed = s.scalar(
            select(func.coalesce(func.sum(Delivery.attempts), 0)).where(
                Delivery.endpoint_id == endpoint_id
            )
        )
    assert claimed == len(attempts_of(world, endpoint_id))


def test_hostile_receivers_never_stop_another_accounts_webhooks(
    world: World, hostile: HostileReceiver, receivers: Callable[..., Receiver]
) -> None:
    good = receivers()
    good_account = world.account()
    world.endpoint(good_account, good)
    good_codes = []
    for _ in range(3):
        shipment, code = world.shipment(good_account)
        good_codes.append(code)
        for _ in range(3):
            world.event(shipment)
    endpoints = {}
    for trouble in Trouble:
        account = world.account()
        endpoints[trouble] = hostile_endpoint(world, account, hostile.url(trouble))
        for _ in range(2):
            shipment, _ = world.shipment(account)
            for _ in range(2):
                world.event(shipment)

    deliver(world, T0)

    assert good.rejected == []
    assert [good.sequences(code) for code in good_codes] == [[1, 2, 3]] * 3
    for trouble, endpoint in endpoints.items():
        every_attempt_is_recorded(world, endpoint)
        assert len(attempts_of(world, endpoint)) == hostile.requests[trouble], trouble
    nul = attempts_of(world, endpoints[Trouble.NUL])
    assert [(a.status_code, a.response_excerpt) for a in nul] == [
        (500, NUL_BODY.decode().replace("\x00", "\ufffd"))
    ] * 2
    huge = attempts_of(world, endpoints[Trouble.HUGE])
    assert [a.status_code for a in huge] == [200] * 4
    assert all(len(a.response_excerpt or "") == EXCERPT_LIMIT for a in huge)
    assert {d.state for d in world.deliveries(endpoints[Trouble.HUGE])} == {"succeeded"}
    tarpit = attempts_of(world, endpoints[Trouble.TARPIT])
    assert [(a.status_code, a.error) for a in tarpit] == [
        (None, f"no answer within {ATTEMPT_TIMEOUT:g} s")
    ] * 2
    reset = attempts_of(world, endpoints[Trouble.RESET])
    assert len(reset) == 2 and all(a.status_code is None and a.error for a in reset)
    for trouble in (Trouble.NUL, Trouble.TARPIT, Trouble.RESET):
        first, *_ = world.deliveries(endpoints[trouble])
        assert first.state == "pending", trouble
        assert T0 + RETRY_DELAYS[0] * 0.8 <= first.next_attempt_at <= T0 + RETRY_DELAYS[0] * 1.2


def test_a_receiver_answering_nul_bytes_backs_off_and_its_delivery_dies_on_schedule(
    world: World, hostile: HostileReceiver
) -> None:
    account = world.account()
    endpoint = hostile_endpoint(world, account, hostile.url(Trouble.NUL))
    shipment, _ = world.shipment(account)
    world.event(shipment)
    world.event(shipment)

    now = T0
    for _ in range(len(RETRY_DELAYS) + 1):
        deliver(world, now)
        first = world.deliveries(endpoint)[0]
        if first.state != "pending":
            break
        assert first.next_attempt_at > now + min(RETRY_DELAYS) * 0.8
        now = first.next_attempt_at

    first, second = world.deliveries(endpoint)
    assert (first.state, first.attempts) == ("dead", len(RETRY_DELAYS) + 1)
    # The next event is tried at once and fails alike; nothing is ever stuck.
    assert (second.state, second.attempts) == ("pending", 1)
    every_attempt_is_recorded(world, endpoint)
    assert hostile.requests[Trouble.NUL] == len(RETRY_DELAYS) + 2


def test_a_tarpit_with_a_thousand_waiting_deliveries_starves_no_one(
    world: World, hostile: HostileReceiver, receivers: Callable[..., Receiver]
) -> None:
    tarpit_over: list[int] = []

    async def note_the_tarpit(received: Received) -> tuple[int, dict[str, str]]:
        tarpit_over.append(hostile.finished[Trouble.TARPIT])
        return 200, {}

    good = receivers(note_the_tarpit)
    tarpit_account, good_account = world.account(), world.account()
    tarpit = hostile_endpoint(world, tarpit_account, hostile.url(Trouble.TARPIT))
    many_shipments(world, tarpit_account, 1000)
    world.endpoint(good_account, good)
    good_shipments = [world.shipment(good_account) for _ in range(20)]
    for shipment, _ in good_shipments:
        world.event(shipment)

    deliver(world, T0)

    # The other account's webhooks all arrived while the tarpit's first attempts were still
    # hanging: they waited for nothing.
    assert good.rejected == []
    assert [good.sequences(code) for _, code in good_shipments] == [[1]] * 20
    assert tarpit_over == [0] * 20
    # The tarpit held at most its share of slots, and rests once it failed to answer.
    assert hostile.most_open[Trouble.TARPIT] <= ENDPOINT_IN_FLIGHT
    tried = hostile.requests[Trouble.TARPIT]
    assert CIRCUIT_AFTER <= tried <= ENDPOINT_IN_FLIGHT + CIRCUIT_AFTER - 1
    endpoint = world.endpoint_row(tarpit)
    assert endpoint.circuit_open_until == T0 + CIRCUIT_REST
    assert endpoint.enabled
    deliveries = world.deliveries(tarpit)
    assert len(deliveries) == 1000 and {d.state for d in deliveries} == {"pending"}
    every_attempt_is_recorded(world, tarpit)

    # While it rests, the other account is served and the tarpit gets nothing.
    shipment, code = good_shipments[0]
    world.event(shipment)
    deliver(world, T0 + CIRCUIT_REST - timedelta(seconds=1))
    assert good.sequences(code) == [1, 2]
    assert hostile.requests[Trouble.TARPIT] == tried

    # Then one attempt goes first; it hangs too, and the circuit opens again.
    deliver(world, T0 + CIRCUIT_REST)
    assert hostile.requests[Trouble.TARPIT] == tried + 1
    assert world.endpoint_row(tarpit).circuit_open_until == T0 + 2 * CIRCUIT_REST
    every_attempt_is_recorded(world, tarpit)


# --- Polls and deliveries on processes of their own ------------------------------------------


def _queues(command: list[str]) -> set[str]:
    for flag in ("-Q", "--queues"):
        if flag in command:
            return set(command[command.index(flag) + 1].split(","))
    return set()


# The Celery app resolves its servers when imported: it is imported in a child process that
# is given the test servers.
ROUTES = """
import json
from worker.runtime.celery import app
names = ["shipmon.poll", "shipmon.dispatch", "shipmon.register_orders", "shipmon.deliver",
         "shipmon.sweep_deliveries"]
print(json.dumps({name: app.amqp.router.route({}, name)["queue"].name for name in names}))
"""
POLL_QUEUE, NOTIFY_QUEUE, DEFAULT_QUEUE = "shipmon.polls", "shipmon.notify", "celery"


def test_polls_and_deliveries_run_on_separate_queues_and_processes(servers: RunServers) -> None:
    routes = json.loads(
        subprocess.run(
            [sys.executable, "-c", ROUTES], env=servers.env(), capture_output=True, check=True
        ).stdout
    )
    # Backends send intake by name, knowing no routes: it stays on Celery's default queue,
    # with dispatch, which keeps polls going whatever the receivers do.
    assert routes == {
        "shipmon.poll": POLL_QUEUE,
        "shipmon.dispatch": DEFAULT_QUEUE,
        "shipmon.register_orders": DEFAULT_QUEUE,
        "shipmon.deliver": NOTIFY_QUEUE,
        "shipmon.sweep_deliveries": NOTIFY_QUEUE,
    }

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    workers = {
        name: _queues(service["command"])
        for name, service in compose["services"].items()
        if service.get("command", [])[:4] == ["celery", "-A", "worker", "worker"]
    }
    assert sorted(workers.values(), key=sorted) == [
        {DEFAULT_QUEUE, POLL_QUEUE},
        {NOTIFY_QUEUE},
    ]

    started: dict[str, list[str]] = {}

    class Recorder(Supervisor):
        def start(self, name: str, argv: list[str]) -> None:
            started[name] = argv

    start_system(Recorder({}), 2, "INFO")
    run_workers = [_queues(argv) for argv in started.values() if argv[5] == "worker"]
    assert sorted(run_workers, key=sorted) == [{DEFAULT_QUEUE, POLL_QUEUE}, {NOTIFY_QUEUE}]
