"""The sandbox pushing status changes to a real receiver on loopback, as the carrier does."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from aiohttp import web

from worker.carrier.push import parse_push
from worker.sim.sandbox import (
    PUSH_RETRY_BACKOFF_S,
    ManualClock,
    SandboxHandle,
    lognormal,
    running_sandbox,
)
from worker.sim.workload import Faults

VN = ZoneInfo("Asia/Ho_Chi_Minh")
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=VN)
KEY = "1111-1111-1111-1111-111111111"
_OK = {"IsError": False, "ErrorMessage": ""}


class Receiver:
    """An HTTP receiver on 127.0.0.1 that records each push's raw body and answers as told.

    `answers` is consumed one per push, as (HTTP status, JSON answer); when it is empty the
    receiver answers `default`.
    """

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.answers: list[tuple[int, dict[str, Any]]] = []
        self.default: tuple[int, dict[str, Any]] = (200, _OK)
        self._lock = threading.Lock()
        self.url = ""

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.bodies.append(body)
            status, answer = self.answers.pop(0) if self.answers else self.default
        return web.json_response(answer, status=status)

    @property
    def pushes(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(body) for body in self.bodies]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    recorder = Receiver()
    app = web.Application()
    app.router.add_post("/carrier/247/status", recorder._receive)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    loop = asyncio.new_event_loop()

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    thread = threading.Thread(target=loop.run_forever, name="receiver", daemon=True)
    thread.start()
    try:
        port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
        recorder.url = f"http://127.0.0.1:{port}/carrier/247/status"
        yield recorder
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def sandbox(clock: ManualClock) -> Iterator[SandboxHandle]:
    with running_sandbox(clock=clock, faults=Faults(), seed=3) as handle:
        handle.add_account("shop-a", KEY)
        yield handle


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait until `condition` holds; the deadline only bounds a hung run, it asserts no speed."""
    deadline = time.monotonic() + 15
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what}")
        time.sleep(0.01)


def pushes_stats(sandbox: SandboxHandle) -> dict[str, Any]:
    stats: dict[str, Any] = sandbox.stats()["pushes"]
    return stats


def settled(sandbox: SandboxHandle) -> Callable[[], bool]:
    return lambda: pushes_stats(sandbox)["pending"] == 0


def step(sandbox: SandboxHandle, clock: ManualClock, code: str, times: int) -> None:
    """Advance `code` `times` times through the admin API, a minute apart on the clock."""
    for _ in range(times):
        clock.advance(timedelta(minutes=1))
        sandbox.advance(code)


def test_every_transition_arrives_with_the_carriers_fields(
    sandbox: SandboxHandle, receiver: Receiver, clock: ManualClock
) -> None:
    sandbox.set_push({"url": receiver.url})
    sandbox.add_order(KEY, "EX0001", status="ACCEPTED")
    step(sandbox, clock, "EX0001", 3)
    history = sandbox.order("EX0001")["history"]
    assert len(history) == 4
    wait_for(lambda: len(receiver.bodies) == 4, "four pushes")

    arrived = sorted(receiver.pushes, key=lambda push: str(push["Time"]))
    previous = ""
    for push, transition, raw in zip(arrived, history, receiver.bodies, strict=True):
        assert push["ApiKey"] == KEY
        assert push["OrderCode"] == "EX0001"
        assert push["Status"] == str(transition["carrier_id"])
        assert push["StatusName"] == transition["code"]
        assert push["Description"] == f"Change order status: {previous} ==> {transition['code']}"
        assert isinstance(push["ExternalCode"], str) and push["ExternalCode"].startswith("SO")
        assert isinstance(push["RequestFeedbackCount"], int)
        assert isinstance(push["ReceiverName"], str)
        assert push["Time"].endswith("+07:00")
        assert len(push["Time"].split(".")[1].split("+")[0]) == 7
        assert uuid.UUID(push["TransactionId"]).version == 4
        parsed = parse_push(raw)  # what shipmon's receiver accepts
        assert parsed.time == datetime.fromisoformat(transition["at"])
        assert parsed.status is not None and parsed.status.value == transition["status"]
        previous = transition["code"]
    assert len({push["TransactionId"] for push in arrived}) == 4
    wait_for(settled(sandbox), "no pending push")
    stats = pushes_stats(sandbox)
    assert stats["sent"] == 4
    assert stats["url"] == receiver.url
    assert stats["failed"] == stats["dropped"] == stats["duplicated"] == 0


def test_a_delivered_push_carries_the_delivery(
    sandbox: SandboxHandle, receiver: Receiver, clock: ManualClock
) -> None:
    sandbox.set_push({"url": receiver.url})
    sandbox.add_order(KEY, "EX0002", status="DELIVERING")
    clock.advance(timedelta(minutes=5))
    sandbox.advance("EX0002", to="DELIVERED")
    wait_for(lambda: len(receiver.bodies) == 2, "two pushes")
    delivered = next(push for push in receiver.pushes if push["StatusName"] == "PHATTHANHCONG")
    local = clock.now().astimezone(VN).strftime("%Y-%m-%d %H:%M:%S")
    assert delivered["DeliveryDate"] == local
    assert isinstance(delivered["DeliveryNotes"], str)
    assert isinstance(delivered["Mailman"], str)
    assert delivered["DelayCode"] is None


def test_drop_one_sends_nothing(
    sandbox: SandboxHandle, receiver: Receiver, clock: ManualClock
) -> None:
    sandbox.set_push({"url": receiver.url, "drop": 1.0})
    sandbox.add_order(KEY, "EX0003", status="ACCEPTED")
    step(sandbox, clock, "EX0003", 2)
    wait_for(lambda: pushes_stats(sandbox)["dropped"] == 3, "three drops")
    stats = pushes_stats(sandbox)
    assert stats["sent"] == stats["pending"] == 0
    assert receiver.bodies == []


def test_duplicate_one_sends_each_twice_with_one_transaction_id(
    sandbox: SandboxHandle, receiver: Receiver, clock: ManualClock
) -> None:
    sandbox.set_push({"url": receiver.url, "duplicate": 1.0})
    sandbox.add_order(KEY, "EX0004", status="ACCEPTED")
    step(sandbox, clock, "EX0004", 1)
    wait_for(lambda: len(receiver.bodies) == 4, "four pushes")
    wait_for(settled(sandbox), "no pending push")
    by_transaction: dict[str, list[bytes]] = {}
    for raw in receiver.bodies:
        by_transaction.setdefault(json.loads(raw)["TransactionId"], []).append(raw)
    assert len(by_transaction) == 2
    assert all(len(copies) == 2 and copies[0] == copies[1] for copies in by_transaction.values())
    stats = pushes_stats(sandbox)
    assert stats["duplicated"] == 2
    assert stats["sent"] == 4


def test_a_failed_push_is_retried_with_backoff(
    sandbox: SandboxHandle, receiver: Receiver, clock: ManualClock
) -> None:
    # A 500, then a 200 that says it failed: the carrier retries both.
    receiver.answers = [(500, {}), (200, {"IsError": True, "ErrorMessage": "try later"})]
    sandbox.set_push({"url": receiver.url})
    sandbox.add_order(KEY, "EX0005", status="ACCEPTED")
    wait_for(lambda: pushes_stats(sandbox)["failed"] == 1, "the first failure")
    assert len(receiver.bodies) == 1
    clock.advance(timedelta(seconds=PUSH_RETRY_BACKOFF_S[0]))
    wait_for(lambda: pushes_stats(sandbox)["failed"] == 2, "the second failure")
    clock.advance(timedelta(seconds=PUSH_RETRY_BACKOFF_S[1]))
    wait_for(lambda: pushes_stats(sandbox)["sent"] == 1, "the push taken on its third try")
    assert len(receiver.bodies) == 3
    assert len({json.loads(raw)["TransactionId"] for raw in receiver.bodies}) == 1
    stats = pushes_stats(sandbox)
    assert stats["retried"] == 2
    assert stats["given_up"] == 0


def test_a_push_always_refused_is_given_up(
    sandbox: SandboxHandle, receiver: Receiver, clock: ManualClock
) -> None:
    receiver.default = (404, {"detail": "Not Found"})
    sandbox.set_push({"url": receiver.url})
    sandbox.add_order(KEY, "EX0006", status="ACCEPTED")
    for attempt, backoff in enumerate(PUSH_RETRY_BACKOFF_S, start=1):
        wait_for(lambda n=attempt: pushes_stats(sandbox)["failed"] == n, f"failure {attempt}")
        clock.advance(timedelta(seconds=backoff))
    wait_for(lambda: pushes_stats(sandbox)["given_up"] == 1, "the push given up")
    assert len(receiver.bodies) == len(PUSH_RETRY_BACKOFF_S) + 1
    assert pushes_stats(sandbox)["pending"] == 0


def test_a_push_to_nobody_listening_is_given_up(sandbox: SandboxHandle, clock: ManualClock) -> None:
    with socket.socket() as probe:  # a loopback port just freed: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sandbox.set_push({"url": f"http://127.0.0.1:{port}/carrier/247/status"})
    sandbox.add_order(KEY, "EX0007", status="ACCEPTED")
    for attempt, backoff in enumerate(PUSH_RETRY_BACKOFF_S, start=1):
        wait_for(lambda n=attempt: pushes_stats(sandbox)["failed"] == n, f"failure {attempt}")
        clock.advance(timedelta(seconds=backoff))
    wait_for(lambda: pushes_stats(sandbox)["given_up"] == 1, "the push given up")


def test_a_null_url_stops_pushing(
    sandbox: SandboxHandle, receiver: Receiver, clock: ManualClock
) -> None:
    sandbox.set_push({"url": receiver.url})
    sandbox.add_order(KEY, "EX0008", status="ACCEPTED")
    wait_for(lambda: len(receiver.bodies) == 1, "the first push")
    sandbox.set_push({"url": None})
    step(sandbox, clock, "EX0008", 1)  # not pushed
    sandbox.set_push({"url": receiver.url})
    step(sandbox, clock, "EX0008", 1)
    wait_for(lambda: len(receiver.bodies) == 2, "the push after restarting")
    wait_for(settled(sandbox), "no pending push")
    history = sandbox.order("EX0008")["history"]
    pushed = sorted(push["StatusName"] for push in receiver.pushes)
    assert pushed == sorted([history[0]["code"], history[2]["code"]])
    assert pushes_stats(sandbox)["sent"] == 2


def test_delays_reorder_pushes(
    sandbox: SandboxHandle, receiver: Receiver, clock: ManualClock
) -> None:
    sandbox.set_push({"url": receiver.url, "delay_s": [60, 600]})
    codes = [f"EX1{n:03d}" for n in range(12)]
    for code in codes:
        clock.advance(timedelta(seconds=1))
        sandbox.add_order(KEY, code, status="ACCEPTED")

    # Delivered on the sandbox clock: most wait until it passes their delay.
    def queued() -> int:
        stats = pushes_stats(sandbox)
        return int(stats["pending"] + stats["sent"])

    wait_for(lambda: queued() == len(codes), "every push queued")
    assert pushes_stats(sandbox)["pending"] > len(codes) // 2
    for _ in range(120):  # two hours, far past the spread, a minute of sandbox time at a time
        clock.advance(timedelta(minutes=1))
        time.sleep(0.02)
    wait_for(lambda: len(receiver.bodies) >= len(codes), "every order's first push")
    arrived = [push["OrderCode"] for push in receiver.pushes if push["OrderCode"] in codes]
    assert sorted(arrived) == codes
    assert arrived != codes


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"url": "ftp://127.0.0.1/x"},
        {"url": "not a url"},
        {"url": "http://127.0.0.1/x", "drop": 1.5},
        {"url": "http://127.0.0.1/x", "duplicate": -0.1},
        {"url": "http://127.0.0.1/x", "delay_s": [5, 1]},
        {"url": "http://127.0.0.1/x", "delay_s": [1]},
        {"url": "http://127.0.0.1/x", "loss": 0.1},
        {"url": "http://[::1/x"},
        {"url": "http://127.0.0.1/x", "delay_s": [1, 1e9]},
        {"url": "http://127.0.0.1/x", "delay_s": [0, "NaN"]},
    ],
)
def test_bad_push_settings_answer_422(sandbox: SandboxHandle, body: dict[str, Any]) -> None:
    response = httpx.put(sandbox.base_url + "/_sandbox/push", json=body, timeout=5)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid body"
    assert pushes_stats(sandbox)["url"] is None


def test_bad_push_settings_keep_pushing_as_before(
    sandbox: SandboxHandle, receiver: Receiver
) -> None:
    sandbox.set_push({"url": receiver.url})
    response = httpx.put(sandbox.base_url + "/_sandbox/push", json={"drop": 2}, timeout=5)
    assert response.status_code == 422
    sandbox.add_order(KEY, "EX0009", status="ACCEPTED")
    wait_for(lambda: len(receiver.bodies) == 1, "the push")


def test_a_spread_too_wide_to_draw_gives_huge_delays_not_errors() -> None:
    # 2,000 draws from this spread reach far past exp()'s range; each must still be a delay.
    rng = random.Random(0)
    draws = [lognormal(1e-300, 604800, rng) for _ in range(2000)]
    assert all(delay >= 0 for delay in draws)
    assert max(draws) > 604800 * 1e6
