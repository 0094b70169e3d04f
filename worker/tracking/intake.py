"""Order intake: validating and registering order codes, the same for every way in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import BigInteger, String, delete, func, literal, select
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.orm import Session

from worker.domain.models import Account, Shipment
from worker.domain.vocabulary import ErrorCode, validate_order_code

# Codes per INSERT statement. They travel as one array parameter, unnested by PostgreSQL: a
# multi-row VALUES list of 10,000 rows costs SQLAlchemy most of a second to compile.
INSERT_CHUNK = 10_000


class UnknownAccount(LookupError):
    """No account has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"no account named {name!r}; create it with: shipmon account add {name} --api-key KEY"
        )
        self.name = name


@dataclass(frozen=True)
class Refusal:
    order_code: str
    error: ErrorCode


@dataclass
class IntakeResult:
    """What became of each submitted code."""

    registered: list[str] = field(default_factory=list)
    already_registered: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "registered": self.registered,
            "already_registered": self.already_registered,
            "refused": [{"order_code": r.order_code, "error": r.error.value} for r in self.refused],
        }


def account_by_name(session: Session, name: str) -> Account:
    account = session.scalar(select(Account).where(Account.name == name))
    if account is None:
        raise UnknownAccount(name)
    return account


def remove_account(session: Session, name: str) -> None:
    """Delete an account and all it owns: shipments and their history, outbox and deliveries,
    endpoints, email recipients, API tokens and quota rows (the foreign keys cascade)."""
    account = account_by_name(session, name)
    # A bulk DELETE: the ORM would load every shipment first to cascade by itself.
    session.execute(delete(Account).where(Account.id == account.id))
    session.expunge(account)


def register_orders(
    session: Session, account_name: str, order_codes: Iterable[str]
) -> IntakeResult:
    """Register order codes for an account; the dispatcher then plans each one's first lookup.

    Registering a code twice is not an error and creates nothing new. Invalid codes are
    refused with the carrier's own error code and never reach the database.
    """
    account = account_by_name(session, account_name)
    result = IntakeResult()
    valid: list[str] = []
    seen: set[str] = set()
    for code in order_codes:
        error = validate_order_code(code)
        if error is not None:
            result.refused.append(Refusal(code, error))
        elif code not in seen:
            seen.add(code)
            valid.append(code)
    for start in range(0, len(valid), INSERT_CHUNK):
        chunk = valid[start : start + INSERT_CHUNK]
        inserted = set(
            session.scalars(
                insert(Shipment)
                .from_select(
                    ["account_id", "order_code"],
                    select(
                        literal(account.id, BigInteger),
                        func.unnest(literal(chunk, ARRAY(String))),
                    ),
                )
                .on_conflict_do_nothing(index_elements=["account_id", "order_code"])
                .returning(Shipment.order_code)
            )
        )
        for code in chunk:
            (result.registered if code in inserted else result.already_registered).append(code)
    return result
