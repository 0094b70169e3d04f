"""Pausing and resuming an account's polling when the carrier refuses its key.

The one place a refusal becomes a pause: APIKEY_LIMIT pauses the key until the carrier's next
midnight (the quota limiter knows when that is and lowers the key's plan); a key the carrier
does not know, or none at all, pauses it until someone sets a good key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.orm import Session

from worker.carrier.errors import ApiKeyLimit, ApiKeyNotFound, MissingApiKey
from worker.domain.models import Account
from worker.domain.pauses import FOREVER, Alert

log = logging.getLogger(__name__)

KeyRefusal = ApiKeyLimit | ApiKeyNotFound | MissingApiKey
"""The carrier's answers that are about the account's key, not about the shipment."""

PauseForLimit = Callable[[Session, Account, datetime], Alert | None]
"""(session, account, now) -> pauses a key refused for quota; None if it already was."""


def pause(
    session: Session,
    account: Account,
    refusal: KeyRefusal,
    now: datetime,
    pause_for_limit: PauseForLimit,
) -> Alert | None:
    """Pause a refused account in `session`'s transaction; what to tell ops, once per pause.

    None when there is no one to tell, or the account was already paused for this.
    """
    if isinstance(refusal, ApiKeyLimit):
        alert = pause_for_limit(session, account, now)
    else:
        alert = _pause_until_fixed(account, refusal)
    if alert is None:
        return None
    log.warning(
        "account %s paused: %s", account.name, account.pause_reason,
        extra={"account": account.name, "reason": type(refusal).__name__},
    )  # fmt: skip
    return alert if alert.ops_email else None


def _pause_until_fixed(account: Account, refusal: ApiKeyNotFound | MissingApiKey) -> Alert | None:
    if paused_until_fixed(account):
        return None
    fix = f"shipmon account set-key {account.name} --api-key KEY"
    account.paused_until = FOREVER
    account.pause_reason = (
        f"{type(refusal).__name__}: the carrier refused the API key; fix it with `{fix}`"
    )
    body = (
        f"The carrier refused account {account.name}'s API key ({type(refusal).__name__}). "
        f"Polling is paused until the key is fixed: set a good one with `{fix}` and polling "
        "resumes at once."
    )
    return Alert(account.name, account.ops_email, FOREVER, body)


def paused_until_fixed(account: Account) -> bool:
    """Whether the account waits for a good key rather than for a time."""
    return account.paused_until is not None and account.paused_until >= FOREVER


def resume(account: Account) -> None:
    """Let the account poll again now."""
    account.paused_until = None
    account.pause_reason = None
