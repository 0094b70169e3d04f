"""API tokens: create one (shown once), verify a presented one, revoke, list.

A token is 32 random bytes, so a plain SHA-256 is a safe and fast verifier: there is nothing to
brute-force, and looking it up by its hash leaks nothing about other tokens through timing.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from worker.domain.models import Account, ApiToken
from worker.tracking.intake import account_by_name

TOKEN_PREFIX = "shm_"  # noqa: S105 (a public prefix, not a secret)
# A presented token longer than this cannot be one of ours; refuse it before hashing.
MAX_TOKEN_LENGTH = 100
MAX_NAME_LENGTH = 100


class TokenNotFound(LookupError):
    """No token has this id."""


@dataclass(frozen=True)
class Principal:
    """Who an API request acts for: an account, through one of its tokens."""

    account_id: int
    account: str
    token_id: int


@dataclass(frozen=True)
class TokenInfo:
    """A token as `shipmon token list` shows it: never the token itself."""

    id: int
    account: str
    name: str
    created_at: datetime
    revoked_at: datetime | None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, account_name: str, name: str) -> tuple[ApiToken, str]:
    """A new token for the account; the clear token is returned here and nowhere else."""
    account = account_by_name(session, account_name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(account_id=account.id, name=name[:MAX_NAME_LENGTH], token_hash=token_hash(token))
    session.add(row)
    session.flush()
    return row, token


def presented_token_hash(token: str) -> str | None:
    """The hash a presented token is looked up by; None when it cannot be one of ours."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_LENGTH:
        return None
    return token_hash(token)


def verify_token(session: Session, presented_hash: str) -> Principal | None:
    """The principal of the valid, unrevoked token with this hash; None for anything else."""
    found = session.execute(
        select(ApiToken.id, Account.id, Account.name)
        .join(Account, Account.id == ApiToken.account_id)
        .where(ApiToken.token_hash == presented_hash, ApiToken.revoked_at.is_(None))
    ).first()
    if found is None:
        return None
    token_id, account_id, account = found
    return Principal(account_id=account_id, account=account, token_id=token_id)


def revoke_token(session: Session, token_id: int) -> None:
    """Revoke a token at once; revoking it again changes nothing."""
    revoked = session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id)
        .values(revoked_at=func.coalesce(ApiToken.revoked_at, func.now()))
        .returning(ApiToken.id)
    ).first()
    if revoked is None:
        raise TokenNotFound(f"no API token with id {token_id}; see: shipmon token list ACCOUNT")


def list_tokens(session: Session, account_name: str) -> list[TokenInfo]:
    """The account's tokens, oldest first, revoked ones included."""
    account = account_by_name(session, account_name)
    rows = session.scalars(
        select(ApiToken).where(ApiToken.account_id == account.id).order_by(ApiToken.id)
    )
    return [TokenInfo(t.id, account.name, t.name, t.created_at, t.revoked_at) for t in rows]
