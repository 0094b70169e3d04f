"""Order intake: validating and registering order codes, the same for every way in, and the
carrier's pushes, which may name an order not registered yet."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import BigInteger, String, delete, func, literal, select, tuple_
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.orm import Session

from worker.carrier.push import PushRefused, StatusPush
from worker.domain.models import Account, OutboxEvent, PushReceipt, Shipment, UnknownAccount
from worker.domain.vocabulary import ErrorCode, validate_order_code
from worker.tracking.record import PollContext, apply_push

# Codes per INSERT statement. They travel as one array parameter, unnested by PostgreSQL: a
# multi-row VALUES list of 10,000 rows costs SQLAlchemy most of a second to compile.
INSERT_CHUNK = 10_000


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
    return register_for(session, account_by_name(session, account_name), order_codes)


def register_for(session: Session, account: Account, order_codes: Iterable[str]) -> IntakeResult:
    """`register_orders` for an account already at hand."""
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


@dataclass(frozen=True)
class PushReceived:
    """What became of one carrier push: applied (with its events), or a resent one ignored."""

    events: list[OutboxEvent]
    duplicate: bool = False


def receive_push(
    session: Session, account: Account, push: StatusPush, ctx: PollContext
) -> PushReceived:
    """Apply a carrier push for `account`, registering its order first if it is new.

    Raises PushRefused for an order code intake refuses. One short transaction, the caller's:
    the shipment row is locked like a poll's, so a push and a poll apply one after the other.
    """
    error = validate_order_code(push.order_code)
    if error is not None:
        raise PushRefused(f"OrderCode {push.order_code!r} is refused: {error.value}")
    shipment = _locked_shipment(session, account.id, push.order_code)
    if shipment is None:
        register_for(session, account, [push.order_code])
        shipment = _locked_shipment(session, account.id, push.order_code)
        assert shipment is not None
    receipt = session.scalar(
        insert(PushReceipt)
        .values(account_id=account.id, transaction_id=push.transaction_id, shipment_id=shipment.id)
        .on_conflict_do_nothing()
        .returning(PushReceipt.shipment_id)
    )
    if receipt is None:
        return PushReceived([], duplicate=True)
    applied = apply_push(session, shipment, account, push.as_result(), ctx, push.changed_from)
    return PushReceived(applied.events)


def lock_pushed_orders(session: Session, orders: Iterable[tuple[int, str]]) -> None:
    """Lock the tracked shipments of these (account id, order code) pairs in one statement, in
    id order as a poll batch locks its own, so that pushes applied together and a poll batch
    never wait on each other in a circle."""
    pairs = sorted(set(orders))
    if pairs:
        session.execute(
            select(Shipment.id)
            .where(tuple_(Shipment.account_id, Shipment.order_code).in_(pairs))
            .order_by(Shipment.id)
            .with_for_update()
        )


def _locked_shipment(session: Session, account_id: int, order_code: str) -> Shipment | None:
    return session.scalar(
        select(Shipment)
        .where(Shipment.account_id == account_id, Shipment.order_code == order_code)
        .with_for_update()
    )
