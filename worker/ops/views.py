"""The ops views: one shipment's whole story, and the system at a glance.

Plain functions over the caller's session, shared by `shipmon show`, `shipmon stats`, the
HTTP API and the metrics (stalls are in `worker.ops.stalled`, retention in
`worker.ops.retention`). The SQL views of migration 0004 answer the same questions for
people who query the tables directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from worker.domain.deliveries import DeliveryState
from worker.domain.events import jsonable
from worker.domain.models import (
    Account,
    Delivery,
    DeliveryAttempt,
    EmailRecipient,
    OutboxEvent,
    Shipment,
    StatusEvent,
    TrackingEvent,
    WebhookEndpoint,
)
from worker.domain.vocabulary import EventType, parse_status
from worker.quota.limiter import KeyStatus
from worker.tracking.record import EventRecorder, stop_polling

# What `shipmon stats` counts as recent, and how many stalled shipments it names.
RECENT = timedelta(hours=24)
HOURS_SHOWN = 24
STALLED_SHOWN = 20
# Why polling stopped when the merchant asked for it, over the API or the command line.
STOPPED_BY_MERCHANT = "stopped_by_merchant"


class ShipmentNotFound(LookupError):
    """No shipment has that order code (in that account); the message says what to try."""


# -- one shipment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusRecord:
    """A status the shipment entered, as the carrier's history shows it."""

    status: str
    status_id: int | None
    status_code: str | None
    tracking_name: str | None
    occurred_at: datetime
    seen_at: datetime


@dataclass(frozen=True)
class ScanRecord:
    """A scan at a post office."""

    status_id: int | None
    status_name: str | None
    post_office: str | None
    province: str | None
    occurred_at: datetime | None
    notes: str | None
    seen_at: datetime


@dataclass(frozen=True)
class DelayRecord:
    """A delay the carrier reported, with its reason, when shipmon saw it."""

    code: int | None
    reason: str | None
    note: str | None
    seen_at: datetime


@dataclass(frozen=True)
class AttemptRecord:
    """One try at sending a notification."""

    attempted_at: datetime
    status_code: int | None
    duration_ms: int
    error: str | None


@dataclass(frozen=True)
class DeliveryRecord:
    """A notification on its way to one webhook endpoint or email address."""

    channel: str  # "webhook" or "email"
    destination: str
    state: str
    next_attempt_at: datetime
    completed_at: datetime | None
    attempts: list[AttemptRecord]


@dataclass(frozen=True)
class NotificationRecord:
    """An outbox event of the shipment and every delivery made of it."""

    event_id: str
    type: str
    sequence: int
    created_at: datetime
    deliveries: list[DeliveryRecord]


@dataclass(frozen=True)
class ShipmentStory:
    """Everything shipmon knows about one shipment: `shipmon show`."""

    account: str
    order_code: str
    current: dict[str, Any]
    statuses: list[StatusRecord]
    scans: list[ScanRecord]
    delays: list[DelayRecord]
    notifications: list[NotificationRecord]

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = jsonable(self)
        return result


def _current(shipment: Shipment) -> dict[str, Any]:
    delay = None
    if shipment.delay_code is not None:
        delay = {
            "code": shipment.delay_code,
            "reason": shipment.delay_reason,
            "note": shipment.delay_note,
        }
    return {
        "status": {
            "name": shipment.status,
            "id": shipment.status_id,
            "code": shipment.status_code,
            "tracking_name": shipment.tracking_name,
        },
        "status_changed_at": shipment.status_changed_at,
        "last_scan_at": shipment.last_scan_at,
        "delay": delay,
        "receiver_name": shipment.receiver_name,
        "delivery_date": shipment.delivery_date,
        "delivery_notes": shipment.delivery_notes,
        "confirm_images": shipment.confirm_images or [],
        # The carrier's estimated delivery, as it sent it (its shape is not documented).
        "estimate_routes": shipment.estimate_routes,
        "active": shipment.active,
        "stopped_reason": shipment.stopped_reason,
        "stalled_at": shipment.stalled_at,
        "registered_at": shipment.registered_at,
        "found_at": shipment.found_at,
        "terminal_at": shipment.terminal_at,
        "last_polled_at": shipment.last_polled_at,
        "next_poll_at": shipment.next_poll_at,
        "polls_made": shipment.polls_made,
        "consecutive_errors": shipment.consecutive_errors,
        "last_error_code": shipment.last_error_code,
    }


def find_shipment(session: Session, order_code: str, account: str | None = None) -> Shipment:
    """The shipment with this order code, in `account` when the code is in several accounts."""
    return _find_shipment(session, order_code, account)[0]


def _find_shipment(session: Session, order_code: str, account: str | None) -> tuple[Shipment, str]:
    query = select(Shipment, Account.name).join(Account).where(Shipment.order_code == order_code)
    if account is not None:
        query = query.where(Account.name == account)
    found = session.execute(query.order_by(Account.name)).all()
    if not found:
        where = f" in account {account!r}" if account is not None else ""
        raise ShipmentNotFound(
            f"no shipment {order_code!r}{where}; register it with: shipmon track --account NAME "
            f"{order_code}"
        )
    if len(found) > 1:
        names = ", ".join(name for _, name in found)
        raise ShipmentNotFound(
            f"{order_code!r} is in several accounts ({names}); choose one with --account NAME"
        )
    shipment, name = found[0]
    return shipment, name


def shipment_story(session: Session, order_code: str, account: str | None = None) -> ShipmentStory:
    """The shipment's current state, full status and scan history, delays and notifications."""
    shipment, account_name = _find_shipment(session, order_code, account)
    statuses = [
        StatusRecord(
            e.status, e.status_id, e.status_code, e.tracking_name, e.occurred_at, e.seen_at
        )
        for e in session.scalars(
            select(StatusEvent)
            .where(StatusEvent.shipment_id == shipment.id)
            .order_by(StatusEvent.occurred_at, StatusEvent.id)
        )
    ]
    scans = [
        ScanRecord(
            t.status_id,
            t.status_name,
            t.post_office_name or t.post_office_id,
            t.province_name or t.province_id,
            t.occurred_at,
            t.notes,
            t.seen_at,
        )
        for t in session.scalars(
            select(TrackingEvent)
            .where(TrackingEvent.shipment_id == shipment.id)
            .order_by(TrackingEvent.occurred_at.nulls_last(), TrackingEvent.id)
        )
    ]
    events = list(
        session.scalars(
            select(OutboxEvent)
            .where(OutboxEvent.shipment_id == shipment.id)
            .order_by(OutboxEvent.sequence)
        )
    )
    # Delays live in the events that announced them: the shipment row keeps only the latest.
    delays = [
        DelayRecord(
            e.data["delay"].get("code"),
            e.data["delay"].get("reason"),
            e.data["delay"].get("note"),
            e.created_at,
        )
        for e in events
        if e.type == EventType.DELAYED.value and e.data.get("delay")
    ]
    return ShipmentStory(
        account=account_name,
        order_code=shipment.order_code,
        current=_current(shipment),
        statuses=statuses,
        scans=scans,
        delays=delays,
        notifications=_notifications(session, events),
    )


def _notifications(session: Session, events: Sequence[OutboxEvent]) -> list[NotificationRecord]:
    if not events:
        return []  # most shipments: two queries saved on every `show`
    ids = [e.id for e in events]
    rows = session.execute(
        select(Delivery, WebhookEndpoint.url, EmailRecipient.address)
        .outerjoin(WebhookEndpoint, WebhookEndpoint.id == Delivery.endpoint_id)
        .outerjoin(EmailRecipient, EmailRecipient.id == Delivery.recipient_id)
        .where(Delivery.event_id.in_(ids))
        .order_by(Delivery.id)
    ).all()
    attempts: dict[int, list[AttemptRecord]] = {}
    for a in session.scalars(
        select(DeliveryAttempt)
        .where(DeliveryAttempt.delivery_id.in_([d.id for d, _, _ in rows]))
        .order_by(DeliveryAttempt.attempted_at, DeliveryAttempt.id)
    ):
        attempts.setdefault(a.delivery_id, []).append(
            AttemptRecord(a.attempted_at, a.status_code, a.duration_ms, a.error)
        )
    deliveries: dict[int, list[DeliveryRecord]] = {}
    for delivery, url, address in rows:
        deliveries.setdefault(delivery.event_id, []).append(
            DeliveryRecord(
                channel="webhook" if delivery.endpoint_id is not None else "email",
                destination=url if delivery.endpoint_id is not None else address,
                state=delivery.state,
                next_attempt_at=delivery.next_attempt_at,
                completed_at=delivery.completed_at,
                attempts=attempts.get(delivery.id, []),
            )
        )
    return [
        NotificationRecord(e.event_id, e.type, e.sequence, e.created_at, deliveries.get(e.id, []))
        for e in events
    ]


def list_shipments(
    session: Session,
    account_id: int,
    *,
    status: str | None,
    changed_since: datetime | None,
    after: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """One page of an account's shipments, by order code, after the order code `after`.

    Keyset order on the account's unique order codes: a page never repeats or skips a row that
    existed when the listing began, whatever is inserted meanwhile. `status` takes any of the
    carrier's spellings; `changed_since` matches registration, a status change or a scan.
    """
    query = select(Shipment).where(Shipment.account_id == account_id)
    if status is not None:
        known = parse_status(status)
        query = query.where(Shipment.status == (known.value if known else status))
    if changed_since is not None:
        changed = func.greatest(
            Shipment.registered_at, Shipment.status_changed_at, Shipment.last_scan_at
        )
        query = query.where(changed >= changed_since)
    if after is not None:
        query = query.where(Shipment.order_code > after)
    rows = session.scalars(query.order_by(Shipment.order_code).limit(limit))
    return [{"order_code": s.order_code} | jsonable(_current(s)) for s in rows]


def stop_tracking(
    session: Session, order_code: str, account: str | None, now: datetime
) -> list[int]:
    """Stop polling a shipment at the merchant's request, announcing it with
    `shipment.polling_stopped`; returns the event ids to deliver (none if already stopped)."""
    shipment = find_shipment(session, order_code, account)
    # A poll applying its answer right now holds the row; stop after it, never under it.
    session.refresh(shipment, with_for_update=True)
    if not shipment.active:
        return []
    owner = session.get_one(Account, shipment.account_id)
    recorder = EventRecorder(session, shipment, owner, now)
    stop_polling(shipment, recorder, EventType.POLLING_STOPPED, STOPPED_BY_MERCHANT)
    session.flush()
    return [e.id for e in recorder.events]


# -- the system at a glance ----------------------------------------------------------------------


@dataclass(frozen=True)
class StatusCount:
    """Shipments of one account in one status: still watched, and finished or stopped."""

    account: str
    status: str | None
    open: int
    closed: int


@dataclass(frozen=True)
class OverdueShipment:
    """The shipment that has waited longest for its poll."""

    account: str
    order_code: str
    due_at: datetime
    overdue_seconds: float


@dataclass(frozen=True)
class TransitionCount:
    """Status changes from one status to another (None: the first status seen)."""

    from_status: str | None
    to_status: str | None
    count: int


@dataclass(frozen=True)
class DelayCount:
    """Delays reported with one reason."""

    code: int | None
    reason: str | None
    count: int


@dataclass(frozen=True)
class FailingEndpoint:
    """A webhook endpoint that fails or was disabled, with its undelivered events."""

    id: int
    account: str
    url: str
    enabled: bool
    failing_since: datetime | None
    disabled_reason: str | None
    pending: int
    dead: int


@dataclass(frozen=True)
class StalledShipment:
    """An open shipment reported stalled: no scan or status for longer than normal."""

    account: str
    order_code: str
    status: str | None
    last_change_at: datetime | None
    stalled_at: datetime


@dataclass(frozen=True)
class Stats:
    """`shipmon stats`: what every ops question starts with."""

    generated_at: datetime
    shipments: list[StatusCount]
    quota: list[KeyStatus]
    due: int
    oldest_overdue: OverdueShipment | None
    transitions: list[TransitionCount]
    # Status changes seen in each of the last 24 hours, the oldest hour first.
    transitions_by_hour: list[int]
    delays: list[DelayCount]
    failing_endpoints: list[FailingEndpoint]
    stalled: int
    stalled_oldest: list[StalledShipment]

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = jsonable(self)
        result["quota"] = [line.as_dict() for line in self.quota]
        return result


def collect_stats(session: Session, now: datetime, quota: Sequence[KeyStatus]) -> Stats:
    """Shipments by status and account, the poll backlog, the last 24 hours, what is failing.

    `quota` is the limiter's view of the carrier day (`QuotaLimiter.status`), shown as is.
    """
    since = now - RECENT
    due = session.scalar(select(func.count()).where(Shipment.active, Shipment.next_poll_at <= now))
    oldest = session.execute(
        select(Account.name, Shipment.order_code, Shipment.next_poll_at)
        .join(Account)
        .where(Shipment.active, Shipment.next_poll_at <= now)
        .order_by(Shipment.next_poll_at)
        .limit(1)
    ).first()
    previous = OutboxEvent.data["previous_status"]["name"].astext
    current = OutboxEvent.data["status"]["name"].astext
    changed = (OutboxEvent.type == EventType.STATUS_CHANGED.value, OutboxEvent.created_at > since)
    transitions = session.execute(
        select(previous, current, func.count())
        .where(*changed)
        .group_by(previous, current)
        .order_by(func.count().desc(), previous, current)
    ).all()
    hour = func.floor(func.extract("epoch", OutboxEvent.created_at - since) / 3600)
    by_hour: dict[int, int] = {
        int(h): n
        for h, n in session.execute(select(hour, func.count()).where(*changed).group_by(hour))
    }
    code = OutboxEvent.data["delay"]["code"].astext.cast(Shipment.delay_code.type)
    reason = OutboxEvent.data["delay"]["reason"].astext
    delays = session.execute(
        select(code, reason, func.count())
        .where(OutboxEvent.type == EventType.DELAYED.value, OutboxEvent.created_at > since)
        .group_by(code, reason)
        .order_by(func.count().desc(), code)
    ).all()
    stalled = (Shipment.active, Shipment.stalled_at.is_not(None))
    return Stats(
        generated_at=now,
        shipments=_status_counts(session),
        quota=list(quota),
        due=due or 0,
        oldest_overdue=(
            OverdueShipment(oldest[0], oldest[1], oldest[2], (now - oldest[2]).total_seconds())
            if oldest is not None
            else None
        ),
        transitions=[TransitionCount(f, t, n) for f, t, n in transitions],
        transitions_by_hour=[by_hour.get(h, 0) for h in range(HOURS_SHOWN)],
        delays=[DelayCount(c, r, n) for c, r, n in delays],
        failing_endpoints=failing_endpoints(session),
        stalled=session.scalar(select(func.count()).where(*stalled)) or 0,
        stalled_oldest=[
            StalledShipment(name, s.order_code, s.status, _last_change(s), s.stalled_at)
            for s, name in session.execute(
                select(Shipment, Account.name)
                .join(Account)
                .where(*stalled)
                .order_by(Shipment.stalled_at, Shipment.id)
                .limit(STALLED_SHOWN)
            )
            if s.stalled_at is not None
        ],
    )


def _last_change(shipment: Shipment) -> datetime | None:
    moments = [m for m in (shipment.status_changed_at, shipment.last_scan_at) if m is not None]
    return max(moments, default=None)


def _status_counts(session: Session) -> list[StatusCount]:
    open_ = func.count().filter(Shipment.active)
    closed = func.count().filter(~Shipment.active)
    rows = session.execute(
        select(Account.name, Shipment.status, open_, closed)
        .join(Account)
        .group_by(Account.name, Shipment.status)
        .order_by(Account.name, Shipment.status.nulls_first())
    ).all()
    return [StatusCount(name, status, o, c) for name, status, o, c in rows]


def failing_endpoints(session: Session) -> list[FailingEndpoint]:
    """Webhook endpoints failing now or disabled, with their pending and dead deliveries."""
    pending = func.count(Delivery.id).filter(Delivery.state == DeliveryState.PENDING)
    dead = func.count(Delivery.id).filter(Delivery.state == DeliveryState.DEAD)
    rows = session.execute(
        select(WebhookEndpoint, Account.name, pending, dead)
        .join(Account, Account.id == WebhookEndpoint.account_id)
        .outerjoin(Delivery, Delivery.endpoint_id == WebhookEndpoint.id)
        .where(or_(WebhookEndpoint.failing_since.is_not(None), ~WebhookEndpoint.enabled))
        .group_by(WebhookEndpoint.id, Account.name)
        .order_by(WebhookEndpoint.failing_since.nulls_last(), WebhookEndpoint.id)
    ).all()
    return [
        FailingEndpoint(
            e.id, name, e.url, e.enabled, e.failing_since, e.disabled_reason, n_pending, n_dead
        )
        for e, name, n_pending, n_dead in rows
    ]
