"""Re-encrypting every stored secret with a new SHIPMON_SECRET_KEY, and the API key digests
derived from it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from worker.core.crypto import SecretKeyMismatch, decrypt, keyed_digest, reencrypt
from worker.domain.models import Account, WebhookEndpoint

# Every column that holds a secret encrypted with SHIPMON_SECRET_KEY.
ENCRYPTED_COLUMNS: tuple[InstrumentedAttribute[str] | InstrumentedAttribute[str | None], ...] = (
    Account.api_key_encrypted,
    WebhookEndpoint.secret_encrypted,
    WebhookEndpoint.previous_secret_encrypted,
)


class UnreadableSecret(Exception):
    """A stored secret opens with neither the new key nor any of the old ones."""


@dataclass
class Rotated:
    """How many stored secrets one run re-encrypted, and how many already had the new key."""

    reencrypted: int = 0
    already_current: int = 0


def rotate_stored_secrets(
    sessions: sessionmaker[Session],
    secret_key: str,
    old_keys: Sequence[str],
    *,
    batch_size: int = 500,
) -> Rotated:
    """Re-encrypt every stored secret with `secret_key`, one committed batch at a time.

    A secret that already opens with the new key is left as it is, so a run that stopped half
    way (or a second run) just carries on; workers given the old keys in
    SHIPMON_OLD_SECRET_KEYS read both kinds meanwhile.
    """
    rotated = Rotated()
    for column in ENCRYPTED_COLUMNS:
        table = column.class_
        after = 0
        while True:
            with sessions.begin() as s:
                rows = s.scalars(
                    select(table)
                    .where(table.id > after, column.is_not(None))
                    .order_by(table.id)
                    .limit(batch_size)
                    # Locked, so a concurrent `set-key` or `rotate-secret` is not overwritten.
                    .with_for_update()
                ).all()
                for row in rows:
                    token = getattr(row, column.key)
                    try:
                        fresh = reencrypt(token, secret_key, old_keys)
                    except SecretKeyMismatch:
                        raise UnreadableSecret(
                            f"{table.__tablename__} id {row.id} ({column.key}) opens with "
                            "neither SHIPMON_SECRET_KEY nor any key in SHIPMON_OLD_SECRET_KEYS: "
                            "add the key it was stored with to SHIPMON_OLD_SECRET_KEYS and run "
                            "again (the secrets already re-encrypted stay so)"
                        ) from None
                    if fresh is None:
                        rotated.already_current += 1
                    else:
                        setattr(row, column.key, fresh)
                        rotated.reencrypted += 1
                if len(rows) < batch_size:
                    break
                after = rows[-1].id
    # Pushes find their account by this digest; API processes also try the old keys' digests.
    store_api_key_digests(sessions, secret_key, old_keys, every=True)
    return rotated


def store_api_key_digests(
    sessions: sessionmaker[Session], secret_key: str, old_keys: Sequence[str], *, every: bool
) -> int:
    """Store each account's API key digest under `secret_key`; how many were written.

    `every=False` fills in only the missing ones (accounts made before pushes were received),
    which the HTTP API does when it starts; rotation rewrites them all.
    """
    with sessions.begin() as s:
        query = select(Account).with_for_update()
        if not every:
            query = query.where(Account.api_key_digest.is_(None))
        accounts = s.scalars(query).all()
        for account in accounts:
            api_key = decrypt(account.api_key_encrypted, secret_key, old_keys)
            account.api_key_digest = keyed_digest(api_key, secret_key)
    return len(accounts)
