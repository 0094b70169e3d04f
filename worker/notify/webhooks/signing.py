"""Signing webhooks: endpoint secrets, the event body, and the Standard Webhooks headers.

The body of an event is the same bytes for every attempt and replay; each attempt signs it anew
with its own `webhook-timestamp`, with every secret that signs for the endpoint at that moment.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any

from standardwebhooks import Webhook

from worker.core.crypto import decrypt
from worker.domain.models import WebhookEndpoint

__all__ = [
    "ROTATION_OVERLAP",
    "SECRET_PREFIX",
    "USER_AGENT",
    "event_body",
    "new_secret",
    "sign",
    "signing_secrets",
    "webhook_headers",
]

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of every secret, not a secret
# After a rotation, the previous secret keeps signing so receivers can switch over.
ROTATION_OVERLAP = timedelta(hours=24)

try:
    _VERSION = metadata.version("shipmon")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    _VERSION = "0"
USER_AGENT = f"shipmon-webhooks/{_VERSION}"


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
