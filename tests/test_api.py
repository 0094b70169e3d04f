"""The HTTP API, served by a real `shipmon api` (uvicorn) on 127.0.0.1, on the run's PostgreSQL
and Redis. Its rows are committed (the server is another process) and deleted at the end."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks as st_checks
from sqlalchemy import delete, select

from tests.conftest import ROOT, TEST_SECRET_KEY, RunServers
from worker.api.tokens import create_token, revoke_token
from worker.core.crypto import encrypt
from worker.core.db import transaction
from worker.domain.deliveries import DeliveryState
from worker.domain.models import (
    Account,
    ApiToken,
    Delivery,
    DeliveryAttempt,
    EmailRecipient,
    OutboxEvent,
    Shipment,
    StatusEvent,
    TrackingEvent,
    WebhookEndpoint,
)
from worker.notify.webhooks.endpoints import add_endpoint
from worker.ops.views import shipment_story
from worker.tracking.intake import register_orders

RATE_LIMIT = 40
# Bounded so the suite stays quick; `benchmarks/api.py --fuzz N` runs longer.
EXAMPLES_PER_OPERATION = 30
PROBLEM = "application/problem+json"
CLI = [sys.executable, "-m", "worker"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Api:
    url: str
    servers: RunServers

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def api(servers: RunServers) -> Iterator[Api]:
    port = _free_port()
    env = servers.env(SHIPMON_API_RATE_LIMIT=str(RATE_LIMIT), SHIPMON_LOG_LEVEL="WARNING")
    process = subprocess.Popen(
        [*CLI, "api", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"shipmon api did not start:\n{output}")
            time.sleep(0.2)
        yield Api(url, servers)
    finally:
        process.terminate()
        process.wait(20)
        if process.stdout:
            process.stdout.close()


@dataclass(frozen=True)
class Merchant:
    name: str
    token: str
    token_id: int


@pytest.fixture
def merchants(servers: RunServers) -> Iterator[list[Merchant]]:
    """Two accounts with a token each, committed; deleted (with all they own) afterwards."""
    made: list[Merchant] = []
    with transaction(servers.database_url) as s:
        for _ in range(2):
            name = f"api-{secrets.token_hex(4)}"
            s.add(
                Account(
                    name=name, api_key_encrypted=encrypt("k", TEST_SECRET_KEY), api_key_hint="k"
                )
            )
            s.flush()
            row, token = create_token(s, name, "test")
            made.append(Merchant(name, token, row.id))
    yield made
    with transaction(servers.database_url) as s:
        s.execute(delete(Account).where(Account.name.in_([m.name for m in made])))


ROUTES = [
    ("POST", "/v1/shipments", {"order_codes": ["SPX0000001"]}),
    ("GET", "/v1/shipments/SPX0000001", None),
    ("GET", "/v1/shipments", None),
    ("DELETE", "/v1/shipments/SPX0000001", None),
    ("GET", "/v1/quota", None),
]


def _is_problem(response: httpx.Response, status: int, error_code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, object] = response.json()
    assert body["error_code"] == error_code
    assert body["status"] == status
    return body


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_refuses_a_missing_wrong_or_revoked_token(
    api: Api, merchants: list[Merchant], method: str, path: str, body: object
) -> None:
    with transaction(api.servers.database_url) as s:
        revoke_token(s, merchants[1].token_id)
    for token in (None, "shm_not-a-token", "Basic abc", merchants[1].token):
        with api.client(token) as client:
            response = client.request(method, path, json=body)
        problem = _is_problem(response, 401, "UNAUTHORIZED")
        assert response.headers["www-authenticate"] == "Bearer"
        assert "Traceback" not in str(problem)


def test_the_read_document_equals_the_show_document_field_for_field(
    api: Api, merchants: list[Merchant]
) -> None:
    """PostgreSQL builds the API's document; `shipmon show --json` builds it in Python. On a
    shipment with every part filled in (scans without names, a delay, deliveries by webhook and
    email with attempts, times with and without microseconds) the two are the same."""
    shop = merchants[0]
    at = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    with transaction(api.servers.database_url) as s:
        account = s.scalars(select(Account).where(Account.name == shop.name)).one()
        register_orders(s, shop.name, ["DOCU00001"])
        shipment = s.scalars(select(Shipment).where(Shipment.order_code == "DOCU00001")).one()
        shipment.status, shipment.status_id, shipment.status_code = ("DELIVERING", 25, "DANGGIAO")
        shipment.tracking_name = "Đang giao hàng"
        shipment.status_changed_at = at + timedelta(microseconds=120)
        shipment.delay_code, shipment.delay_reason, shipment.delay_note = 2, "Hẹn lại", "gọi lại"
        shipment.last_scan_at = at
        shipment.delivery_date = at + timedelta(hours=5, microseconds=999_999)
        shipment.confirm_images = ["https://img.247express.vn/a.jpg"]
        shipment.estimate_routes = [{"from": "HCM", "to": "HN", "days": 2, "fee": 1.5}]
        for status, minutes in (("ACCEPTED", 0), ("DELIVERING", 90)):
            s.add(
                StatusEvent(
                    shipment_id=shipment.id,
                    status=status,
                    occurred_at=at + timedelta(minutes=minutes, microseconds=minutes),
                )
            )
        for i, (office, name) in enumerate(
            (("HCM01", ""), ("HN02", "Bưu cục Hà Nội"), (None, None))
        ):
            s.add(
                TrackingEvent(
                    shipment_id=shipment.id,
                    fingerprint=f"f{i}",
                    status_id=24,
                    status_name="Đang vận chuyển",
                    post_office_id=office,
                    post_office_name=name,
                    province_id="79",
                    occurred_at=at + timedelta(minutes=i) if i < 2 else None,
                    notes='quote " and \\ backslash',
                )
            )
        events = [
            OutboxEvent(
                event_id=f"evt_docu_{secrets.token_hex(6)}",
                account_id=account.id,
                shipment_id=shipment.id,
                type=kind,
                sequence=sequence,
                data=data,
            )
            for sequence, (kind, data) in enumerate(
                (
                    ("shipment.status_changed", {"delay": {"code": 9}}),
                    ("shipment.delayed", {"delay": {"code": 2, "reason": "Hẹn lại"}}),
                    ("shipment.delayed", {"delay": None}),
                ),
                start=1,
            )
        ]
        s.add_all(events)
        endpoint = WebhookEndpoint(
            account_id=account.id,
            url="https://merchant.example/hook",
            secret_encrypted=encrypt("whsec_test", TEST_SECRET_KEY),
        )
        recipient = EmailRecipient(account_id=account.id, address="ops@merchant.example")
        s.add_all([endpoint, recipient])
        s.flush()
        webhook = Delivery(
            event_id=events[0].id, endpoint_id=endpoint.id, shipment_id=shipment.id, sequence=1
        )
        email = Delivery(
            event_id=events[0].id,
            recipient_id=recipient.id,
            shipment_id=shipment.id,
            sequence=1,
            state=DeliveryState.SUCCEEDED,
            completed_at=at,
        )
        s.add_all([webhook, email])
        s.flush()
        s.add_all(
            [
                DeliveryAttempt(delivery_id=webhook.id, status_code=503, duration_ms=12),
                DeliveryAttempt(delivery_id=webhook.id, duration_ms=15000, error="timed out"),
            ]
        )
    with api.client(shop.token) as client:
        answer = client.get("/v1/shipments/DOCU00001")
    assert answer.status_code == 200
    with transaction(api.servers.database_url) as s:
        expected = shipment_story(s, "DOCU00001", shop.name).as_dict()
    assert answer.json() == expected
    # The parts the comparison is about are really there.
    assert len(expected["scans"]) == 3 and expected["scans"][0]["post_office"] == "HCM01"
    assert [d["code"] for d in expected["delays"]] == [2]
    assert [len(d["attempts"]) for d in expected["notifications"][0]["deliveries"]] == [2, 0]


def test_a_token_registers_reads_lists_and_stops_its_shipments(
    api: Api, merchants: list[Merchant]
) -> None:
    shop = merchants[0]
    with api.client(shop.token) as client:
        answer = client.post("/v1/shipments", json={"order_codes": ["APIA00001", "APIA00002", "x"]})
        assert answer.status_code == 200
        assert answer.json() == {
            "registered": ["APIA00001", "APIA00002"],
            "already_registered": [],
            "refused": [{"order_code": "x", "error": "ORDERCODE_MIN_LENGTH"}],
        }
        with transaction(api.servers.database_url) as s:
            # What a poll would have recorded: a status with its history, an estimate, a proof.
            shipment = s.scalars(select(Shipment).where(Shipment.order_code == "APIA00001")).one()
            shipment.status, shipment.status_id, shipment.status_code = (
                "DELIVERED",
                30,
                "PHATTHANHCONG",
            )
            shipment.status_changed_at = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
            shipment.estimate_routes = [{"from": "HCM", "to": "HN", "days": 2}]
            shipment.confirm_images = ["https://img.247express.vn/proof.jpg"]
            s.add(
                StatusEvent(
                    shipment_id=shipment.id,
                    status="DELIVERED",
                    status_id=30,
                    status_code="PHATTHANHCONG",
                    occurred_at=shipment.status_changed_at,
                )
            )
        one = client.get("/v1/shipments/APIA00001")
        assert one.status_code == 200
        with transaction(api.servers.database_url) as s:
            assert one.json() == shipment_story(s, "APIA00001", shop.name).as_dict()
        current = one.json()["current"]
        assert current["status"]["name"] == "DELIVERED"
        assert current["estimate_routes"] == [{"from": "HCM", "to": "HN", "days": 2}]
        assert current["confirm_images"] == ["https://img.247express.vn/proof.jpg"]
        assert [e["status"] for e in one.json()["statuses"]] == ["DELIVERED"]
        page = client.get("/v1/shipments").json()
        assert [s["order_code"] for s in page["shipments"]] == ["APIA00001", "APIA00002"]
        assert page["next_cursor"] is None
        delivered = client.get("/v1/shipments", params={"status": "30"}).json()["shipments"]
        assert [s["order_code"] for s in delivered] == ["APIA00001"]
        # Registered, changed or scanned since: nothing has happened after now.
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert client.get("/v1/shipments", params={"changed_since": later}).json() == {
            "shipments": [],
            "next_cursor": None,
        }

        stopped = client.delete("/v1/shipments/APIA00002")
        assert stopped.status_code == 200
        assert stopped.json()["current"]["active"] is False
        assert stopped.json()["current"]["stopped_reason"] == "stopped_by_merchant"
        # Stopping again is harmless and announces nothing new.
        assert client.delete("/v1/shipments/APIA00002").status_code == 200

        quota = client.get("/v1/quota")
        assert quota.status_code == 200
        assert [row["account"] for row in quota.json()] == [shop.name]
    with transaction(api.servers.database_url) as s:
        events = s.scalars(
            select(OutboxEvent)
            .join(Shipment, Shipment.id == OutboxEvent.shipment_id)
            .where(Shipment.order_code == "APIA00002")
        ).all()
        assert [(e.type, e.data["reason"]) for e in events] == [
            ("shipment.polling_stopped", "stopped_by_merchant")
        ]
        assert s.scalar(select(Shipment.active).where(Shipment.order_code == "APIA00002")) is False


def test_another_accounts_code_answers_exactly_like_an_unknown_one(
    api: Api, merchants: list[Merchant]
) -> None:
    shop, other = merchants
    with api.client(shop.token) as client:
        client.post("/v1/shipments", json={"order_codes": ["APIB00001"]})
    with api.client(other.token) as client:
        for method in ("GET", "DELETE"):
            theirs = client.request(method, "/v1/shipments/APIB00001")
            unknown = client.request(method, "/v1/shipments/APIB99999")
            _is_problem(theirs, 404, "ORDERCODE_NOT_FOUND")
            assert theirs.content == unknown.content
            assert theirs.headers["content-type"] == unknown.headers["content-type"]
        assert client.get("/v1/shipments").json()["shipments"] == []
    with transaction(api.servers.database_url) as s:
        assert s.scalar(select(Shipment.active).where(Shipment.order_code == "APIB00001")) is True


def test_a_revoked_token_stops_working_at_once(api: Api, merchants: list[Merchant]) -> None:
    shop = merchants[0]
    with api.client(shop.token) as client:
        assert client.get("/v1/shipments").status_code == 200
        with transaction(api.servers.database_url) as s:
            revoke_token(s, shop.token_id)
        _is_problem(client.get("/v1/shipments"), 401, "UNAUTHORIZED")


def test_pages_return_every_row_exactly_once_while_rows_are_inserted(
    api: Api, merchants: list[Merchant]
) -> None:
    shop = merchants[0]
    existing = [f"PAGE{i:05d}" for i in range(0, 1000, 2)]
    with transaction(api.servers.database_url) as s:
        register_orders(s, shop.name, existing)
    stop = threading.Event()

    def insert_meanwhile() -> None:
        # Codes that sort before, between and after the existing ones, committed one by one.
        i = 1
        while not stop.is_set() and i < 1000:
            with transaction(api.servers.database_url) as s:
                register_orders(s, shop.name, [f"PAGE{i:05d}", f"AAAA{i:05d}", f"ZZZZ{i:05d}"])
            i += 2

    inserter = threading.Thread(target=insert_meanwhile)
    inserter.start()
    seen: list[str] = []
    try:
        with api.client(shop.token) as client:
            cursor = None
            while True:
                params = {"limit": 37} | ({"cursor": cursor} if cursor else {})
                response = client.get("/v1/shipments", params=params)
                if response.status_code == 429:
                    time.sleep(float(response.headers["retry-after"][0]))
                    continue
                page = response.json()
                seen.extend(s["order_code"] for s in page["shipments"])
                cursor = page["next_cursor"]
                if cursor is None:
                    break
    finally:
        stop.set()
        inserter.join()
    assert len(seen) == len(set(seen))
    assert set(existing) <= set(seen)
    assert seen == sorted(seen)


def test_intake_over_http_equals_the_celery_task_and_the_cli(
    api: Api, merchants: list[Merchant], servers: RunServers
) -> None:
    codes = ["SAME00001", "SAME00002", "SAME00001", "bad code!", "", "X" * 21, "abc"]
    shop, other = merchants
    with transaction(servers.database_url) as s:
        s.add(Account(name=f"{shop.name}-cli", api_key_encrypted="", api_key_hint=""))
        register_orders(s, shop.name, ["SAME00002"])
        register_orders(s, other.name, ["SAME00002"])
        register_orders(s, f"{shop.name}-cli", ["SAME00002"])
    try:
        with api.client(shop.token) as client:
            over_http = client.post("/v1/shipments", json={"order_codes": codes}).json()
        task = subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, sys; from worker.runtime.tasks import register_orders; "
                "print(json.dumps(register_orders.apply(args=json.loads(sys.argv[1])).get()))",
                json.dumps([other.name, codes]),
            ],
            env=servers.env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        cli = subprocess.run(
            [*CLI, "track", "--account", f"{shop.name}-cli", "--json", "--", *codes],
            env=servers.env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert over_http["refused"], over_http
        assert over_http == json.loads(task.stdout.strip().splitlines()[-1])
        assert over_http == json.loads(cli.stdout)
    finally:
        with transaction(servers.database_url) as s:
            s.execute(delete(Account).where(Account.name == f"{shop.name}-cli"))


def test_errors_are_problems_with_an_error_code(api: Api, merchants: list[Merchant]) -> None:
    with api.client(merchants[0].token) as client:
        _is_problem(client.get("/nowhere"), 404, "NOT_FOUND")
        _is_problem(client.put("/v1/quota"), 405, "METHOD_NOT_ALLOWED")
        bad = _is_problem(client.post("/v1/shipments", json={"codes": 1}), 422, "VALIDATION_ERROR")
        assert "errors" in bad
        _is_problem(
            client.post(
                "/v1/shipments", content=b"{not json", headers={"content-type": "application/json"}
            ),
            422,
            "VALIDATION_ERROR",
        )
        not_utf8 = client.post(
            "/v1/shipments", content=b"S,\xff\xfe", headers={"content-type": "application/json"}
        )
        _is_problem(not_utf8, 422, "VALIDATION_ERROR")
        too_many = {"order_codes": [f"MANY{i:06d}" for i in range(10_001)]}
        _is_problem(client.post("/v1/shipments", json=too_many), 422, "VALIDATION_ERROR")
        _is_problem(client.get("/v1/shipments", params={"limit": 501}), 422, "VALIDATION_ERROR")
        _is_problem(client.get("/v1/shipments", params={"cursor": "Zm9v"}), 422, "VALIDATION_ERROR")
        naive = {"changed_since": "2026-01-01T00:00:00"}
        _is_problem(client.get("/v1/shipments", params=naive), 422, "VALIDATION_ERROR")
        nul = {"status": "DELIVERED\x00"}
        _is_problem(client.get("/v1/shipments", params=nul), 422, "VALIDATION_ERROR")


def test_bodies_over_a_mebibyte_get_413_before_parsing(api: Api, merchants: list[Merchant]) -> None:
    big = b'{"order_codes": ["' + b"A" * (1024 * 1024) + b'"]}'
    with api.client(merchants[0].token) as client:
        _is_problem(client.post("/v1/shipments", content=big), 413, "PAYLOAD_TOO_LARGE")

        def chunks() -> Iterator[bytes]:
            # No Content-Length: the body streams in, and the limit stops it all the same.
            for _ in range(20):
                yield b"A" * 65536

        _is_problem(client.post("/v1/shipments", content=chunks()), 413, "PAYLOAD_TOO_LARGE")
    # Just under the limit is read and parsed.
    with api.client(merchants[0].token) as client:
        ok = client.post("/v1/shipments", json={"order_codes": ["B" * 5] * 50_000})
        _is_problem(ok, 422, "VALIDATION_ERROR")


def test_a_token_over_its_rate_gets_429_with_retry_after(
    api: Api, merchants: list[Merchant]
) -> None:
    shop, other = merchants
    with api.client(shop.token) as client:
        answers = [client.get("/v1/quota") for _ in range(RATE_LIMIT * 3)]
    limited = [a for a in answers if a.status_code == 429]
    assert limited, [a.status_code for a in answers]
    _is_problem(limited[0], 429, "RATE_LIMITED")
    assert 1 <= int(limited[0].headers["retry-after"]) <= 1
    # Another token has a limit of its own.
    with api.client(other.token) as client:
        assert client.get("/v1/quota").status_code == 200


def test_processes_leasing_from_one_window_never_pass_the_limit(servers: RunServers) -> None:
    """Two API processes' limiters share one token's window: together they grant at most the
    limit, and leave unspent at most one lease each."""
    import redis
    import redis.asyncio

    from worker.api.limits import RateLimiter

    limit = 200
    processes = [
        RateLimiter(
            redis.Redis.from_url(servers.redis_url),
            redis.asyncio.Redis.from_url(servers.redis_url),
            limit,
        )
        for _ in range(2)
    ]
    for _ in range(3):  # a try whose asks span two windows (a stalled machine) is repeated
        token_hash = secrets.token_hex(32)
        time.sleep(1.02 - time.time() % 1)  # begin just after a second turns
        window = int(time.time())
        granted = sum(processes[i % 2].retry_after(token_hash) is None for i in range(600))
        refused_after = processes[0].retry_after(token_hash) is not None
        if int(time.time()) == window:
            break
    assert limit - 2 * processes[0].lease <= granted <= limit
    assert refused_after


def test_health_readiness_openapi_and_docs(api: Api) -> None:
    with api.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ok"}
        spec = client.get("/openapi.json").json()
        assert spec["openapi"].startswith("3.1")
        assert {"/v1/shipments", "/v1/shipments/{order_code}", "/v1/quota"} <= set(spec["paths"])
        assert "swagger-ui" in client.get("/docs").text


def test_the_api_conforms_to_its_own_openapi(api: Api, merchants: list[Merchant]) -> None:
    """Generated requests for every operation: no 5xx, and every answer as described."""
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    headers = {"Authorization": f"Bearer {merchants[0].token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 8

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def conforms(case: schemathesis.Case) -> None:
            response = case.call(base_url=api.url, headers=headers)
            if response.status_code == 429:
                time.sleep(float(response.headers["retry-after"][0]))
            case.validate_response(
                response,
                checks=[
                    st_checks.not_a_server_error,
                    st_checks.status_code_conformance,
                    st_checks.content_type_conformance,
                    st_checks.response_schema_conformance,
                ],
            )

        conforms()


def _cli(servers: RunServers, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=servers.env(), cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_token_cli_shows_a_token_once_lists_without_it_and_revokes(
    api: Api, merchants: list[Merchant]
) -> None:
    shop = merchants[0]
    created = _cli(api.servers, "token", "create", shop.name, "--name", "erp")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("shm_")
    with api.client(token) as client:
        assert client.get("/v1/shipments").status_code == 200
    listed = _cli(api.servers, "token", "list", shop.name, "--json")
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["test", "erp"]
    assert token not in listed.stdout
    with transaction(api.servers.database_url) as s:
        assert s.scalar(select(ApiToken.token_hash).where(ApiToken.id == rows[1]["id"])) != token
    assert _cli(api.servers, "token", "revoke", str(rows[1]["id"])).returncode == 0
    with api.client(token) as client:
        _is_problem(client.get("/v1/shipments"), 401, "UNAUTHORIZED")
    unknown = _cli(api.servers, "token", "revoke", "999999999")
    assert unknown.returncode != 0
    assert "shipmon token list" in unknown.stderr


def test_untrack_stops_polling_as_the_api_delete_does(api: Api, merchants: list[Merchant]) -> None:
    shop = merchants[0]
    with transaction(api.servers.database_url) as s:
        register_orders(s, shop.name, ["UNTR00001", "UNTR00002"])
    done = _cli(api.servers, "untrack", "--account", shop.name, "UNTR00001")
    assert done.returncode == 0, done.stderr
    missing = _cli(api.servers, "untrack", "--account", shop.name, "UNTR00002", "UNTR09999")
    assert missing.returncode == 1
    with transaction(api.servers.database_url) as s:
        rows = dict(
            s.execute(
                select(Shipment.order_code, Shipment.stopped_reason).where(
                    Shipment.order_code.in_(["UNTR00001", "UNTR00002"])
                )
            ).all()
        )
        # All or nothing: the unknown code kept UNTR00002 tracked.
        assert rows == {"UNTR00001": "stopped_by_merchant", "UNTR00002": None}
        reasons = s.scalars(
            select(OutboxEvent.data["reason"].astext)
            .join(Shipment, Shipment.id == OutboxEvent.shipment_id)
            .where(Shipment.order_code == "UNTR00001")
        ).all()
        assert reasons == ["stopped_by_merchant"]


def test_an_endpoint_and_an_account_can_be_removed(api: Api, merchants: list[Merchant]) -> None:
    shop = merchants[0]
    with transaction(api.servers.database_url) as s:
        account = s.scalars(select(Account).where(Account.name == shop.name)).one()
        endpoint, _ = add_endpoint(
            s,
            account,
            "http://127.0.0.1:9/hooks",
            None,
            secret_key=TEST_SECRET_KEY,
            allow_private=True,
        )
        endpoint_id = endpoint.id
        register_orders(s, shop.name, ["GONE00001"])
    assert _cli(api.servers, "endpoint", "remove", str(endpoint_id)).returncode == 0
    assert _cli(api.servers, "endpoint", "remove", str(endpoint_id)).returncode != 0
    assert _cli(api.servers, "account", "remove", shop.name, "--yes").returncode == 0
    with transaction(api.servers.database_url) as s:
        assert s.get(WebhookEndpoint, endpoint_id) is None
        assert s.scalar(select(Account.id).where(Account.name == shop.name)) is None
        assert s.scalar(select(Shipment.id).where(Shipment.order_code == "GONE00001")) is None
    with api.client(shop.token) as client:
        _is_problem(client.get("/v1/shipments"), 401, "UNAUTHORIZED")
