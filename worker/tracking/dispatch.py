"""Dispatching: claiming the shipments that are due, as many per key as the quota allows now."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, literal, select, text
from sqlalchemy.orm import Session

from worker.domain.models import Account, QuotaUsage, Shipment

# A claimed shipment's next_poll_at is pushed this far ahead: if the worker polling it dies,
# the shipment comes due again by itself. Longer than a poll task's hard time limit.
LEASE = timedelta(minutes=5)
# Shipments per poll task: large enough to batch database writes, small enough to spread
# a tick's work over several worker processes.
BATCH_SIZE = 50
# The most polls one key may be granted per dispatch tick.
MAX_PER_TICK = 1000
# The most new shipments given their first lookup per dispatch tick; the rest wait a tick.
FIRST_PLANS_PER_TICK = 5000


@dataclass(frozen=True)
class Claim:
    """A batch of one account's shipments leased for one poll task until `leased_until`."""

    account_id: int
    shipment_ids: list[int]
    leased_until: datetime

    @property
    def batch(self) -> str:
        """What names this batch among the account's: its lease and its first shipment."""
        return f"{self.leased_until.isoformat()}/{self.shipment_ids[0]}"

    def as_task_args(self) -> tuple[int, list[int], str]:
        return self.account_id, self.shipment_ids, self.leased_until.isoformat()


def database_now(session: Session) -> datetime:
    """PostgreSQL's clock: the one every dispatcher leases by, whatever its own clock says.

    A lease is a `next_poll_at` in the future; read on a worker's clock hours ahead, every
    leased shipment would look due and be claimed, and looked up, a second time.
    """
    now: datetime = session.execute(select(func.clock_timestamp())).scalar_one()
    return now


def pollable_accounts(session: Session, now: datetime) -> list[Account]:
    """Accounts not paused at `now`, the least served of the current carrier day first.

    Each grant draws from the total of all keys, so the order is what shares the total once it
    binds: served least-first, a key wanting less than an equal share gets all it wants (within
    its own line) and the others split the rest evenly: no two keys wanting more than they get
    drift apart by more than one tick's grant, whatever their ids and whichever dispatcher runs.
    """
    # The current carrier day is the latest one with grants within a day of `now`'s UTC date
    # (every carrier timezone's local date lies in that window), so no timezone is needed here.
    # Before the first grant of a new day this is still yesterday, which orders as well.
    utc_date = now.astimezone(UTC).date()
    day = (
        select(func.max(QuotaUsage.day))
        .where(QuotaUsage.day.between(utc_date - timedelta(days=1), utc_date + timedelta(days=1)))
        .scalar_subquery()
    )
    served = (
        select(QuotaUsage.used)
        .where(QuotaUsage.account_id == Account.id, QuotaUsage.day == day)
        .correlate(Account)
        .scalar_subquery()
    )
    return list(
        session.scalars(
            select(Account)
            .where((Account.paused_until.is_(None)) | (Account.paused_until <= now))
            .order_by(func.coalesce(served, 0), Account.id)
        )
    )


def count_due(session: Session, account_id: int, now: datetime, limit: int) -> int:
    """How many of the account's active shipments are due (counting at most `limit`)."""
    # Only the index's own columns: an index-only scan of ix_shipments_due.
    due = (
        select(literal(1))
        .where(Shipment.active, Shipment.account_id == account_id, Shipment.next_poll_at <= now)
        .limit(limit)
        .subquery()
    )
    return session.scalar(select(func.count()).select_from(due)) or 0


def claim_due(session: Session, account_id: int, limit: int, now: datetime) -> Claim:
    """Lease up to `limit` due shipments of an account, most overdue first."""
    leased_until = now + LEASE
    # SKIP LOCKED: a second dispatcher (a duplicate beat) claims other rows instead of
    # waiting for these, and never the same ones.
    ids = session.scalars(
        text(
            """
            UPDATE shipments SET next_poll_at = :leased_until
            WHERE id IN (
                SELECT id FROM shipments
                WHERE active AND account_id = :account_id AND next_poll_at <= :now
                ORDER BY next_poll_at
                LIMIT :limit
                FOR UPDATE SKIP LOCKED
            )
            RETURNING id
            """
        ),
        {"leased_until": leased_until, "account_id": account_id, "now": now, "limit": limit},
    ).all()
    return Claim(account_id, sorted(ids), leased_until)


def batches(claim: Claim, size: int = BATCH_SIZE) -> Iterator[Claim]:
    for start in range(0, len(claim.shipment_ids), size):
        yield Claim(claim.account_id, claim.shipment_ids[start : start + size], claim.leased_until)


FirstLookup = Callable[[int, datetime], datetime]
"""(account id, registered at) -> when the scheduler wants a new shipment's first lookup."""


def plan_first_lookups(session: Session, now: datetime, first_lookup: FirstLookup) -> int:
    """Give newly registered shipments the first lookup the scheduler wants; returns how many.

    A new row is due at its registration (both columns default to the same moment), so every
    way in (the Celery task, `shipmon track`, a plain INSERT) passes here before its first
    lookup can be claimed. A first lookup planned for now or earlier is claimed at once.
    The WHERE clause is the predicate of `ix_shipments_unplanned`, which holds only the rows
    still to plan: a tick reads those, however long the backlog of due rows.
    """
    rows = session.execute(
        text(
            """
            SELECT id, account_id, registered_at FROM shipments
            WHERE active AND last_polled_at IS NULL AND next_poll_at = registered_at
              AND next_poll_at <= :now
            ORDER BY registered_at
            LIMIT :limit
            FOR UPDATE SKIP LOCKED
            """
        ),
        {"now": now, "limit": FIRST_PLANS_PER_TICK},
    ).all()
    if rows:
        # One statement for the whole tick's plans: updated one by one, each row's round trip
        # and index upkeep cost about twice as much.
        session.execute(
            text(
                """
                UPDATE shipments SET next_poll_at = plan.first_lookup
                FROM unnest(CAST(:ids AS bigint[]), CAST(:first_lookups AS timestamptz[]))
                    AS plan(id, first_lookup)
                WHERE shipments.id = plan.id
                """
            ),
            {
                "ids": [row.id for row in rows],
                "first_lookups": [first_lookup(row.account_id, row.registered_at) for row in rows],
            },
        )
    return len(rows)


Grant = Callable[[Session, int, int, int], int]
"""(session, account id, wanted, daily quota) -> polls granted now; counts them as spent."""
Refund = Callable[[Session, int, int], None]
"""(session, account id, polls) -> gives back grants that were not used."""


def dispatch(
    session: Session,
    now: datetime,
    daily_quota: Callable[[Account], int],
    grant: Grant,
    refund: Refund,
    first_lookup: FirstLookup | None = None,
) -> list[Claim]:
    """Claim what every unpaused account may poll now, in batches for poll tasks.

    `now` decides what is due and when leases end: `database_now` in production, a simulated
    clock in tests and simulations. With `first_lookup`, newly registered shipments first get
    their planned first lookup.
    """
    if first_lookup is not None:
        plan_first_lookups(session, now, first_lookup)
    claims: list[Claim] = []
    for account in pollable_accounts(session, now):
        due = count_due(session, account.id, now, MAX_PER_TICK)
        if not due:
            continue
        granted = grant(session, account.id, due, daily_quota(account))
        if not granted:
            continue
        claim = claim_due(session, account.id, granted, now)
        if len(claim.shipment_ids) < granted:
            refund(session, account.id, granted - len(claim.shipment_ids))
        claims.extend(batches(claim))
    return claims
