"""The sandbox served on loopback: carrier semantics, quotas, faults and the admin API."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from worker.domain.vocabulary import ErrorCode
from worker.sim.sandbox import (
    TRACKING_PATH,
    ManualClock,
    SandboxHandle,
    SpeedClock,
    account_key,
    run_sandbox,
    running_sandbox,
)
from worker.sim.workload import DEFAULT_WORKLOAD, Faults, parse_workload

VN = ZoneInfo("Asia/Ho_Chi_Minh")
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=VN)
KEY = "1111-1111-1111-1111-111111111"
OTHER_KEY = "2222-2222-2222-2222-222222222"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def sandbox(clock: ManualClock) -> Iterator[SandboxHandle]:
    with running_sandbox(clock=clock, faults=Faults(), seed=1) as handle:
        handle.add_account("shop-a", KEY)
        handle.add_account("shop-b", OTHER_KEY)
        yield handle


@pytest.fixture
def client(sandbox: SandboxHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.base_url, timeout=5) as http:
        yield http


def track(client: httpx.Client, **params: str) -> dict[str, Any]:
    response = client.get(TRACKING_PATH, params=params)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body: dict[str, Any] = response.json()
    return body


def assert_error(body: dict[str, Any], code: ErrorCode) -> None:
    assert body["errorCode"] == code.value
    assert body["errorMessage"] == code.message
    assert body["orderCode"] is None


# --- the carrier's endpoint ---


def test_a_known_order_answers_its_tracking(sandbox: SandboxHandle, client: httpx.Client) -> None:
    sandbox.add_order(KEY, "TRACK0001", status="DELIVERING")
    body = track(client, ordercode="TRACK0001", apikey=KEY)
    assert body["errorCode"] is None
    assert (body["orderCode"], body["status"], body["statusName"]) == (
        "TRACK0001", "25", "DANGDIPHAT",
    )  # fmt: skip
    assert body["trackingName"] == "Đang đi phát"
    assert body == sandbox.order("TRACK0001")["tracking"]
    assert track(client, ordercode="TRACK0001", apiKey=KEY) == body


def test_every_carrier_error_is_reachable_in_the_carrier_order(
    sandbox: SandboxHandle, client: httpx.Client, clock: ManualClock
) -> None:
    sandbox.add_order(KEY, "MINE00001", status="DELIVERED")
    assert_error(track(client, ordercode="MINE00001"), ErrorCode.MISSING_APIKEY)
    assert_error(track(client, ordercode="x", apikey=""), ErrorCode.MISSING_APIKEY)
    assert_error(track(client, ordercode="x", apikey="nope"), ErrorCode.APIKEY_NOT_FOUND)
    assert_error(track(client, apikey=KEY), ErrorCode.MISSING_ORDERCODE)
    assert_error(track(client, ordercode="ABCD", apikey=KEY), ErrorCode.ORDERCODE_MIN_LENGTH)
    assert_error(track(client, ordercode="A" * 21, apikey=KEY), ErrorCode.ORDERCODE_MAX_LENGTH)
    assert_error(
        track(client, ordercode="ĐƠN-HÀNG1", apikey=KEY), ErrorCode.ORDERCODE_FORMAT_EXCEPTION
    )
    assert_error(track(client, ordercode="NOSUCH001", apikey=KEY), ErrorCode.ORDERCODE_NOT_FOUND)
    assert_error(
        track(client, ordercode="MINE00001", apikey=OTHER_KEY),
        ErrorCode.ORDERCODE_DOES_NOT_BELONG_TO_YOUR_ACCOUNT,
    )
    clock.advance(timedelta(days=91))
    assert_error(
        track(client, ordercode="MINE00001", apikey=KEY), ErrorCode.ORDERCODE_QUERY_EXPIRED
    )
    sandbox.set_faults({"carrier_exception": 1.0})
    assert_error(track(client, ordercode="MINE00001", apikey=KEY), ErrorCode.EXCEPTION)
    # Key checks come before the carrier's own failure.
    assert_error(track(client, ordercode="MINE00001", apikey="nope"), ErrorCode.APIKEY_NOT_FOUND)


def test_an_order_is_not_found_until_the_carrier_registers_it(
    sandbox: SandboxHandle, client: httpx.Client, clock: ManualClock
) -> None:
    truth = sandbox.add_order(KEY, "LATER0001")
    assert truth["status"] is None
    assert_error(truth["tracking"], ErrorCode.ORDERCODE_NOT_FOUND)
    assert_error(track(client, ordercode="LATER0001", apikey=KEY), ErrorCode.ORDERCODE_NOT_FOUND)
    if truth["next_transition"] is None:  # drawn into the never-found share
        return
    clock.set(datetime.fromisoformat(truth["next_transition"]["at"]))
    assert track(client, ordercode="LATER0001", apikey=KEY)["status"] == "21"


def test_the_key_quota_runs_out_and_resets_at_local_midnight(
    sandbox: SandboxHandle, client: httpx.Client, clock: ManualClock
) -> None:
    sandbox.add_account("tiny", "tiny-key", daily_quota=2)
    sandbox.add_order("tiny-key", "QUOTA0001", status="IN_TRANSIT")
    clock.set(datetime(2026, 3, 2, 23, 59, 59, tzinfo=VN))
    answers = [track(client, ordercode="QUOTA0001", apikey="tiny-key") for _ in range(3)]
    assert [a["errorCode"] for a in answers] == [None, None, "APIKEY_LIMIT"]
    assert sandbox.stats()["requests"]["per_key"]["tiny-key"] == 3
    clock.set(datetime(2026, 3, 3, 0, 0, tzinfo=VN))
    assert track(client, ordercode="QUOTA0001", apikey="tiny-key")["errorCode"] is None
    stats = sandbox.stats()
    assert stats["carrier_day"] == "2026-03-03"
    assert stats["requests"] == {"total": 1, "per_key": {"tiny-key": 1}}


def test_the_global_cap_counts_every_request() -> None:
    with (
        running_sandbox(clock=ManualClock(T0), faults=Faults(), global_daily_quota=2) as sandbox,
        httpx.Client(base_url=sandbox.base_url) as client,
    ):
        sandbox.add_account("shop-a", KEY)
        sandbox.add_order(KEY, "GLOBAL001", status="IN_TRANSIT")
        assert_error(track(client, ordercode="GLOBAL001"), ErrorCode.MISSING_APIKEY)
        assert track(client, ordercode="GLOBAL001", apikey=KEY)["errorCode"] is None
        assert_error(track(client, ordercode="GLOBAL001", apikey=KEY), ErrorCode.APIKEY_LIMIT)


def test_speed_runs_sandbox_time_faster() -> None:
    real_start = time.monotonic()
    clock = SpeedClock(speed=3600, start=T0)
    with running_sandbox(clock=clock, faults=Faults()) as sandbox:
        first = datetime.fromisoformat(sandbox.stats()["now"])
        second = datetime.fromisoformat(sandbox.stats()["now"])
    elapsed = time.monotonic() - real_start
    assert T0 <= first <= second <= T0 + timedelta(seconds=elapsed * 3600)


# --- faults ---


def test_http_500_faults_still_count_toward_the_quota(
    sandbox: SandboxHandle, client: httpx.Client
) -> None:
    sandbox.add_order(KEY, "FAULT0001", status="IN_TRANSIT")
    sandbox.set_faults({"http_500": 1.0})
    for _ in range(3):
        assert (
            client.get(TRACKING_PATH, params={"ordercode": "FAULT0001", "apikey": KEY}).status_code
            == 500
        )
    stats = sandbox.stats()
    assert stats["requests"]["per_key"][KEY] == 3
    assert stats["faults"]["http_500"] == 3


def test_malformed_faults_give_truncated_json_or_html_pages(
    sandbox: SandboxHandle, client: httpx.Client
) -> None:
    sandbox.add_order(KEY, "FAULT0002", status="IN_TRANSIT")
    sandbox.set_faults({"malformed": 1.0})
    kinds = set()
    for _ in range(30):
        response = client.get(TRACKING_PATH, params={"ordercode": "FAULT0002", "apikey": KEY})
        with pytest.raises(json.JSONDecodeError):
            json.loads(response.content)
        kinds.add(response.headers["content-type"].split(";")[0])
    assert kinds == {"application/json", "text/html"}
    assert sandbox.stats()["faults"]["malformed"] == 30


def test_timeout_faults_hold_the_connection_then_drop_it(
    sandbox: SandboxHandle, client: httpx.Client
) -> None:
    sandbox.add_order(KEY, "FAULT0003", status="IN_TRANSIT")
    sandbox.set_faults({"timeout": 1.0, "hang_seconds": 0.3})
    params = {"ordercode": "FAULT0003", "apikey": KEY}
    with pytest.raises(httpx.ReadTimeout):
        client.get(TRACKING_PATH, params=params, timeout=0.05)
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(TRACKING_PATH, params=params)
    assert time.monotonic() - started >= 0.3
    assert sandbox.stats()["faults"]["timeout"] == 2


def test_slow_faults_delay_the_answer(sandbox: SandboxHandle, client: httpx.Client) -> None:
    sandbox.add_order(KEY, "FAULT0004", status="IN_TRANSIT")
    sandbox.set_faults({"slow_ms": [150, 150]})
    started = time.monotonic()
    assert track(client, ordercode="FAULT0004", apikey=KEY)["status"] == "24"
    assert time.monotonic() - started >= 0.15
    assert sandbox.stats()["faults"]["slow"] == 1


def test_the_workload_faults_apply_by_default() -> None:
    data = copy.deepcopy(DEFAULT_WORKLOAD)
    data["faults"] = {"http_500": 1.0}
    with (
        running_sandbox(workload=parse_workload(data), clock=ManualClock(T0)) as sandbox,
        httpx.Client(base_url=sandbox.base_url) as client,
    ):
        assert (
            client.get(TRACKING_PATH, params={"ordercode": "ANY00001", "apikey": KEY}).status_code
            == 500
        )


# --- the admin API ---


def test_admin_accounts(sandbox: SandboxHandle) -> None:
    created = sandbox.admin.post(
        "/_sandbox/accounts", json={"name": "shop-c", "apikey": "key-c", "daily_quota": 10}
    )
    assert created.status_code == 201
    assert created.json() == {"name": "shop-c", "apikey": "key-c", "daily_quota": 10}
    assert sandbox.add_account("shop-d", "key-d")["daily_quota"] == 200_000
    again = sandbox.admin.post("/_sandbox/accounts", json={"name": "x", "apikey": "key-c"})
    assert again.status_code == 409
    assert "error" in again.json()
    for bad in ({"name": "no key"}, {"name": "", "apikey": "k"}, {"name": "n", "apikey": 3}):
        assert sandbox.admin.post("/_sandbox/accounts", json=bad).status_code == 422
    not_json = sandbox.admin.post("/_sandbox/accounts", content=b"{oops")
    assert not_json.status_code == 422
    assert not_json.json()["error"] == "invalid body"


def test_admin_orders(sandbox: SandboxHandle, clock: ManualClock) -> None:
    truth = sandbox.add_order(KEY, "ADMIN0001", status="PENDING_FOR_PROCEED", delay_code=12)
    assert truth["status"] == {"status": "PENDING_FOR_PROCEED", "carrier_id": 16, "code": "CHOXULY"}
    assert truth["delay_code"] == 12
    assert truth["account"] == "shop-a"
    assert truth["tracking"]["delayCode"] == "12"
    assert [h["status"] for h in truth["history"]] == ["PENDING_FOR_PROCEED"]
    assert datetime.fromisoformat(truth["next_transition"]["at"]) > T0

    def post(body: dict[str, Any]) -> httpx.Response:
        return sandbox.admin.post("/_sandbox/orders", json=body)

    assert post({"apikey": "nope", "order_code": "ADMIN0002"}).status_code == 404
    assert post({"apikey": KEY, "order_code": "ADMIN0001"}).status_code == 409
    refused = post({"apikey": KEY, "order_code": "BAD!CODE"})
    assert refused.status_code == 422
    assert "ORDERCODE_FORMAT_EXCEPTION" in refused.json()["error"]
    assert post({"apikey": KEY, "order_code": "ADMIN0003", "status": "SHIPPED"}).status_code == 422
    assert post({"order_code": "ADMIN0004"}).status_code == 422
    assert post({"apikey": KEY, "order_code": "ADMIN0005", "status": 25}).status_code == 201


def test_admin_advance(sandbox: SandboxHandle, clock: ManualClock, client: httpx.Client) -> None:
    sandbox.add_order(KEY, "MOVE00001", status="IN_TRANSIT")
    clock.advance(timedelta(minutes=10))
    moved = sandbox.advance("MOVE00001", to="DELIVERING")
    assert moved["status"]["status"] == "DELIVERING"
    assert [h["status"] for h in moved["history"]] == ["IN_TRANSIT", "DELIVERING"]
    assert datetime.fromisoformat(moved["history"][1]["at"]) == T0 + timedelta(minutes=10)
    assert track(client, ordercode="MOVE00001", apikey=KEY)["status"] == "25"
    drawn = sandbox.admin.post("/_sandbox/orders/MOVE00001/advance")
    assert drawn.status_code == 200
    assert drawn.json()["status"]["status"] in {"DELIVERED", "PENDING_FOR_PROCEED"}
    sandbox.advance("MOVE00001", to="30")
    ended = sandbox.admin.post("/_sandbox/orders/MOVE00001/advance", json={})
    assert ended.status_code == 409
    assert sandbox.admin.post("/_sandbox/orders/NOSUCH01/advance", json={}).status_code == 404
    bad = sandbox.admin.post("/_sandbox/orders/MOVE00001/advance", json={"to": "NOWHERE"})
    assert bad.status_code == 422
    assert sandbox.admin.get("/_sandbox/orders/NOSUCH01").status_code == 404


def test_admin_faults_are_validated(sandbox: SandboxHandle) -> None:
    assert sandbox.admin.put("/_sandbox/faults", json={"http_500": 2}).status_code == 422
    assert sandbox.admin.put("/_sandbox/faults", json={"slow_ms": [900, 80]}).status_code == 422
    assert sandbox.admin.put("/_sandbox/faults", json={"jitter": 1}).status_code == 422
    answer = sandbox.set_faults({"http_500": 0.25, "slow_ms": [10, 20]})
    assert answer["http_500"] == 0.25
    assert answer["slow_ms"] == [10, 20]


# --- the blocking entry point ---


def test_run_sandbox_serves_a_population_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = copy.deepcopy(DEFAULT_WORKLOAD)
    data.update(orders_per_day=2000, faults={})
    workload = tmp_path / "small.json"
    workload.write_text(json.dumps(data), encoding="utf-8")
    script = (
        "from pathlib import Path; from worker.sim.sandbox import run_sandbox; "
        f"run_sandbox(port=0, workload=Path({str(workload)!r}), speed=3600, seed=5, populate=True)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as process:
        try:
            assert process.stdout is not None
            banner = process.stdout.readline()
            base_url = banner.split("on ", 1)[1].split()[0]
            assert base_url.startswith("http://127.0.0.1:")
            keys = dict(process.stdout.readline().split()[1:4:2] for _ in data["accounts"])
            assert keys == {a["name"] + ":": account_key(a["name"], 5) for a in data["accounts"]}
            with httpx.Client(base_url=base_url, timeout=5) as http:
                deadline = time.monotonic() + 20
                while http.get("/_sandbox/stats").json()["orders"] == 0:
                    assert time.monotonic() < deadline, "no order arrived"
                    time.sleep(0.05)
                params = {"ordercode": "EX005000000001", "apikey": "x"}
                answer = http.get(TRACKING_PATH, params=params)
                assert answer.json()["errorCode"] == "APIKEY_NOT_FOUND"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_run_sandbox_says_when_its_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}"):
            run_sandbox(port=port, seed=1)


def test_an_order_created_past_pickup_has_an_accept_date(sandbox: SandboxHandle) -> None:
    delivering = sandbox.add_order(KEY, "PICKED001", status="DELIVERING")["tracking"]
    assert delivering["acceptDate"] == delivering["statuses"][0]["time"]
    assert delivering["acceptDate"].endswith("+07:00")
    accepted = sandbox.add_order(KEY, "PICKED002", status="ACCEPTED")["tracking"]
    assert accepted["acceptDate"] is None


def test_hostile_faults_are_settable_and_counted(
    sandbox: SandboxHandle, client: httpx.Client
) -> None:
    assert sandbox.set_faults({"hostile": 1.0})["hostile"] == 1.0
    assert (
        sandbox.admin.put("/_sandbox/faults", json={"hostile": 0.6, "timeout": 0.5}).status_code
        == 422
    )
    sandbox.add_order(KEY, "HOSTILE01", status="DELIVERING")
    for _ in range(3):
        client.get(TRACKING_PATH, params={"ordercode": "HOSTILE01", "apikey": KEY}).read()
    assert sandbox.stats()["faults"]["hostile"] == 3
