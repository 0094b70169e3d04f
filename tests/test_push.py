"""The carrier's status push: a real `shipmon api` (uvicorn) on 127.0.0.1, on the run's
PostgreSQL and Redis, receiving pushes as 247Express sends them. Rows are committed (the server
is another process) and deleted with their accounts at the end."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import random
import secrets
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import delete, func, select
from standardwebhooks import Webhook

from tests.conftest import ROOT
from tests.test_api import CLI, Api, api  # noqa: F401  (the `api` fixture: a real server)
from worker.api.app import create_app
from worker.api.routes import carrier as carrier_routes
from worker.carrier.parse import parse_tracking
from worker.carrier.push import PushRefused, parse_push
from worker.core.crypto import encrypt, hash_password, keyed_digest
from worker.core.db import session_factory, transaction
from worker.domain.models import Account, OutboxEvent, PushReceipt, Shipment, StatusEvent
from worker.domain.vocabulary import Status
from worker.notify.delivery import fan_out_and_deliver
from worker.notify.webhooks.endpoints import add_endpoint
from worker.notify.webhooks.sender import WebhookSender
from worker.ops.rotation import store_api_key_digests
from worker.runtime.celery import NOTIFY_QUEUE
from worker.scheduling.model import LearnedModel
from worker.scheduling.pricing import INITIAL_PRICE
from worker.tracking.intake import account_by_name, register_orders, remove_account
from worker.tracking.record import SETTLE_DELAY, PollContext, apply_outcome, lock_shipments

OK = {"IsError": False, "ErrorMessage": ""}
PASSWORD = "correct-horse-battery-staple"
T0 = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Merchant:
    name: str
    api_key: str


@pytest.fixture
def merchants(api: Api) -> Iterator[list[Merchant]]:  # noqa: F811
    """Two accounts with known API keys (the first with a push password); deleted afterwards."""
    made = [Merchant(f"push-{secrets.token_hex(4)}", f"key-{secrets.token_hex(12)}") for _ in "ab"]
    with transaction(api.servers.database_url) as s:
        for index, m in enumerate(made):
            s.add(
                Account(
                    name=m.name,
                    api_key_encrypted=encrypt(m.api_key, api.servers.secret_key),
                    api_key_hint=m.api_key[-4:],
                    api_key_digest=keyed_digest(m.api_key, api.servers.secret_key),
                    push_password_hash=hash_password(PASSWORD) if index == 0 else None,
                )
            )
    yield made
    with transaction(api.servers.database_url) as s:
        s.execute(delete(Account).where(Account.name.in_([m.name for m in made])))


def _code() -> str:
    return f"PSH{secrets.token_hex(5).upper()}"


def _local(moment: datetime) -> str:
    """A time as the carrier writes it: Vietnam time, 7 fractional digits."""
    vietnam = moment.astimezone(UTC) + timedelta(hours=7)
    return vietnam.strftime("%Y-%m-%dT%H:%M:%S.%f") + "3+07:00"


def _body(
    api_key: str | None, code: str, status: str, at: datetime, **extra: Any
) -> dict[str, Any]:
    body = {
        "ApiKey": api_key,
        "OrderCode": code,
        "ExternalCode": "EXT-1",
        "ReferenceCode": None,
        "Status": status,
        "StatusName": None,
        "Description": f"Change order status: ==> {status}",
        "RequestFeedbackCount": 0,
        "DelayCode": 0,
        "DelayNotes": None,
        "DeliveryNotes": None,
        "Mailman": "Nguyễn Văn A",
        "DeliveryDate": None,
        "ReceiverName": None,
        "TransactionId": str(uuid.uuid4()),
        "Time": _local(at),
    }
    return body | extra


def _post(api: Api, body: object, **kwargs: Any) -> httpx.Response:  # noqa: F811
    with httpx.Client(base_url=api.url, timeout=30) as client:
        if isinstance(body, bytes):
            return client.post("/carrier/247/status", content=body, **kwargs)
        return client.post("/carrier/247/status", json=body, **kwargs)


def _accepted(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.json() == OK


def _refused(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["IsError"] is True and set(answer) == {"IsError", "ErrorMessage"}
    message: str = answer["ErrorMessage"]
    assert message
    return message


def _shipment(api: Api, account: str, code: str) -> dict[str, Any] | None:  # noqa: F811
    with transaction(api.servers.database_url) as s:
        shipment = s.scalar(
            select(Shipment)
            .join(Account)
            .where(Account.name == account, Shipment.order_code == code)
        )
        if shipment is None:
            return None
        rows = s.execute(
            select(StatusEvent.status, StatusEvent.source)
            .where(StatusEvent.shipment_id == shipment.id)
            .order_by(StatusEvent.occurred_at)
        ).all()
        events = s.scalars(
            select(OutboxEvent)
            .where(OutboxEvent.shipment_id == shipment.id)
            .order_by(OutboxEvent.sequence)
        ).all()
        return {
            "status": shipment.status,
            "status_changed_at": shipment.status_changed_at,
            "delay": (shipment.delay_code, shipment.delay_reason, shipment.delay_note),
            "polls_made": shipment.polls_made,
            "active": shipment.active,
            "terminal_at": shipment.terminal_at,
            "next_poll_at": shipment.next_poll_at,
            "delivery_notes": shipment.delivery_notes,
            "history": [tuple(r) for r in rows],
            "events": [(e.type, e.data) for e in events],
        }


def _apply_together(state: Any, bodies: list[dict[str, Any]]) -> list[Exception | None]:
    """Apply these pushes as one batch of the receiver's, in this process; their outcomes."""
    loop = asyncio.new_event_loop()
    try:
        batch = [
            carrier_routes._Pending(parse_push(json.dumps(b).encode()), None, loop.create_future())
            for b in bodies
        ]
        return carrier_routes._apply_batch(state, batch)[0]
    finally:
        loop.close()


def _push_at_once(state: Any, bodies: list[dict[str, Any]]) -> list[BaseException | None]:
    """Hand these pushes to the receiver's batcher together, as the route does; their outcomes."""

    async def push_all() -> list[BaseException | None]:
        pushes = [parse_push(json.dumps(b).encode()) for b in bodies]
        outcomes = await asyncio.gather(
            *(state.pushes.apply(state, push, None) for push in pushes), return_exceptions=True
        )
        await asyncio.gather(*state.pushes._tasks)  # it hands the events on after answering
        return outcomes

    return asyncio.run(push_all())


# --- Authentication --------------------------------------------------------------------------


def test_a_push_with_the_accounts_api_key_registers_the_order_and_applies_it(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    code = _code()
    _accepted(_post(api, _body(merchants[0].api_key, code, "25", T0)))
    seen = _shipment(api, merchants[0].name, code)
    assert seen is not None
    assert seen["status"] == "DELIVERING"
    # 7 fractional digits and +07:00, stored as UTC (the 7th digit dropped).
    assert seen["status_changed_at"] == T0
    assert seen["history"] == [("DELIVERING", "push")]
    assert seen["polls_made"] == 0
    [(type_, data)] = seen["events"]
    assert type_ == "shipment.status_changed"
    assert data["source"] == "push"
    assert data["status"]["id"] == 25 and data["previous_status"] is None
    assert _shipment(api, merchants[1].name, code) is None


def test_basic_auth_set_for_the_account_is_accepted_and_a_wrong_password_is_not(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    def basic(name: str, password: str) -> dict[str, str]:
        token = base64.b64encode(f"{name}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    code = _code()
    body = _body(None, code, "23", T0)
    _refused(_post(api, body, headers=basic(merchants[0].name, "wrong-password-123")), 401)
    # An account without a push password refuses Basic auth whatever is sent.
    _refused(_post(api, body, headers=basic(merchants[1].name, PASSWORD)), 401)
    _refused(_post(api, body, headers={"Authorization": "Basic !!!"}), 401)
    assert _shipment(api, merchants[0].name, code) is None
    _accepted(_post(api, body, headers=basic(merchants[0].name, PASSWORD)))
    seen = _shipment(api, merchants[0].name, code)
    assert seen is not None and seen["status"] == "PICKED_UP"


def test_set_push_auth_stores_a_password_that_basic_auth_then_accepts(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    password = secrets.token_hex(16)
    done = subprocess.run(
        [*CLI, "account", "set-push-auth", merchants[1].name],
        input=password + "\n",
        env=api.servers.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    with transaction(api.servers.database_url) as s:
        stored = account_by_name(s, merchants[1].name).push_password_hash
    assert stored is not None and password not in stored
    token = base64.b64encode(f"{merchants[1].name}:{password}".encode()).decode()
    code = _code()
    _accepted(_post(api, _body(None, code, "21", T0), headers={"Authorization": f"Basic {token}"}))
    assert _shipment(api, merchants[1].name, code) is not None
    short = subprocess.run(
        [*CLI, "account", "set-push-auth", merchants[1].name],
        input="short\n",
        env=api.servers.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert short.returncode != 0 and "openssl rand" in short.stdout + short.stderr


def test_a_wrong_or_missing_api_key_is_refused_and_stores_nothing(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    code = _code()
    for key in ("not-a-key", merchants[0].api_key + "x", None, ""):
        message = _refused(_post(api, _body(key, code, "25", T0)), 401)
        assert "ApiKey" in message
    assert _shipment(api, merchants[0].name, code) is None


def test_another_accounts_key_never_touches_this_accounts_shipment(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    code = _code()
    with transaction(api.servers.database_url) as s:
        register_orders(s, merchants[0].name, [code])
    _accepted(_post(api, _body(merchants[1].api_key, code, "30", T0)))
    mine = _shipment(api, merchants[0].name, code)
    assert mine is not None and mine["status"] is None and mine["events"] == []
    theirs = _shipment(api, merchants[1].name, code)
    assert theirs is not None and theirs["status"] == "DELIVERED"


def test_rotation_and_first_start_keep_the_api_key_digests_current(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    sessions = session_factory(api.servers.database_url)
    with sessions.begin() as s:
        account_by_name(s, merchants[1].name).api_key_digest = None
    assert store_api_key_digests(sessions, api.servers.secret_key, [], every=False) >= 1
    with sessions.begin() as s:
        account = account_by_name(s, merchants[1].name)
        assert account.api_key_digest == keyed_digest(merchants[1].api_key, api.servers.secret_key)


class _Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _cached_state(api: Api, clock: _Clock) -> Any:  # noqa: F811
    """The receiver's state, with an account cache on `clock`."""
    app = create_app(api.servers.settings())
    pushes = carrier_routes.PushBatcher(carrier_routes.AccountCache(clock))
    return dataclasses.replace(app.state.shipmon, deliver=lambda ids: None, pushes=pushes)


def test_a_replaced_api_key_authenticates_pushes_only_until_its_cached_account_expires(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    clock = _Clock()
    state = _cached_state(api, clock)
    shop = merchants[0]
    new_key = f"key-{secrets.token_hex(12)}"
    assert _apply_together(state, [_body(shop.api_key, _code(), "21", T0)]) == [None]
    with transaction(api.servers.database_url) as s:  # what `shipmon account set-key` does
        account_by_name(s, shop.name).api_key_digest = keyed_digest(new_key, api.servers.secret_key)
    # The new key works at once; the old one only while its account is cached.
    assert _apply_together(state, [_body(new_key, _code(), "21", T0)]) == [None]
    clock.now += carrier_routes.AccountCache.SECONDS - 0.1
    assert _apply_together(state, [_body(shop.api_key, _code(), "21", T0)]) == [None]
    clock.now += 0.2
    code = _code()
    [refused] = _apply_together(state, [_body(shop.api_key, code, "21", T0)])
    assert isinstance(refused, carrier_routes.NotAuthenticated)
    assert _shipment(api, shop.name, code) is None


def test_a_refused_key_is_not_remembered_and_a_removed_account_is_refused_at_once(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    clock = _Clock()
    state = _cached_state(api, clock)
    shop, other = merchants
    unknown = f"key-{secrets.token_hex(12)}"
    [refused] = _apply_together(state, [_body(unknown, _code(), "21", T0)])
    assert isinstance(refused, carrier_routes.NotAuthenticated)
    with transaction(api.servers.database_url) as s:  # the key becomes the account's own
        account_by_name(s, shop.name).api_key_digest = keyed_digest(unknown, api.servers.secret_key)
    assert _apply_together(state, [_body(unknown, _code(), "21", T0)]) == [None]
    with transaction(api.servers.database_url) as s:
        remove_account(s, shop.name)
    # Cached a moment ago: the batch fails on the missing account, and its pushes, applied
    # again one by one, look the account up and are refused, writing nothing; a neighbour
    # of another account is applied.
    gone, neighbour = _code(), _code()
    outcomes = _apply_together(
        state, [_body(unknown, gone, "21", T0), _body(other.api_key, neighbour, "21", T0)]
    )
    assert isinstance(outcomes[0], carrier_routes.NotAuthenticated) and outcomes[1] is None
    with transaction(api.servers.database_url) as s:
        assert s.scalar(select(func.count()).where(Shipment.order_code == gone)) == 0
    assert _shipment(api, other.name, neighbour) is not None


# --- Idempotency and order -------------------------------------------------------------------


def test_the_same_transaction_id_twice_applies_once(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    code = _code()
    body = _body(merchants[0].api_key, code, "24", T0)
    _accepted(_post(api, body))
    _accepted(_post(api, body | {"Status": "25", "Time": _local(T0 + timedelta(hours=1))}))
    seen = _shipment(api, merchants[0].name, code)
    assert seen is not None
    assert seen["status"] == "IN_TRANSIT"
    assert seen["history"] == [("IN_TRANSIT", "push")]
    assert len(seen["events"]) == 1
    with transaction(api.servers.database_url) as s:
        receipts = s.scalars(
            select(PushReceipt).where(
                PushReceipt.transaction_id == uuid.UUID(body["TransactionId"])
            )
        ).all()
        assert len(receipts) == 1


def _poll(api: Api, account: str, code: str, statuses: list[tuple[str, datetime]]) -> None:  # noqa: F811
    """Apply a lookup's answer with these statuses, as the poller does."""
    answer = {
        "orderCode": code,
        "status": statuses[-1][0],
        "trackingName": "Đang đi phát",
        "statuses": [{"status": s, "time": _local(t)} for s, t in statuses],
        "trackings": [],
        "totalServiceCost": 32000,
    }
    result = parse_tracking(json.dumps(answer).encode(), code)
    with transaction(api.servers.database_url) as s:
        owner = account_by_name(s, account)
        [shipment] = lock_shipments(
            s,
            list(
                s.scalars(
                    select(Shipment.id).where(
                        Shipment.account_id == owner.id, Shipment.order_code == code
                    )
                )
            ),
        )
        ctx = PollContext(
            datetime.now(UTC), LearnedModel("Asia/Ho_Chi_Minh"), INITIAL_PRICE, timedelta(days=1)
        )
        apply_outcome(s, shipment, owner, result, ctx)


def test_the_same_status_by_push_then_by_poll_is_one_history_row_and_one_event(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    code = _code()
    _accepted(_post(api, _body(merchants[0].api_key, code, "25", T0)))
    _poll(api, merchants[0].name, code, [("25", T0)])
    seen = _shipment(api, merchants[0].name, code)
    assert seen is not None
    assert seen["history"] == [("DELIVERING", "push")]
    assert [t for t, _ in seen["events"]] == ["shipment.status_changed"]
    assert seen["polls_made"] == 1


def test_the_same_status_by_poll_then_by_push_is_one_history_row_and_one_event(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    code = _code()
    with transaction(api.servers.database_url) as s:
        register_orders(s, merchants[0].name, [code])
    _poll(api, merchants[0].name, code, [("24", T0), ("25", T0 + timedelta(hours=1))])
    _accepted(_post(api, _body(merchants[0].api_key, code, "25", T0 + timedelta(hours=1))))
    seen = _shipment(api, merchants[0].name, code)
    assert seen is not None
    assert seen["history"] == [("IN_TRANSIT", "poll"), ("DELIVERING", "poll")]
    assert [d["source"] for _, d in seen["events"]] == ["poll", "poll"]


def test_an_older_push_is_recorded_but_never_moves_the_shipment_back(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    code = _code()
    key = merchants[0].api_key
    _accepted(_post(api, _body(key, code, "25", T0 + timedelta(hours=2))))
    _accepted(_post(api, _body(key, code, "24", T0)))
    seen = _shipment(api, merchants[0].name, code)
    assert seen is not None
    assert seen["status"] == "DELIVERING"
    assert seen["history"] == [("IN_TRANSIT", "push"), ("DELIVERING", "push")]
    assert len(seen["events"]) == 1


def _change(left: Status | None, entered: Status) -> str:
    """The Description the carrier writes for a change from `left` (None: the first status)."""
    return f"Change order status: {left.code if left else ''} ==> {entered.code}"


def test_a_push_after_a_change_not_yet_seen_is_looked_up_and_both_are_announced_in_order(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    code = _code()
    key, name = merchants[0].api_key, merchants[0].name
    with transaction(api.servers.database_url) as s:
        register_orders(s, name, [code])
    _poll(api, name, code, [("23", T0)])
    # IN_TRANSIT's push was lost (or is late); DELIVERING's says the order left IN_TRANSIT.
    skipping = _body(
        key, code, "25", T0 + timedelta(hours=2),
        Description=_change(Status.IN_TRANSIT, Status.DELIVERING),
    )  # fmt: skip
    before = datetime.now(UTC)
    _accepted(_post(api, skipping))
    seen = _shipment(api, name, code)
    assert seen is not None
    assert seen["status"] == "PICKED_UP" and seen["history"] == [("PICKED_UP", "poll")]
    assert len(seen["events"]) == 1
    assert before - timedelta(seconds=5) <= seen["next_poll_at"] <= datetime.now(UTC)

    hours = [T0 + timedelta(hours=n) for n in range(3)]
    _poll(api, name, code, [("23", hours[0]), ("24", hours[1]), ("25", hours[2])])
    _accepted(_post(api, skipping))  # the carrier resends it: already taken
    late = _body(
        key, code, "24", T0 + timedelta(hours=1),
        Description=_change(Status.PICKED_UP, Status.IN_TRANSIT),
    )  # fmt: skip
    _accepted(_post(api, late))  # the late push of the change the lookup found
    seen = _shipment(api, name, code)
    assert seen is not None
    assert seen["status"] == "DELIVERING"
    announced = [
        (d["status"]["name"], d["source"])
        for t, d in seen["events"]
        if t == "shipment.status_changed"
    ]
    assert announced == [("PICKED_UP", "poll"), ("IN_TRANSIT", "poll"), ("DELIVERING", "poll")]


def test_a_push_that_follows_the_recorded_status_applies_at_once(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    code = _code()
    key, name = merchants[0].api_key, merchants[0].name
    first = _body(key, code, "23", T0, Description=_change(None, Status.PICKED_UP))
    then = _body(
        key, code, "24", T0 + timedelta(hours=1),
        Description=_change(Status.PICKED_UP, Status.IN_TRANSIT),
    )  # fmt: skip
    _accepted(_post(api, first))
    _accepted(_post(api, then))
    seen = _shipment(api, name, code)
    assert seen is not None
    assert seen["status"] == "IN_TRANSIT"
    assert [d["source"] for _, d in seen["events"]] == ["push", "push"]


@pytest.mark.parametrize(
    ("description", "changed_from"),
    [
        ("Change order status: DANGVANCHUYEN ==> DANGDIPHAT", "DANGVANCHUYEN"),
        ("Change order status:  ==> DANGDIPHAT", ""),
        ("Change order status: ==> 25", ""),
        ("Change order status: DANGVANCHUYEN ==> CHOLAYHANG", None),  # another status
        ("Change order status: two words ==> DANGDIPHAT", None),
        ("status changed", None),
        (None, None),
    ],
)
def test_the_status_a_push_left_is_read_from_its_description_only_when_it_is_plain(
    description: str | None, changed_from: str | None
) -> None:
    body = _body("key", "ABC12345", "25", T0, StatusName="DANGDIPHAT", Description=description)
    assert parse_push(json.dumps(body).encode()).changed_from == changed_from


def test_a_terminal_push_plans_one_settle_lookup_and_never_ends_polling_itself(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    code = _code()
    key = merchants[0].api_key
    before = datetime.now(UTC)
    _accepted(_post(api, _body(key, code, "30", T0)))
    _accepted(_post(api, _body(key, code, "30", T0)))  # the carrier resent it, as a new one
    seen = _shipment(api, merchants[0].name, code)
    assert seen is not None
    assert seen["active"] is True and seen["terminal_at"] == T0
    assert before + SETTLE_DELAY - timedelta(minutes=1) <= seen["next_poll_at"]
    assert seen["next_poll_at"] <= datetime.now(UTC) + SETTLE_DELAY


def test_a_push_with_a_delay_code_announces_the_delay_with_its_reason_and_note(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    code = _code()
    body = _body(merchants[0].api_key, code, "16", T0, DelayCode="5", DelayNotes="gọi không được")
    _accepted(_post(api, body))
    seen = _shipment(api, merchants[0].name, code)
    assert seen is not None
    code_, reason, note = seen["delay"]
    assert code_ == 5 and reason and note == "gọi không được"
    delayed = [d for t, d in seen["events"] if t == "shipment.delayed"]
    assert delayed[0]["delay"] == {"code": 5, "reason": reason, "note": "gọi không được"}
    assert delayed[0]["source"] == "push"


# --- Hostile bodies --------------------------------------------------------------------------


def test_nul_characters_and_overlong_text_are_cleaned_not_refused(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    code = _code()
    body = _body(merchants[0].api_key, code, "25", T0, DeliveryNotes="a\x00b" + "x" * 10_000)
    _accepted(_post(api, body))
    seen = _shipment(api, merchants[0].name, code)
    assert seen is not None
    assert seen["delivery_notes"].startswith("abx") and len(seen["delivery_notes"]) == 2000


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"RequestFeedbackCount": 10**30}, "RequestFeedbackCount"),
        ({"DelayCode": "٣"}, "DelayCode"),
        ({"Status": ["25"]}, "Status"),
        ({"Time": 12}, "Time"),
        ({"Time": None}, "Time"),
        ({"TransactionId": "not-a-uuid"}, "TransactionId"),
        ({"TransactionId": None}, "TransactionId"),
        ({"OrderCode": "ab"}, "OrderCode"),
        ({"OrderCode": "SPX 000 1234"}, "OrderCode"),
        ({"Status": None, "StatusName": None}, "Status"),
        ({"status": "25"}, "case"),  # "Status" and "status" both: which did the carrier mean?
    ],
)
def test_a_push_with_a_bad_field_is_refused_naming_it(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
    change: dict[str, Any],
    words: str,
) -> None:
    code = _code()
    body = _body(merchants[0].api_key, code, "25", T0) | change
    assert words.lower() in _refused(_post(api, body), 400).lower()
    assert _shipment(api, merchants[0].name, code) is None


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[1, 2]", b'{"a": NaN}', b"\xff\xfe", b"[" * 60_000]
)
def test_a_body_that_is_not_a_json_object_is_refused(api: Api, body: bytes) -> None:  # noqa: F811
    _refused(_post(api, body, headers={"Content-Type": "application/json"}), 400)


def test_a_huge_body_is_refused_in_the_carriers_shape_before_it_is_read(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    body = json.dumps(_body(merchants[0].api_key, _code(), "25", T0, Description="x" * 10**7))
    assert "bytes" in _refused(_post(api, body.encode()), 413)

    def chunks() -> Iterator[bytes]:
        for _ in range(160):
            yield b" " * 65_536

    with httpx.Client(base_url=api.url, timeout=30) as client:  # no Content-Length
        response = client.post("/carrier/247/status", content=chunks())
    assert "bytes" in _refused(response, 413)


# --- Webhooks --------------------------------------------------------------------------------


class _Receiver(ThreadingHTTPServer):
    bodies: list[tuple[bytes, dict[str, str]]]


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append((body, dict(self.headers.items())))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook_receiver() -> Iterator[_Receiver]:
    server = _Receiver(("127.0.0.1", 0), _Handler)
    server.bodies = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_pushes_arriving_together_are_answered_each_by_its_own_fate(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    """Concurrent pushes are applied in batches; a refused one never fails its neighbours."""
    shop, other = merchants
    good = [_code() for _ in range(24)]
    bodies = [
        _body(shop.api_key if i % 2 else other.api_key, c, "25", T0) for i, c in enumerate(good)
    ]
    bodies += [_body("not-a-key-of-anyone", _code(), "25", T0) for _ in range(6)]
    bodies += [_body(shop.api_key, "x!", "25", T0) for _ in range(6)]
    order = list(range(len(bodies)))
    random.Random(7).shuffle(order)

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/carrier/247/status", json=bodies[i]) for i in order)
            )

    answers = dict(zip(order, asyncio.run(send_all()), strict=True))
    for i in range(24):
        _accepted(answers[i])
    for i in range(24, 30):
        _refused(answers[i], 401)
    for i in range(30, 36):
        _refused(answers[i], 400)
    with transaction(api.servers.database_url) as s:
        stored = set(
            s.scalars(
                select(Shipment.order_code)
                .join(StatusEvent)
                .where(Shipment.order_code.in_(good), StatusEvent.source == "push")
            )
        )
    assert stored == set(good)


def test_one_batch_takes_a_resend_once_and_two_changes_of_one_order_in_order(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    app = create_app(api.servers.settings())
    state = dataclasses.replace(app.state.shipmon, deliver=lambda ids: None)
    key, name = merchants[0].api_key, merchants[0].name
    code, new = _code(), _code()
    with transaction(api.servers.database_url) as s:
        register_orders(s, name, [code])
    first = _body(key, code, "23", T0, Description=_change(None, Status.PICKED_UP))
    bodies = [
        first,
        first,  # the carrier resent it before the first was answered
        _body(
            key, code, "24", T0 + timedelta(hours=1),
            Description=_change(Status.PICKED_UP, Status.IN_TRANSIT),
        ),
        _body(key, new, "23", T0, Description=_change(None, Status.PICKED_UP)),
        _body(key, "x!", "23", T0),
    ]  # fmt: skip
    outcomes = _apply_together(state, bodies)
    assert outcomes[:4] == [None] * 4 and isinstance(outcomes[4], PushRefused)
    seen, registered = _shipment(api, name, code), _shipment(api, name, new)
    assert seen is not None and registered is not None
    assert seen["history"] == [("PICKED_UP", "push"), ("IN_TRANSIT", "push")]
    assert [d["status"]["name"] for _, d in seen["events"]] == ["PICKED_UP", "IN_TRANSIT"]
    assert registered["history"] == [("PICKED_UP", "push")]
    with transaction(api.servers.database_url) as s:
        receipts = s.scalar(
            select(func.count()).select_from(PushReceipt).join(Shipment)
            .where(Shipment.order_code.in_([code, new]))
        )  # fmt: skip
    assert receipts == 3


def test_a_batch_that_fails_is_applied_again_push_by_push(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A push that fails in a way no one foresaw takes only itself down, not its batch."""
    app = create_app(api.servers.settings())
    delivered: list[list[int]] = []
    state = dataclasses.replace(app.state.shipmon, deliver=delivered.append)
    codes = [_code() for _ in range(3)]
    cursed = codes[1]
    real = carrier_routes.receive_push

    def receive(session: Any, account: Any, push: Any, ctx: Any, batch: Any = None) -> Any:
        if push.order_code == cursed:
            raise RuntimeError("a failure no one foresaw")
        return real(session, account, push, ctx, batch)

    monkeypatch.setattr(carrier_routes, "receive_push", receive)
    outcomes = _push_at_once(state, [_body(merchants[0].api_key, code, "25", T0) for code in codes])
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], RuntimeError)
    with transaction(api.servers.database_url) as s:
        stored = set(s.scalars(select(Shipment.order_code).where(Shipment.order_code.in_(codes))))
        events = set(
            s.scalars(select(OutboxEvent.id).join(Shipment).where(Shipment.order_code.in_(codes)))
        )
    assert stored == {codes[0], codes[2]}
    # Only committed events are handed on for delivery.
    assert {i for ids in delivered for i in ids} == events


def test_batches_in_quick_succession_queue_their_events_together_and_the_last_at_once(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    app = create_app(api.servers.settings())
    delivered: list[list[int]] = []
    state = dataclasses.replace(
        app.state.shipmon, deliver=delivered.append, pushes=carrier_routes.PushBatcher()
    )
    state.pushes.MAX_BATCH = 4  # six batches, one after the other
    state.pushes.DELIVERY_INTERVAL = 3600.0
    codes = [_code() for _ in range(24)]
    outcomes = _push_at_once(state, [_body(merchants[0].api_key, c, "25", T0) for c in codes])
    assert outcomes == [None] * 24
    with transaction(api.servers.database_url) as s:
        events = list(
            s.scalars(select(OutboxEvent.id).join(Shipment).where(Shipment.order_code.in_(codes)))
        )
    assert len(events) == 24
    # The first batch's events at once, the other five's together when the pushes stopped:
    # every event once.
    assert len(delivered) == 2 and len(delivered[0]) == 4
    assert sorted(i for ids in delivered for i in ids) == sorted(events)


def test_a_push_handed_on_right_after_the_last_was_answered_is_applied(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    """The batcher is free again the moment it answers its last push, not a step later."""
    app = create_app(api.servers.settings())
    state = dataclasses.replace(app.state.shipmon, deliver=lambda ids: None)
    first, second = (_body(merchants[0].api_key, _code(), "25", T0) for _ in "ab")

    async def one_after_the_other() -> None:
        for body in (first, second):
            await state.pushes.apply(state, parse_push(json.dumps(body).encode()), None)

    asyncio.run(asyncio.wait_for(one_after_the_other(), 30))
    assert _shipment(api, merchants[0].name, second["OrderCode"]) is not None


def test_a_push_queues_its_events_for_the_notify_workers_at_once(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
) -> None:
    """As a poll does after its commit: no wait for the delivery sweep."""
    code = _code()
    _accepted(_post(api, _body(merchants[0].api_key, code, "25", T0)))
    with transaction(api.servers.database_url) as s:
        event_ids = list(
            s.scalars(select(OutboxEvent.id).join(Shipment).where(Shipment.order_code == code))
        )
    assert event_ids
    broker = redis.Redis.from_url(api.servers.redis_url)
    try:
        messages = [json.loads(raw) for raw in broker.lrange(NOTIFY_QUEUE, 0, -1)]
    finally:
        broker.close()
    queued = [
        json.loads(base64.b64decode(m["body"]))[0]
        for m in messages
        if m["headers"]["task"] == "shipmon.deliver"
    ]
    assert sorted(event_ids) in [sorted(args[0]) for args in queued]


def test_a_pushed_change_reaches_a_webhook_receiver_signed_with_source_push(
    api: Api,  # noqa: F811
    merchants: list[Merchant],
    webhook_receiver: _Receiver,
) -> None:
    host, port = webhook_receiver.server_address[:2]
    url = f"http://{host!s}:{port}/hooks"
    with transaction(api.servers.database_url) as s:
        owner = account_by_name(s, merchants[0].name)
        _, secret = add_endpoint(
            s, owner, url, None, secret_key=api.servers.secret_key, allow_private=True
        )
    code = _code()
    _accepted(_post(api, _body(merchants[0].api_key, code, "25", T0)))
    with transaction(api.servers.database_url) as s:
        event_ids = list(
            s.scalars(
                select(OutboxEvent.id)
                .join(Shipment)
                .where(Shipment.order_code == code, Shipment.account_id == owner.id)
            )
        )

    async def sweep() -> None:
        # What the delivery sweep does within seconds of the push.
        async with WebhookSender(allow_private=True) as sender:
            await fan_out_and_deliver(
                session_factory(api.servers.database_url),
                api.servers.settings(),
                sender,
                event_ids,
                secret_key=api.servers.secret_key,
            )

    asyncio.run(sweep())
    [(body, headers)] = webhook_receiver.bodies
    document = Webhook(secret).verify(body, headers)
    assert document["type"] == "shipment.status_changed"
    assert document["data"]["order_code"] == code
    assert document["data"]["source"] == "push"
