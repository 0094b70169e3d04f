"""Managing webhook endpoints: registering, trying, enabling and disabling, rotating secrets."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from worker.core.crypto import encrypt
from worker.domain.deliveries import DeliveryState
from worker.domain.events import StatusView
from worker.domain.models import Account, Delivery, WebhookEndpoint
from worker.domain.pauses import FOREVER
from worker.domain.vocabulary import EventType, Status
from worker.notify.webhooks.guard import Resolver, check_url, system_resolver
from worker.notify.webhooks.signing import ROTATION_OVERLAP, event_body, new_secret

__all__ = [
    "DISABLE_AFTER",
    "HELD",
    "RotationInProgress",
    "UnknownEndpoint",
    "add_endpoint",
    "get_endpoint",
    "rotate_secret",
    "sample_event",
    "set_endpoint_enabled",
]

# An endpoint that has failed without a single success for this long is disabled.
DISABLE_AFTER = timedelta(days=5)
# When the deliveries of a disabled endpoint come due: when it is enabled again.
HELD = FOREVER


def sample_event(now: datetime) -> tuple[str, bytes]:
    """The id and body of a sample status change, marked `"test": true`, to try an endpoint."""
    event_id = f"evt_test_{secrets.token_hex(13)}"
    data = {
        "test": True,
        "order_code": "TEST0000001",
        "previous_status": StatusView.of(Status.IN_TRANSIT).to_json(),
        "status": StatusView.of(Status.DELIVERING).to_json() | {"tracking_name": "Đang đi phát"},
        "event_time": now.isoformat(),
        "seen_at": now.isoformat(),
        "sequence": 1,
    }
    return event_id, event_body(event_id, EventType.STATUS_CHANGED, now, data)


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
        .where(Delivery.endpoint_id == endpoint.id, Delivery.state == DeliveryState.PENDING)
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
