"""The outbox: events fanned out into deliveries, each shipment's kept in order behind retries.

The poll pipeline writes `OutboxEvent` rows in the transaction that saw the change. After it
commits, `fan_out` turns the new events into one `Delivery` per endpoint and email recipient
that wants them (`worker.notify.delivery` then sends them); a periodic sweep fanning out with no
ids is the safety net.

Per shipment and destination, the deliveries form a line in sequence order, and only its head
is ever sent, so a receiver sees a shipment's events in order even across retries. The
functions here keep the rest of a line due no sooner than its head: new deliveries queue behind
a retrying one, and a finished one releases its followers. Different destinations never wait
for each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from worker.domain.deliveries import DeliveryState
from worker.domain.models import Delivery, EmailRecipient, OutboxEvent, WebhookEndpoint
from worker.notify.webhooks.endpoints import HELD

__all__ = ["fan_out", "hold_followers", "release_followers"]

# Rows per INSERT when one fan-out makes many deliveries.
INSERT_CHUNK = 1000


def _wants(event_types: Sequence[str] | None, event_type: str) -> bool:
    return event_types is None or event_type in event_types


def fan_out(session: Session, event_ids: Sequence[int] | None = None, *, now: datetime) -> int:
    """Create the deliveries of events not yet fanned out; returns how many were created.

    `event_ids` are `OutboxEvent.id`s; None means every event not yet fanned out. Running it
    twice, or concurrently, creates nothing twice.
    """
    query = select(OutboxEvent).where(OutboxEvent.fanned_out_at.is_(None))
    if event_ids is not None:
        query = query.where(OutboxEvent.id.in_(event_ids))
    # Another worker fanning out the same events will do it; there is nothing to wait for.
    events = session.scalars(query.order_by(OutboxEvent.id).with_for_update(skip_locked=True)).all()
    if not events:
        return 0
    accounts = {e.account_id for e in events}
    endpoints = session.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.account_id, WebhookEndpoint.event_types).where(
            WebhookEndpoint.account_id.in_(accounts), WebhookEndpoint.enabled
        )
    ).all()
    recipients = session.execute(
        select(EmailRecipient.id, EmailRecipient.account_id, EmailRecipient.event_types).where(
            EmailRecipient.account_id.in_(accounts), EmailRecipient.enabled
        )
    ).all()
    rows: list[dict[str, Any]] = []
    for event in events:
        common = {
            "event_id": event.id,
            "shipment_id": event.shipment_id,
            "sequence": event.sequence,
            "next_attempt_at": now,
        }
        rows += [
            {**common, "endpoint_id": e.id}
            for e in endpoints
            if e.account_id == event.account_id and _wants(e.event_types, event.type)
        ]
        rows += [
            {**common, "recipient_id": r.id}
            for r in recipients
            if r.account_id == event.account_id and _wants(r.event_types, event.type)
        ]
    created: list[Delivery] = []
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[start : start + INSERT_CHUNK]
        # Either destination column is absent from half the rows; give every row both keys.
        chunk = [{"endpoint_id": None, "recipient_id": None, **row} for row in chunk]
        created += session.scalars(
            pg_insert(Delivery).values(chunk).on_conflict_do_nothing().returning(Delivery),
            execution_options={"populate_existing": True},
        ).all()
    _queue_behind_retries(session, created, now)
    session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_([e.id for e in events]))
        .values(fanned_out_at=now)
    )
    return len(created)


Line = tuple[int, int | None, int | None]


def _line(delivery: Delivery) -> Line:
    """The ordered stream a delivery belongs to: one shipment to one destination."""
    return delivery.shipment_id, delivery.endpoint_id, delivery.recipient_id


def _queue_behind_retries(session: Session, created: Sequence[Delivery], now: datetime) -> None:
    """Make new deliveries due no sooner than an earlier one of their line that is retrying.

    They could not be sent before it anyway; being due early would only make every claim read
    past them for as long as a receiver is down. The earlier deliveries are locked, so one that
    is being recorded as done right now is seen done (its followers are then made due again by
    `release_followers`).
    """
    if not created:
        return
    waiting = session.execute(
        select(Delivery)
        .where(
            Delivery.shipment_id.in_({d.shipment_id for d in created}),
            Delivery.state == DeliveryState.PENDING,
            Delivery.next_attempt_at > now,
            Delivery.id.not_in([d.id for d in created]),
        )
        .order_by(Delivery.id)
        .with_for_update(key_share=True)
    ).scalars()
    due_at: dict[Line, list[tuple[int, datetime]]] = {}
    for earlier in waiting:
        due_at.setdefault(_line(earlier), []).append((earlier.sequence, earlier.next_attempt_at))
    pushed = []
    for new in created:
        ahead = [at for sequence, at in due_at.get(_line(new), []) if sequence < new.sequence]
        if ahead:
            pushed.append({"id": new.id, "next_attempt_at": max(ahead)})
    if pushed:
        session.execute(update(Delivery), pushed)


def _followers(delivery: Delivery) -> Any:
    return and_(
        Delivery.shipment_id == delivery.shipment_id,
        Delivery.endpoint_id.is_not_distinct_from(delivery.endpoint_id),
        Delivery.recipient_id.is_not_distinct_from(delivery.recipient_id),
        Delivery.state == DeliveryState.PENDING,
        Delivery.sequence > delivery.sequence,
    )


def hold_followers(session: Session, delivery: Delivery, until: datetime) -> None:
    """Later deliveries of a retrying one's line wait with it (see `_queue_behind_retries`)."""
    session.execute(
        update(Delivery)
        .where(_followers(delivery), Delivery.next_attempt_at < until)
        .values(next_attempt_at=until)
    )


def release_followers(session: Session, delivery: Delivery, now: datetime) -> None:
    """The line's next delivery is due at once now that this one is done."""
    session.execute(
        update(Delivery)
        .where(
            _followers(delivery), Delivery.next_attempt_at > now, Delivery.next_attempt_at < HELD
        )
        .values(next_attempt_at=now)
    )
