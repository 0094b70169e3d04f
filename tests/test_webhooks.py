"""Webhooks: signatures a Standard Webhooks receiver accepts, the retry schedule, the guard
against private destinations, and what one attempt makes of every kind of answer."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy.orm import Session
from standardwebhooks import Webhook, WebhookVerificationError

from tests.conftest import TEST_SECRET_KEY, make_account
from worker.core.crypto import decrypt
from worker.domain.models import WebhookEndpoint
from worker.notify.webhooks.endpoints import add_endpoint, rotate_secret, sample_event
from worker.notify.webhooks.guard import IPAddress, UnsafeDestination, check_address, check_url
from worker.notify.webhooks.sender import EXCERPT_LIMIT, RETRY_DELAYS, WebhookSender, retry_delay
from worker.notify.webhooks.signing import (
    USER_AGENT,
    event_body,
    new_secret,
    signing_secrets,
    webhook_headers,
)

NOW = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def resolver_of(table: dict[str, str]) -> Callable[[str], Sequence[IPAddress]]:
    """A resolver that answers from `table` and never asks real DNS."""

    def resolve(host: str) -> Sequence[IPAddress]:
        return [ipaddress.ip_address(table[host])]

    return resolve


# --- Signing ---------------------------------------------------------------------------------


def test_a_signed_attempt_verifies_with_the_official_library() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    data = {"order_code": "SPX0001", "tracking_name": "Đang đi phát", "sequence": 3}
    body = event_body("evt_01", "shipment.status_changed", NOW, data)
    headers = webhook_headers([secret], "evt_01", body, datetime.now(UTC))

    payload = Webhook(secret).verify(body, headers)

    assert payload == {
        "id": "evt_01",
        "type": "shipment.status_changed",
        "timestamp": "2026-11-27T09:00:00.000000Z",
        "data": data,
    }
    assert headers["webhook-id"] == "evt_01"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == USER_AGENT
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"SPX0001", b"SPX0002"), headers)


def test_the_body_is_the_same_bytes_every_time_and_the_signature_is_not() -> None:
    secret = new_secret()
    first = event_body("evt_02", "shipment.delayed", NOW, {"b": 1, "a": [1, 2]})
    again = event_body("evt_02", "shipment.delayed", NOW, {"a": [1, 2], "b": 1})
    assert first == again
    early = webhook_headers([secret], "evt_02", first, NOW)
    later = webhook_headers([secret], "evt_02", first, NOW + timedelta(seconds=7))
    assert early["webhook-signature"] != later["webhook-signature"]
    assert int(later["webhook-timestamp"]) - int(early["webhook-timestamp"]) == 7


def test_during_a_rotation_old_and_new_secrets_both_sign_for_a_day(session: Session) -> None:
    account = make_account(session)
    endpoint, old = add_endpoint(
        session, account, "http://127.0.0.1:9/hook", None,
        secret_key=TEST_SECRET_KEY, allow_private=True,
    )  # fmt: skip
    new = rotate_secret(endpoint, secret_key=TEST_SECRET_KEY, now=NOW)
    session.flush()
    assert decrypt(endpoint.secret_encrypted, TEST_SECRET_KEY) == new
    body = event_body("evt_03", "shipment.stalled", NOW, {})

    during = signing_secrets(endpoint, TEST_SECRET_KEY, NOW + timedelta(hours=23))
    headers = webhook_headers(during, "evt_03", body, datetime.now(UTC))
    Webhook(old).verify(body, headers)
    Webhook(new).verify(body, headers)

    after = signing_secrets(endpoint, TEST_SECRET_KEY, NOW + timedelta(hours=24, seconds=1))
    headers = webhook_headers(after, "evt_03", body, datetime.now(UTC))
    Webhook(new).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(body, headers)


def test_the_secret_is_stored_encrypted(session: Session) -> None:
    account = make_account(session)
    endpoint, secret = add_endpoint(
        session, account, "http://127.0.0.1:9/hook", ["shipment.delayed"],
        secret_key=TEST_SECRET_KEY, allow_private=True,
    )  # fmt: skip
    stored = session.get_one(WebhookEndpoint, endpoint.id)
    assert secret not in stored.secret_encrypted
    assert stored.event_types == ["shipment.delayed"]


# --- The retry schedule ----------------------------------------------------------------------


def test_retries_follow_the_schedule_with_a_fifth_of_jitter_then_stop() -> None:
    rng = random.Random(7)
    for attempt, nominal in enumerate(RETRY_DELAYS, start=1):
        waits = [retry_delay(attempt, rng=rng) for _ in range(200)]
        assert all(w is not None and nominal * 0.8 <= w <= nominal * 1.2 for w in waits)
        # Jitter spreads the retries out rather than leaving them all on the nominal time.
        assert len(set(waits)) > 100
    assert [d.total_seconds() for d in RETRY_DELAYS] == [
        5, 300, 1800, 7200, 18000, 36000, 36000,
    ]  # fmt: skip
    assert retry_delay(len(RETRY_DELAYS) + 1) is None


def test_retry_after_lengthens_a_wait_but_never_shortens_it() -> None:
    rng = random.Random(1)
    assert retry_delay(1, timedelta(minutes=10), rng) == timedelta(minutes=10)
    short = retry_delay(2, timedelta(seconds=1), rng)
    assert short is not None and short >= timedelta(minutes=4)
    # A receiver asking for a month gets the schedule's longest wait.
    assert retry_delay(1, timedelta(days=30), rng) == max(RETRY_DELAYS)


# --- The guard against private destinations --------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://10.1.2.3:8080/hook",
        "https://0.0.0.0/",
    ],
)
def test_registration_refuses_private_addresses(url: str) -> None:
    with pytest.raises(UnsafeDestination, match="public addresses"):
        check_url(url, allow_private=False, resolver=resolver_of({}))


# Every block of the IANA special-purpose registries (IPv4 and IPv6, as of 2024), multicast
# and the deprecated site-local block: the first and last address of each is refused.
SPECIAL_PURPOSE = [
    "0.0.0.0/8", "0.0.0.0/32", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8",
    "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24", "192.0.0.0/29", "192.0.0.8/32",
    "192.0.0.9/32", "192.0.0.10/32", "192.0.0.170/32", "192.0.0.171/32", "192.0.2.0/24",
    "192.31.196.0/24", "192.52.193.0/24", "192.88.99.0/24", "192.88.99.2/32",
    "192.168.0.0/16", "192.175.48.0/24", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "240.0.0.0/4", "255.255.255.255/32", "224.0.0.0/4",
    "::1/128", "::/128", "::ffff:0:0/96", "64:ff9b:1::/48", "100::/64",
    "100:0:0:1::/64", "2001::/23", "2001::/32", "2001:1::1/128", "2001:1::2/128",
    "2001:1::3/128", "2001:2::/48", "2001:3::/32", "2001:4:112::/48", "2001:10::/28",
    "2001:20::/28", "2001:30::/28", "2001:db8::/32", "2620:4f:8000::/48", "3fff::/20",
    "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
]  # fmt: skip
# IPv6 forms that carry an IPv4 address: refused when it is not public, whatever the prefix.
EMBEDDED_PRIVATE = [
    "::ffff:127.0.0.1", "::ffff:10.1.2.3", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",
    "64:ff9b::192.168.0.1", "2002:7f00:1::1", "2002:a00:1:2::3", "2002:c0a8:101::1",
    "::127.0.0.1", "::10.0.0.1", "::93.184.216.34", "64:ff9b:1::5db8:d822",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:0:5db8:d822::ffff:ffff",
]  # fmt: skip
PUBLIC = [
    "93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:2800:220:1::1", "2a00:1450:4001:82b::200e",
    "::ffff:93.184.216.34", "64:ff9b::5db8:d822", "2002:5db8:d822::1",
]  # fmt: skip


def _ends(cidr: str) -> list[str]:
    network = ipaddress.ip_network(cidr)
    return [str(network[0]), str(network[-1])]


@pytest.mark.parametrize(
    "address", [a for cidr in SPECIAL_PURPOSE for a in _ends(cidr)] + EMBEDDED_PRIVATE
)
def test_every_special_purpose_or_embedded_private_address_is_refused(address: str) -> None:
    resolver = resolver_of({"hooks.shop.example": address})
    with pytest.raises(UnsafeDestination, match="public addresses"):
        check_url("https://hooks.shop.example/in", allow_private=False, resolver=resolver)
    literal = f"[{address}]" if ":" in address else address
    with pytest.raises(UnsafeDestination, match="public addresses"):
        check_url(f"https://{literal}/in", allow_private=False, resolver=resolver_of({}))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass_even_inside_an_ipv6_translation_prefix(address: str) -> None:
    check_address(ipaddress.ip_address(address), allow_private=False)


def test_registration_refuses_a_name_that_resolves_to_a_private_address() -> None:
    resolver = resolver_of({"hooks.shop.example": "10.0.0.1"})
    with pytest.raises(UnsafeDestination, match=r"10\.0\.0\.1"):
        check_url("https://hooks.shop.example/in", allow_private=False, resolver=resolver)


def test_registration_refuses_a_name_that_does_not_resolve() -> None:
    def nowhere(host: str) -> Sequence[IPAddress]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(UnsafeDestination, match="does not resolve"):
        check_url("https://hooks.shop.example/in", allow_private=False, resolver=nowhere)


def test_registration_accepts_public_addresses_and_allows_private_when_told() -> None:
    check_url(
        "https://hooks.shop.example/in",
        allow_private=False,
        resolver=resolver_of({"hooks.shop.example": "93.184.216.34"}),
    )
    check_url("http://127.0.0.1:8080/hook", allow_private=True)
    with pytest.raises(UnsafeDestination, match="not an http"):
        check_url("ftp://hooks.shop.example/", allow_private=True)


def test_add_endpoint_refuses_before_storing_anything(session: Session) -> None:
    account = make_account(session)
    with pytest.raises(UnsafeDestination):
        add_endpoint(
            session, account, "http://[::1]:8000/", None,
            secret_key=TEST_SECRET_KEY, allow_private=False,
        )  # fmt: skip
    assert session.query(WebhookEndpoint).filter_by(account_id=account.id).count() == 0


# --- Attempts against a real receiver --------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def receiver(handler: Handler) -> AsyncIterator[tuple[str, list[web.Request]]]:
    """An HTTP server on a free loopback port; yields its base URL and the requests it got."""
    seen: list[web.Request] = []

    async def record(request: web.Request) -> web.StreamResponse:
        await request.read()
        seen.append(request)
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    # A handler whose client gave up is cancelled, so stopping the server never waits for it.
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def respond(status: int, text: str = "", headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=text, headers=headers)

    return handler


def attempt(handler: Handler, path: str = "/hook", **sender: Any) -> tuple[Any, list[Any]]:
    """One attempt at a receiver answering with `handler`; returns the result and requests."""
    secret = new_secret()
    body = event_body("evt_x", "shipment.delayed", NOW, {"order_code": "SPX0001"})

    async def run() -> tuple[Any, list[Any]]:
        async with (
            receiver(handler) as (base, seen),
            WebhookSender(allow_private=True, **sender) as client,
        ):
            result = await client.send(base + path, [secret], "evt_x", body)
            if result.succeeded:
                Webhook(secret).verify(await seen[0].read(), dict(seen[0].headers))
            return result, seen

    return asyncio.run(run())


def test_a_2xx_answer_is_a_success_and_the_request_is_signed() -> None:
    result, seen = attempt(respond(204))
    assert result.succeeded
    assert result.status_code == 204
    assert len(seen) == 1
    assert seen[0].method == "POST"
    assert seen[0].headers["user-agent"] == USER_AGENT


def test_a_redirect_is_a_failure_and_is_not_followed() -> None:
    result, seen = attempt(respond(302, headers={"Location": "/elsewhere"}))
    assert not result.succeeded
    assert result.status_code == 302
    assert [r.path for r in seen] == ["/hook"]


def test_410_means_gone_and_429_and_503_carry_retry_after() -> None:
    gone, _ = attempt(respond(410))
    assert gone.gone
    assert not gone.succeeded
    busy, _ = attempt(respond(429, headers={"Retry-After": "120"}))
    assert busy.retry_after == timedelta(seconds=120)
    when = (datetime.now(UTC) + timedelta(hours=1)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    down, _ = attempt(respond(503, headers={"Retry-After": when}))
    assert down.retry_after is not None
    assert timedelta(minutes=58) < down.retry_after <= timedelta(hours=1)
    error, _ = attempt(respond(500, headers={"Retry-After": "120"}))
    assert error.retry_after is None


def test_a_response_is_kept_up_to_twenty_kilobytes() -> None:
    result, _ = attempt(respond(500, text="é" * EXCERPT_LIMIT))
    assert result.response_excerpt is not None
    assert len(result.response_excerpt.encode()) <= EXCERPT_LIMIT + 3
    assert result.response_excerpt.startswith("éé")


def test_a_nul_byte_in_an_answer_is_replaced_so_the_attempt_can_be_stored() -> None:
    async def nul(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, body=b"broken\x00here\xff")

    result, _ = attempt(nul)
    assert result.response_excerpt == "broken\ufffdhere\ufffd"


def test_an_attempt_that_takes_too_long_fails_at_the_deadline() -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    result, _ = attempt(hang, attempt_timeout=0.3)
    assert not result.succeeded
    assert result.error == "no answer within 0.3 s"
    assert 250 <= result.duration_ms < 3000


def test_a_closed_port_is_a_failure_not_an_exception() -> None:
    secret = new_secret()

    async def run() -> Any:
        async with receiver(respond(200)) as (base, _):
            closed = base  # the server stops when the block ends
        async with WebhookSender(allow_private=True) as client:
            return await client.send(closed + "/hook", [secret], "evt_y", b"{}")

    result = asyncio.run(run())
    assert not result.succeeded
    assert result.status_code is None
    assert result.error


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every outgoing connection attempt, recorded and refused before any packet leaves."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("connection attempted in a test that must not connect")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_the_connection_recorder_sees_connections(no_connections: list[object]) -> None:
    # Without this, the refusal tests below could pass with a recorder that records nothing.
    async def run() -> Any:
        async with WebhookSender(allow_private=True) as client:
            return await client.send("http://127.0.0.1:9/hook", [new_secret()], "evt_r", b"{}")

    assert not asyncio.run(run()).succeeded
    assert no_connections == [("127.0.0.1", 9)]


@pytest.mark.parametrize(
    ("url", "table"),
    [
        ("http://127.0.0.1/hook", {}),
        ("http://169.254.169.254/latest/meta-data/", {}),
        ("http://[::1]/hook", {}),
        ("http://hooks.shop.example/hook", {"hooks.shop.example": "10.0.0.1"}),
        ("http://hooks.shop.example/hook", {"hooks.shop.example": "64:ff9b::a9fe:a9fe"}),
        ("http://hooks.shop.example/hook", {"hooks.shop.example": "2002:7f00:1::1"}),
        ("http://[64:ff9b::7f00:1]/hook", {}),
        ("http://[fec0::1]/hook", {}),
    ],
)
def test_delivery_refuses_private_addresses_before_connecting(
    url: str, table: dict[str, str], no_connections: list[object]
) -> None:
    async def run() -> Any:
        async with WebhookSender(allow_private=False, resolver=resolver_of(table)) as client:
            return await client.send(url, [new_secret()], "evt_z", b"{}")

    result = asyncio.run(run())
    assert not result.succeeded
    assert result.error.startswith("refused: ")
    assert no_connections == []


def test_delivery_connects_to_the_address_it_checked() -> None:
    # The name resolves to loopback through the injected resolver: with private addresses
    # allowed, the request reaches the loopback receiver under its own Host name.
    async def run() -> tuple[Any, list[web.Request]]:
        async with receiver(respond(200)) as (base, seen):
            port = base.rsplit(":", 1)[1]
            resolver = resolver_of({"hooks.shop.example": "127.0.0.1"})
            async with WebhookSender(allow_private=True, resolver=resolver) as client:
                result = await client.send(
                    f"http://hooks.shop.example:{port}/hook", [new_secret()], "evt_h", b"{}"
                )
            return result, seen

    result, seen = asyncio.run(run())
    assert result.succeeded
    assert seen[0].headers["Host"].startswith("hooks.shop.example")


def test_the_sample_event_is_a_signed_status_change_marked_as_a_test() -> None:
    event_id, body = sample_event(NOW)
    document = json.loads(body)
    assert document["id"] == event_id
    assert document["type"] == "shipment.status_changed"
    assert document["data"]["test"] is True
    assert document["data"]["status"] == {
        "name": "DELIVERING", "id": 25, "code": "DANGDIPHAT", "tracking_name": "Đang đi phát",
    }  # fmt: skip
