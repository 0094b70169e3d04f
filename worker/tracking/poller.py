"""Polling a claimed batch: ask the carrier about every shipment at once, apply the answers.

The carrier is asked with bounded concurrency and no database transaction open; the answers
are then applied in one transaction, so a batch costs two short round trips to PostgreSQL
however many shipments it holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from worker.carrier.client import CarrierClient
from worker.carrier.errors import CarrierError, CarrierErrorCode, CarrierTimeout
from worker.carrier.parse import TrackingResult
from worker.core import metrics
from worker.core.crypto import decrypt
from worker.domain.events import EventData
from worker.domain.models import Account, OutboxEvent, Shipment
from worker.domain.pauses import Alert
from worker.domain.vocabulary import EventType
from worker.scheduling.learning import PlanCache
from worker.tracking.accounts import PauseForLimit, pause
from worker.tracking.dispatch import Claim
from worker.tracking.record import (
    Applied,
    PollContext,
    apply_outcome,
    apply_refused,
    lock_shipments,
)

log = logging.getLogger(__name__)

# Waits before applying a batch again while PostgreSQL is away: about a minute in all, well
# within a poll task's time limit.
APPLY_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)

# A poll task must apply the lookups it paid for before Celery's hard limit kills it
# (worker.runtime.celery.POLL_TIME_LIMIT, 120 s): the lookups get this long in all, waiting out
# PostgreSQL the APPLY_RETRY_DELAYS (61 s), and applying the batch what is left.
LOOKUP_BUDGET = 40.0

Outcome = TrackingResult | CarrierError
Release = Callable[[Session, int, str, int], object]
"""(session, account id, batch, shipments started) -> gives back the batch's unused grants."""


@dataclass
class BatchReport:
    """What a poll batch did."""

    polled: int = 0
    # Shipments of the claim no longer under it when the task started, or when it applied.
    skipped: int = 0
    event_ids: list[int] = field(default_factory=list)
    paused: str | None = None
    alert: Alert | None = None


async def track_all(
    client: CarrierClient,
    api_key: str,
    order_codes: list[str],
    concurrency: int,
    budget: float = LOOKUP_BUDGET,
) -> list[Outcome]:
    """The carrier's answer (or the failure) for every order code, in order.

    Lookups still waiting for a slot or an answer after `budget` seconds are given up as
    timeouts, so the answers already received are applied within the task's time limit.
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(code: str) -> Outcome:
        async with gate:
            try:
                with metrics.timing_lookup():
                    return await client.track(code, api_key)
            except CarrierError as error:
                return error

    lookups = [asyncio.ensure_future(one(code)) for code in order_codes]
    if not lookups:
        return []
    _, late = await asyncio.wait(lookups, timeout=budget)
    for lookup in late:
        lookup.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    return [
        lookup.result()
        if not lookup.cancelled()
        else CarrierTimeout(f"no answer within the batch's {budget:g} s", order_code=code)
        for code, lookup in zip(order_codes, lookups, strict=True)
    ]


async def poll_claim(
    sessions: sessionmaker[Session],
    client: CarrierClient,
    claim: Claim,
    *,
    secret_key: str,
    plans: PlanCache,
    max_interval: timedelta,
    concurrency: int,
    pause_for_limit: PauseForLimit,
    release: Release,
    clock: Callable[[], datetime],
) -> BatchReport:
    """Poll a claimed batch and apply every answer; returns the outbox events written."""
    report = BatchReport()
    # Starting moves the claim's token one microsecond on. A task delivered a second time
    # (its worker died) finds no shipment under the lease it carries, so it makes no lookup
    # that the quota did not grant: the shipments come due again when the lease runs out and
    # are dispatched, and granted, anew.
    started = claim.leased_until + timedelta(microseconds=1)
    with sessions.begin() as session:
        account = session.get(Account, claim.account_id)
        if account is None:
            return report
        api_key = decrypt(account.api_key_encrypted, secret_key)
        rows = session.execute(
            update(Shipment)
            .where(
                Shipment.id.in_(claim.shipment_ids),
                Shipment.next_poll_at == claim.leased_until,
                Shipment.active,
            )
            .values(next_poll_at=started)
            .returning(Shipment.id, Shipment.order_code)
        ).all()
        # Those no longer under the lease will not be looked up here: their grants go back.
        release(session, claim.account_id, claim.batch, len(rows))
    report.skipped = len(claim.shipment_ids) - len(rows)
    if not rows:
        return report
    outcomes = dict(
        zip(
            (r.id for r in rows),
            await track_all(client, api_key, [r.order_code for r in rows], concurrency),
            strict=True,
        )
    )
    for delay in (*APPLY_RETRY_DELAYS, None):
        try:
            report, events = _apply_all(
                sessions, claim.account_id, started, outcomes, report.skipped,
                plans=plans, max_interval=max_interval, pause_for_limit=pause_for_limit,
                clock=clock,
            )  # fmt: skip
            break
        except OperationalError:
            # PostgreSQL went away after the lookups were made: they are paid for, so wait for
            # it rather than let the lease run out and look everything up again.
            if delay is None:
                raise
            log.warning("cannot apply a poll batch yet; retrying in %s s", delay)
            await asyncio.sleep(delay)
    _count(outcomes.values(), events)
    return report


def _apply_all(
    sessions: sessionmaker[Session],
    account_id: int,
    started: datetime,
    outcomes: dict[int, Outcome],
    skipped: int,
    *,
    plans: PlanCache,
    max_interval: timedelta,
    pause_for_limit: PauseForLimit,
    clock: Callable[[], datetime],
) -> tuple[BatchReport, list[OutboxEvent]]:
    """Apply a batch's answers in one transaction; what it did, and the outbox events."""
    done = BatchReport(skipped=skipped)
    with sessions.begin() as session:
        now = clock()
        model = plans.current(session)
        ceiling = plans.max_interval(account_id, max_interval)
        ctx = PollContext(now, model, plans.price(account_id), ceiling, model.coverage(account_id))
        account = session.get(Account, account_id, with_for_update=True)
        assert account is not None
        events = []
        due = []
        for shipment in lock_shipments(session, list(outcomes)):
            # Moved off this lease: claimed again once it ran out, so the answer is another
            # poll's to apply. A carrier push landing during the lookup re-plans the shipment
            # too, but the lease still holds and the answer, paid for, applies.
            if shipment.next_poll_at != started and now >= started:
                done.skipped += 1
                continue
            due.append(shipment)
        for applied in _apply_batch(session, due, account, outcomes, ctx):
            done.polled += 1
            events.extend(applied.events)
            if applied.pause is not None and done.paused is None:
                done.paused = type(applied.pause).__name__
                done.alert = pause(session, account, applied.pause, now, pause_for_limit)
        session.flush()
        done.event_ids = [e.id for e in events]
    return done, events


def _apply_batch(
    session: Session,
    shipments: list[Shipment],
    account: Account,
    outcomes: dict[int, Outcome],
    ctx: PollContext,
) -> list[Applied]:
    """Apply every shipment's outcome in one savepoint; if that fails, each in its own.

    One answer the database still refuses (a value the parser let through) must not roll back
    its neighbours' answers, paid for like it: that shipment backs off, the others apply. The
    common case stays one savepoint for the batch.
    """
    try:
        with session.begin_nested():
            return [apply_outcome(session, s, account, outcomes[s.id], ctx) for s in shipments]
    except OperationalError:
        raise  # the database is away: the caller waits for it and applies the batch again
    except Exception:
        log.warning("a poll batch did not apply as a whole; applying its shipments one by one")
    return [_apply_one(session, s, account, outcomes[s.id], ctx) for s in shipments]


def _apply_one(
    session: Session, shipment: Shipment, account: Account, outcome: Outcome, ctx: PollContext
) -> Applied:
    try:
        with session.begin_nested():
            return apply_outcome(session, shipment, account, outcome, ctx)
    except OperationalError:
        raise
    except Exception as error:
        log.warning(
            "order %s: the answer could not be stored (%s: %.300s); backing off",
            shipment.order_code, type(error).__name__, str(error).replace("\x00", ""),
            extra={"order_code": shipment.order_code},
        )  # fmt: skip
        return apply_refused(shipment, error, ctx)


def _count(outcomes: Iterable[Outcome], events: Iterable[OutboxEvent]) -> None:
    """Metrics for a committed batch: lookups by result, transitions, delays, detection delay."""
    for outcome in outcomes:
        if isinstance(outcome, TrackingResult):
            metrics.record_poll("ok")
        else:
            code = outcome.code if isinstance(outcome, CarrierErrorCode) else None
            metrics.record_poll(code.value if code is not None else type(outcome).__name__)
    for event in events:
        if event.type not in (EventType.STATUS_CHANGED, EventType.DELAYED):
            continue
        data = EventData.from_json(event.data)
        if event.type == EventType.DELAYED:
            metrics.record_delay(data.delay.code if data.delay else None)
            continue
        previous = data.previous_status.name if data.previous_status else None
        metrics.record_transition(previous, data.status.name or "")
        if data.event_time is not None:
            metrics.observe_detection_delay((data.seen_at - data.event_time).total_seconds())
