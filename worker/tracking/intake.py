"""Order intake: validating and registering order codes, the same for every way in, and the
carrier's pushes, which may name an order not registered yet."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from sqlalchemy import BigInteger, String, Table, delete, func, literal, select, tuple_
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.orm import Session

from worker.carrier.push import PushRefused, StatusPush
from worker.core.db import as_arrays, unnested
from worker.domain.models import (
    Account,
    AccountRef,
    OutboxEvent,
    PushReceipt,
    Shipment,
    UnknownAccount,
)
from worker.domain.vocabulary import ErrorCode, validate_order_code
from worker.tracking.record import BatchWrites, PollContext, apply_push

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


def register_for(session: Session, account: AccountRef, order_codes: Iterable[str]) -> IntakeResult:
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


# A batch's receipts, and the orders it locks, each in one statement whose SQL is the same
# whatever their number (`unnested`). The receipts returned were never received before.
_RECEIPTS = cast(Table, PushReceipt.__table__)
_RECEIPT_COLUMNS = ["account_id", "transaction_id", "shipment_id"]
_NEW_RECEIPT = (
    insert(_RECEIPTS)
    .from_select(
        _RECEIPT_COLUMNS, select(unnested(*(_RECEIPTS.c[name] for name in _RECEIPT_COLUMNS)))
    )
    .on_conflict_do_nothing()
    .returning(_RECEIPTS.c.account_id, _RECEIPTS.c.transaction_id)
)
_SHIPMENTS = cast(Table, Shipment.__table__)
_ORDER_COLUMNS = ["account_id", "order_code"]
_LOCK_ORDERS = (
    select(Shipment)
    .where(
        tuple_(Shipment.account_id, Shipment.order_code).in_(
            select(unnested(*(_SHIPMENTS.c[name] for name in _ORDER_COLUMNS)))
        )
    )
    .order_by(Shipment.id)
    .with_for_update()
)


@dataclass(frozen=True)
class PushReceived:
    """What became of one carrier push: applied (with its events), or a resent one ignored."""

    events: list[OutboxEvent]
    duplicate: bool = False


class PushBatch:
    """The shipments and receipts of carrier pushes applied together in one transaction, read
    and written in a few statements for the whole batch rather than a few per push.

    Made by `prepare_pushes`: every tracked shipment of the batch is locked in one statement, in
    id order as a poll batch locks its own (so the two never wait on each other in a circle);
    orders not tracked yet are registered; every push's `TransactionId` is recorded in one
    statement, and only the first push of each one not recorded before is applied. The history
    rows the new ones may add are read in one statement; `finish` writes them, and the batch's
    outbox events, in one statement each.
    """

    def __init__(
        self,
        shipments: dict[tuple[int, str], Shipment],
        fresh: set[tuple[int, uuid.UUID]],
        writes: BatchWrites,
    ) -> None:
        self._shipments = shipments
        self._fresh = fresh
        self.writes = writes

    def shipment(self, account_id: int, order_code: str) -> Shipment:
        return self._shipments[(account_id, order_code)]

    def take(self, account_id: int, transaction_id: uuid.UUID) -> bool:
        """Whether this push is new: its TransactionId never seen before this one."""
        key = (account_id, transaction_id)
        if key not in self._fresh:
            return False
        self._fresh.discard(key)
        return True

    def finish(self, session: Session) -> None:
        """Write what the batch's pushes left for the end: history rows and outbox events."""
        self.writes.write(session)


def prepare_pushes(session: Session, pushes: Sequence[tuple[AccountRef, StatusPush]]) -> PushBatch:
    """Lock, register and receipt what these pushes need; pushes with a refused order code are
    left out (`receive_push` refuses them, having written nothing)."""
    accepted = [(a, p) for a, p in pushes if validate_order_code(p.order_code) is None]
    pairs = sorted({(a.id, p.order_code) for a, p in accepted})
    shipments = _lock_orders(session, pairs)
    missing: dict[int, tuple[AccountRef, list[str]]] = {}
    for account, push in accepted:
        if (account.id, push.order_code) not in shipments:
            missing.setdefault(account.id, (account, []))[1].append(push.order_code)
    if missing:
        for account, codes in missing.values():
            register_for(session, account, codes)
        shipments |= _lock_orders(session, [pair for pair in pairs if pair not in shipments])
    receipts = [
        {
            "account_id": account.id,
            "transaction_id": push.transaction_id,
            "shipment_id": shipments[(account.id, push.order_code)].id,
        }
        for account, push in accepted
    ]
    fresh: set[tuple[int, uuid.UUID]] = set()
    if receipts:
        fresh = {
            (row.account_id, row.transaction_id)
            for row in session.connection().execute(
                _NEW_RECEIPT, as_arrays(receipts, _RECEIPT_COLUMNS)
            )
        }
    expected = [
        (shipments[(account.id, push.order_code)], (push.status_entry,))
        for account, push in accepted
        if (account.id, push.transaction_id) in fresh
    ]
    return PushBatch(shipments, fresh, BatchWrites(session, expected))


def receive_push(
    session: Session, account: AccountRef, push: StatusPush, ctx: PollContext, batch: PushBatch
) -> PushReceived:
    """Apply a carrier push for `account`, its order registered by `prepare_pushes` if new.

    Raises PushRefused for an order code intake refuses. In the caller's transaction, with the
    shipment row locked like a poll's, so a push and a poll apply one after the other; `batch`
    is what `prepare_pushes` made for the pushes applied with this one, finished by the caller.
    """
    error = validate_order_code(push.order_code)
    if error is not None:
        raise PushRefused(f"OrderCode {push.order_code!r} is refused: {error.value}")
    if not batch.take(account.id, push.transaction_id):
        return PushReceived([], duplicate=True)
    shipment = batch.shipment(account.id, push.order_code)
    result = push.as_result()
    applied = apply_push(session, shipment, account, result, ctx, batch.writes, push.changed_from)
    return PushReceived(applied.events)


def _lock_orders(
    session: Session, pairs: Sequence[tuple[int, str]]
) -> dict[tuple[int, str], Shipment]:
    """The shipments of these (account id, order code) pairs, locked in id order."""
    if not pairs:
        return {}
    orders = as_arrays(({"account_id": a, "order_code": c} for a, c in pairs), _ORDER_COLUMNS)
    return {(s.account_id, s.order_code): s for s in session.scalars(_LOCK_ORDERS, orders)}
