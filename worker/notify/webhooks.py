"""Webhooks as the Standard Webhooks specification describes them: signing, sending, the
retry schedule, the guard against requests to private networks, and endpoint management.

A webhook's body is serialized once per event (the same bytes for every attempt and replay)
and signed per attempt with a fresh `webhook-timestamp`. Which deliveries are due, and what an
attempt's outcome does to them, is `worker.notify.outbox`'s business; this module only knows how to
make one attempt and what its answer means.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import random
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import lru_cache
from importlib import metadata
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from worker.core.crypto import decrypt, encrypt
from worker.domain.models import Account, Delivery, WebhookEndpoint
from worker.domain.vocabulary import EventType, Status

__all__ = [
    "ATTEMPT_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DISABLE_AFTER",
    "ERROR_LIMIT",
    "EXCERPT_LIMIT",
    "HELD",
    "RETRY_DELAYS",
    "ROTATION_OVERLAP",
    "USER_AGENT",
    "AttemptResult",
    "IPAddress",
    "Resolver",
    "UnknownEndpoint",
    "UnsafeDestination",
    "WebhookSender",
    "add_endpoint",
    "check_address",
    "check_url",
    "clean_text",
    "describe_error",
    "event_body",
    "get_endpoint",
    "new_secret",
    "retry_delay",
    "rotate_secret",
    "sample_event",
    "set_endpoint_enabled",
    "sign",
    "signing_secrets",
    "system_resolver",
    "webhook_headers",
]

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of every secret, not a secret
CONNECT_TIMEOUT = 5.0
# The whole attempt: connecting, sending, and reading the answer.
ATTEMPT_TIMEOUT = 15.0
# Longer URLs are refused by common servers and proxies; no receiver needs one.
MAX_URL_LENGTH = 2048
# Enough of a response body to see what went wrong, without storing a page of HTML per try.
EXCERPT_LIMIT = 20 * 1024
# An error's text is one line for ops, never a dump.
ERROR_LIMIT = 1000
# Waits before the 2nd, 3rd, ... 8th attempt, each counted from the previous attempt.
RETRY_DELAYS: tuple[timedelta, ...] = (
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
JITTER = 0.2
# A server's Retry-After is honoured up to the schedule's longest wait.
MAX_RETRY_AFTER = max(RETRY_DELAYS)
# An endpoint that has failed without a single success for this long is disabled.
DISABLE_AFTER = timedelta(days=5)
# When the deliveries of a disabled endpoint come due: when it is enabled again.
HELD = datetime(9999, 12, 31, tzinfo=UTC)
# After a rotation, the previous secret keeps signing so receivers can switch over.
ROTATION_OVERLAP = timedelta(hours=24)

try:
    _VERSION = metadata.version("shipmon")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    _VERSION = "0"
USER_AGENT = f"shipmon-webhooks/{_VERSION}"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Host name to every address it resolves to. Injectable so tests never need real DNS.
Resolver = Callable[[str], Sequence[IPAddress]]


# --- Signing ---------------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh endpoint secret in the Standard Webhooks form, `whsec_` + base64 of 24 bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def event_body(event_id: str, event_type: str, occurred_at: datetime, data: Any) -> bytes:
    """The webhook body of an event: the same bytes every time, so every attempt signs them."""
    timestamp = occurred_at.astimezone(UTC).isoformat(timespec="microseconds")
    document = {
        "id": event_id,
        "type": event_type,
        "timestamp": timestamp.replace("+00:00", "Z"),
        "data": data,
    }
    return json.dumps(document, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def sign(secrets_: Sequence[str], event_id: str, timestamp: datetime, body: bytes) -> str:
    """The `webhook-signature` value: one `v1,` signature per secret, space-separated."""
    text = body.decode()
    return " ".join(Webhook(s).sign(event_id, timestamp, text) for s in secrets_)


def webhook_headers(
    secrets_: Sequence[str], event_id: str, body: bytes, timestamp: datetime
) -> dict[str, str]:
    """The headers of one attempt, signed at `timestamp` (whole seconds, as the spec says)."""
    moment = datetime.fromtimestamp(int(timestamp.timestamp()), UTC)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": sign(secrets_, event_id, moment, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def signing_secrets(endpoint: WebhookEndpoint, secret_key: str, now: datetime) -> list[str]:
    """The secrets that sign for `endpoint` now: its own, and a rotated-out one still in overlap."""
    found = [decrypt(endpoint.secret_encrypted, secret_key)]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret_encrypted is not None and expires is not None and expires > now:
        found.append(decrypt(endpoint.previous_secret_encrypted, secret_key))
    return found


def retry_delay(
    attempts: int, retry_after: timedelta | None = None, rng: random.Random | None = None
) -> timedelta | None:
    """How long to wait after the `attempts`-th failed attempt; None when it was the last.

    The schedule's wait is jittered by ±20% so that a receiver coming back is not hit by every
    delivery at once; a server's Retry-After lengthens it, never shortens it.
    """
    if attempts < 1 or attempts > len(RETRY_DELAYS):
        return None
    factor = 1 + (rng or random).uniform(-JITTER, JITTER)
    delay = RETRY_DELAYS[attempts - 1] * factor
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


# --- The guard against private destinations --------------------------------------------------


class UnsafeDestination(Exception):
    """A webhook URL that shipmon refuses to call: not http(s), or not a public address."""


class UnresolvedHost(UnsafeDestination):
    """A webhook host name that resolves to no address (yet): nothing to call, for now."""


def system_resolver(host: str) -> list[IPAddress]:
    """Every address `host` resolves to, from the system's resolver; raises OSError."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    # An IPv6 address may carry a zone (fe80::1%eth0); the zone is not part of the address.
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def _blocks(
    table: dict[str, str],
) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]:
    return [(ipaddress.ip_network(cidr), name) for cidr, name in table.items()]


# Every block of the IANA IPv4 and IPv6 special-purpose address registries (as of 2024), with
# multicast and the deprecated site-local block. A merchant's receiver is a web server on a
# public unicast address, so even the blocks the registries call globally reachable (anycast
# relays, AS112 DNS servers) are refused. The IPv6 forms that carry an IPv4 address a packet
# is delivered to are not listed: `_embedded_ipv4` finds that address, and it decides.
_SPECIAL_BLOCKS = _blocks(
    {
        "0.0.0.0/8": "this network",
        "10.0.0.0/8": "private use",
        "100.64.0.0/10": "shared address space",
        "127.0.0.0/8": "loopback",
        "169.254.0.0/16": "link-local",
        "172.16.0.0/12": "private use",
        "192.0.0.0/24": "IETF protocol assignments",
        "192.0.2.0/24": "documentation",
        "192.31.196.0/24": "AS112 DNS",
        "192.52.193.0/24": "AMT relays",
        "192.88.99.0/24": "6to4 relay anycast",
        "192.168.0.0/16": "private use",
        "192.175.48.0/24": "AS112 DNS",
        "198.18.0.0/15": "benchmarking",
        "198.51.100.0/24": "documentation",
        "203.0.113.0/24": "documentation",
        "224.0.0.0/4": "multicast",
        "240.0.0.0/4": "reserved",
        "::/128": "unspecified",
        "::1/128": "loopback",
        "::/96": "IPv4-compatible (deprecated)",
        "::ffff:0:0:0/96": "IPv4-translated",
        "64:ff9b:1::/48": "local-use IPv4/IPv6 translation",
        "100::/64": "discard-only",
        "100:0:0:1::/64": "dummy prefix",
        "2001::/23": "IETF protocol assignments, Teredo included",
        "2001:db8::/32": "documentation",
        "2620:4f:8000::/48": "AS112 DNS",
        "3fff::/20": "documentation",
        "5f00::/16": "segment routing",
        "fc00::/7": "unique local",
        "fe80::/10": "link-local",
        "fec0::/10": "site-local (deprecated)",
        "ff00::/8": "multicast",
    }
)
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a packet to `address` ends up at: mapped, NAT64 or 6to4."""
    if address in _IPV4_MAPPED or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


def check_address(address: IPAddress, *, allow_private: bool) -> None:
    """Refuse an address that is not on the public internet, unless private ones are allowed."""
    if allow_private:
        return
    shown = str(address)
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            shown = f"{address} (IPv4 {embedded})"
            address = embedded
    # Python's own view as well, for what a newer registry adds before this table knows it.
    block = next((name for net, name in _SPECIAL_BLOCKS if address in net), None)
    if block is not None or not address.is_global:
        raise UnsafeDestination(
            f"{shown} is a private, loopback, link-local or reserved address "
            f"({block or 'not global'}); webhooks go only to public addresses "
            "(set SHIPMON_WEBHOOK_ALLOW_PRIVATE=true for a test setup)"
        )


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _host(url: str) -> str:
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeDestination(f"the URL has {len(url)} characters; at most {MAX_URL_LENGTH}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeDestination(f"{url!r} is not an http:// or https:// URL")
    if any(not 0 < len(label) <= 63 for label in parts.hostname.rstrip(".").split(".")):
        raise UnsafeDestination(f"{parts.hostname[:80]!r} is not a valid host name")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise UnsafeDestination(f"{url!r} has an invalid port") from None
    return parts.hostname


def check_url(url: str, *, allow_private: bool, resolver: Resolver = system_resolver) -> None:
    """Refuse a webhook URL whose host is, or resolves to, a non-public address."""
    host = _host(url)
    if allow_private:
        return
    literal = _literal_address(host)
    try:
        addresses = [literal] if literal is not None else list(resolver(host))
    except UnicodeError as error:
        raise UnsafeDestination(f"{host[:80]!r} is not a valid host name ({error})") from None
    except OSError as error:
        raise UnresolvedHost(f"{host} does not resolve ({error}); check the host name") from None
    if not addresses:
        raise UnresolvedHost(f"{host} resolves to no address; check the host name")
    for address in addresses:
        check_address(address, allow_private=False)


class _GuardedResolver(AbstractResolver):
    """Resolves for aiohttp and checks every address, so the connection goes to a checked one.

    Checking a name and then letting the HTTP client resolve it again would let a DNS answer
    that changes in between (rebinding) reach an internal address.
    """

    def __init__(self, resolver: Resolver, allow_private: bool) -> None:
        self._resolver = resolver
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await asyncio.to_thread(self._resolver, host)
        if not addresses:
            raise UnsafeDestination(f"{host} resolves to no address")
        for address in addresses:
            check_address(address, allow_private=self._allow_private)
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


# --- Sending ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptResult:
    """What one try at a delivery gave: an HTTP status or SMTP reply code, or an error."""

    succeeded: bool
    duration_ms: int
    status_code: int | None = None
    error: str | None = None
    response_excerpt: str | None = None
    # When the receiver asked to be left alone for a while (429 or 503 with Retry-After).
    retry_after: timedelta | None = None

    @property
    def gone(self) -> bool:
        """The receiver answered 410 Gone: it wants no more webhooks at this URL."""
        return self.status_code == 410


def _retry_after(value: str | None, now: datetime) -> timedelta | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return timedelta(seconds=int(value))
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(moment - now, timedelta(0))


@lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle takes tens of milliseconds; a sender per task must not pay it.
    return httpx.create_ssl_context()


class WebhookSender:
    """Makes webhook attempts over one pooled HTTP client; use one per event loop."""

    def __init__(
        self,
        *,
        allow_private: bool,
        resolver: Resolver = system_resolver,
        max_connections: int = 100,
        attempt_timeout: float = ATTEMPT_TIMEOUT,
    ) -> None:
        self._allow_private = allow_private
        self._resolver = resolver
        self._max_connections = max_connections
        self._attempt_timeout = attempt_timeout
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            # One slow receiver must not take every connection from the others.
            limit_per_host=max(1, self._max_connections // 4),
            resolver=_GuardedResolver(self._resolver, self._allow_private),
            ssl=_ssl_context(),
        )
        # No proxy from the environment: the guard must see the address actually connected to.
        session = aiohttp.ClientSession(connector=connector, trust_env=False)
        # aiohttp would silently send a POST again when a kept-alive connection drops; a
        # second attempt is this module's caller's decision (and gets its own record).
        session._retry_connection = False
        return session

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = HttpxAiohttpClient(
                # The transport would load the CA bundle again for a context it never uses.
                transport=AiohttpTransport(client=self._session, verify=_ssl_context()),
                timeout=httpx.Timeout(self._attempt_timeout, connect=CONNECT_TIMEOUT),
                follow_redirects=False,
                trust_env=False,
            )
        return self._http

    async def send(
        self, url: str, secrets_: Sequence[str], event_id: str, body: bytes
    ) -> AttemptResult:
        """POST `body` to `url`, signed now; every failure becomes an unsuccessful result."""
        started = time.perf_counter()

        def elapsed() -> int:
            return round((time.perf_counter() - started) * 1000)

        try:
            host = _host(url)
            literal = _literal_address(host)
            if literal is not None:
                # aiohttp connects to an address literal without asking the resolver.
                check_address(literal, allow_private=self._allow_private)
            headers = webhook_headers(secrets_, event_id, body, datetime.now(UTC))
            async with (
                asyncio.timeout(self._attempt_timeout),
                self._client().stream("POST", url, content=body, headers=headers) as response,
            ):
                excerpt = await _read_excerpt(response)
        except UnsafeDestination as error:
            return AttemptResult(False, elapsed(), error=f"refused: {error}")
        except TimeoutError:
            return AttemptResult(
                False, elapsed(), error=f"no answer within {self._attempt_timeout:g} s"
            )
        except (httpx.HTTPError, aiohttp.ClientError, OSError) as error:
            return AttemptResult(False, elapsed(), error=describe_error(error))
        retry_after = None
        if response.status_code in (429, 503):
            retry_after = _retry_after(response.headers.get("retry-after"), datetime.now(UTC))
        return AttemptResult(
            succeeded=response.is_success,
            duration_ms=elapsed(),
            status_code=response.status_code,
            response_excerpt=excerpt,
            retry_after=retry_after,
        )


def clean_text(text: str, limit: int) -> str:
    """`text` as PostgreSQL can store it: NUL bytes replaced, cut to `limit` characters.

    A receiver chooses every byte of its answer, and a text column refuses a NUL; one such
    answer must not make its attempt impossible to record.
    """
    return text[:limit].replace("\x00", "\N{REPLACEMENT CHARACTER}")


async def _read_excerpt(response: httpx.Response) -> str:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= EXCERPT_LIMIT:
            break
    return clean_text(b"".join(chunks)[:EXCERPT_LIMIT].decode(errors="replace"), EXCERPT_LIMIT)


def describe_error(error: BaseException) -> str:
    """An exception as one line for an attempt's record: its kind and what it says."""
    text = str(error).strip()
    name = type(error).__name__
    return f"{name}: {text}" if text else name


# --- Endpoint management ---------------------------------------------------------------------


def sample_event(now: datetime) -> tuple[str, bytes]:
    """The id and body of a sample status change, marked `"test": true`, to try an endpoint."""
    event_id = f"evt_test_{secrets.token_hex(13)}"
    data = {
        "test": True,
        "order_code": "TEST0000001",
        "previous_status": _status(Status.IN_TRANSIT),
        "status": _status(Status.DELIVERING) | {"tracking_name": "Đang đi phát"},
        "event_time": now.isoformat(),
        "seen_at": now.isoformat(),
        "sequence": 1,
    }
    return event_id, event_body(event_id, EventType.STATUS_CHANGED, now, data)


def _status(status: Status) -> dict[str, Any]:
    return {"name": status.value, "id": status.carrier_id, "code": status.code}


class UnknownEndpoint(LookupError):
    """No webhook endpoint has this id."""


def add_endpoint(
    session: Session,
    account: Account,
    url: str,
    event_types: Sequence[str] | None,
    *,
    secret_key: str,
    allow_private: bool,
    resolver: Resolver = system_resolver,
) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint after the SSRF check; returns it with its plaintext secret."""
    check_url(url, allow_private=allow_private, resolver=resolver)
    secret = new_secret()
    endpoint = WebhookEndpoint(
        account_id=account.id,
        url=url,
        secret_encrypted=encrypt(secret, secret_key),
        event_types=list(event_types) if event_types is not None else None,
    )
    session.add(endpoint)
    session.flush()
    return endpoint, secret


def get_endpoint(session: Session, endpoint_id: int) -> WebhookEndpoint:
    """The endpoint with this id, locked for update; raises UnknownEndpoint."""
    endpoint = session.scalar(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id)
        # NO KEY UPDATE: a fan-out inserting deliveries for it (KEY SHARE, by the foreign key)
        # never has to wait for an operator.
        .with_for_update(key_share=True)
    )
    if endpoint is None:
        raise UnknownEndpoint(
            f"no webhook endpoint has id {endpoint_id}; see: shipmon endpoint list"
        )
    return endpoint


def set_endpoint_enabled(
    session: Session,
    endpoint: WebhookEndpoint,
    enabled: bool,
    *,
    now: datetime,
    reason: str | None = None,
) -> None:
    """Enable an endpoint, its held deliveries due at once, or disable it saying why."""
    endpoint.enabled = enabled
    endpoint.disabled_reason = None if enabled else reason
    if enabled:
        # An operator who enables it vouches for it: no failure streak, no circuit open.
        endpoint.failing_since = None
        endpoint.unanswered = 0
        endpoint.circuit_open_until = None
    session.execute(
        update(Delivery)
        .where(Delivery.endpoint_id == endpoint.id, Delivery.state == "pending")
        # Held deliveries are kept out of every claim's way until the endpoint is back.
        .values(next_attempt_at=now if enabled else HELD)
    )


class RotationInProgress(Exception):
    """The endpoint's previous secret still signs: a new rotation would cut its overlap short."""


def rotate_secret(endpoint: WebhookEndpoint, *, secret_key: str, now: datetime) -> str:
    """Give the endpoint a new secret; the old one keeps signing for ROTATION_OVERLAP."""
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret_encrypted is not None and expires is not None and expires > now:
        # Only one previous secret signs: rotating now would drop it before its receivers
        # have had their ROTATION_OVERLAP to move to the current one.
        raise RotationInProgress(
            f"endpoint {endpoint.id} was rotated less than "
            f"{ROTATION_OVERLAP.total_seconds() / 3600:g} hours ago and its "
            f"previous secret still signs until {expires:%Y-%m-%d %H:%M} UTC; rotate again "
            "after that time"
        )
    secret = new_secret()
    endpoint.previous_secret_encrypted = endpoint.secret_encrypted
    endpoint.previous_secret_expires_at = now + ROTATION_OVERLAP
    endpoint.secret_encrypted = encrypt(secret, secret_key)
    return secret
