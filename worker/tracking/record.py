"""Applying a poll's outcome (or the carrier's push) to a shipment: state, history,
transitions, outbox events. A push is a partial answer and takes the same path.

Everything here runs inside the caller's transaction, so a shipment's new state, its new
history rows and the outbox events describing the change commit together or not at all.
Re-applying the same answer changes nothing; an answer older than what is already recorded
never moves a shipment backwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, literal_column, select, tuple_
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.orm import Session

from worker.carrier.errors import (
    CarrierError,
    CarrierErrorCode,
    OrderCodeNotFound,
)
from worker.carrier.parse import StatusEntry, TrackingEntry, TrackingResult, ascii_integer
from worker.core.clock import iso_utc
from worker.core.db import as_arrays, unnested
from worker.domain.events import (
    CurrentStatus,
    DelayView,
    EventData,
    ScanView,
    Source,
    StallView,
    StatusView,
    jsonable,
)
from worker.domain.models import (
    Account,
    AccountRef,
    OutboxEvent,
    Shipment,
    StatusEvent,
    TrackingEvent,
)
from worker.domain.vocabulary import EventType, Status, delay_reason, parse_status
from worker.scheduling.coverage import NO_PUSHES, PushCoverage
from worker.scheduling.model import LearnedModel, ShipmentState, next_poll_at
from worker.tracking.accounts import KeyRefusal

log = logging.getLogger(__name__)

# How long a new order may stay unknown to the carrier before polling stops.
NOT_FOUND_GRACE = timedelta(days=3)
# After a terminal status, one more poll picks up a late delivery photo or final fees.
SETTLE_DELAY = timedelta(hours=2)
# Backoff for failures that say nothing about the shipment (carrier errors, timeouts, 5xx).
ERROR_BACKOFF_BASE = timedelta(seconds=30)
ERROR_BACKOFF_CAP = timedelta(hours=1)
# shipments.last_error_code's length.
ERROR_CODE_LIMIT = 60


@dataclass(frozen=True)
class PollContext:
    """What applying a result needs besides the result: the clock and the scheduler's view."""

    now: datetime
    model: LearnedModel
    price: float
    max_interval: timedelta
    # The account's push coverage: what pushes report needs fewer lookups.
    pushes: PushCoverage = NO_PUSHES

    def due_in(self, delay: timedelta) -> datetime:
        """`delay` from now, but never beyond the longest interval allowed."""
        return self.now + min(delay, self.max_interval)

    def plan(self, state: ShipmentState) -> datetime:
        """When the scheduler wants this shipment polled next, within the ceiling."""
        planned = next_poll_at(state, self.model, self.price, self.max_interval, self.pushes)
        return min(planned or self.now + self.max_interval, self.now + self.max_interval)


@dataclass
class Applied:
    """What one applied poll produced."""

    events: list[OutboxEvent]
    # The carrier refused the account's key: the caller pauses the account.
    pause: KeyRefusal | None = None


def new_event_id() -> str:
    """A sortable unique id: 48 bits of milliseconds, then 80 random bits."""
    return f"evt_{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


def _status_view(shipment: Shipment) -> StatusView:
    return StatusView(shipment.status, shipment.status_id, shipment.status_code)


class EventRecorder:
    """Writes the outbox events of one shipment, numbering them in sequence: added to the
    session, or to `batch` for its one statement."""

    def __init__(
        self,
        session: Session,
        shipment: Shipment,
        account: AccountRef,
        now: datetime,
        source: Source = "poll",
        batch: BatchWrites | None = None,
    ):
        self.session = session
        self.shipment = shipment
        self.account = account
        self.now = now
        self.source: Source = source
        self.batch = batch
        self.events: list[OutboxEvent] = []

    def emit(
        self,
        type_: EventType,
        event_time: datetime | None,
        *,
        status: CurrentStatus | None = None,
        previous_status: StatusView | None = None,
        reason: str | None = None,
        scan: ScanView | None = None,
        stalled: StallView | None = None,
    ) -> None:
        """Write one event; `status` defaults to the shipment's, the delay is the shipment's."""
        s = self.shipment
        s.last_sequence += 1
        data = EventData(
            order_code=s.order_code,
            account=self.account.name,
            sequence=s.last_sequence,
            status=status or CurrentStatus(s.status, s.status_id, s.status_code, s.tracking_name),
            event_time=event_time,
            seen_at=self.now,
            previous_status=previous_status,
            delay=DelayView(s.delay_code, s.delay_reason, s.delay_note)
            if s.delay_code is not None
            else None,
            reason=reason,
            scan=scan,
            stalled=stalled,
            source=self.source,
        )
        event = OutboxEvent(
            event_id=new_event_id(),
            account_id=s.account_id,
            shipment_id=s.id,
            type=type_.value,
            sequence=s.last_sequence,
            data=data.to_json(),
            created_at=self.now,
        )
        if self.batch is None:
            self.session.add(event)
        else:
            self.batch.events.append(event)
        self.events.append(event)


def apply_outcome(
    session: Session,
    shipment: Shipment,
    account: Account,
    outcome: TrackingResult | CarrierError,
    ctx: PollContext,
) -> Applied:
    """Apply one poll's answer (or failure) to a locked shipment row."""
    shipment.polls_made += 1
    shipment.last_polled_at = ctx.now
    recorder = EventRecorder(session, shipment, account, ctx.now)
    if isinstance(outcome, TrackingResult):
        _apply_result(session, shipment, outcome, recorder, ctx)
        return Applied(recorder.events)
    return _apply_failure(shipment, outcome, recorder, ctx)


def apply_push(
    session: Session,
    shipment: Shipment,
    account: AccountRef,
    result: TrackingResult,
    ctx: PollContext,
    batch: BatchWrites,
    changed_from: str | None = None,
) -> Applied:
    """Apply the carrier's push, a partial answer, to a locked shipment row, as a poll's.

    It is not a lookup: no poll is counted, and the stored answer (and its digest) stays the
    last lookup's, so the next lookup is compared with what a lookup said.

    A push whose order left a status other than the recorded one (`changed_from`, the
    carrier's own words) comes after a change shipmon has not seen: its push was lost or is
    still on its way. Applied now, that change would never be announced, or announced after
    this later one; so the shipment is looked up at once instead, and the carrier's whole answer
    announces both in order.

    Its status row and events wait in `batch`, for the statements that write its batch's.
    """
    if changed_from is not None and _skips_a_change(shipment, result, changed_from):
        shipment.next_poll_at = ctx.now
        return Applied([])
    recorder = EventRecorder(session, shipment, account, ctx.now, source="push", batch=batch)
    _apply_result(session, shipment, result, recorder, ctx)
    return Applied(recorder.events)


def _skips_a_change(shipment: Shipment, result: TrackingResult, changed_from: str) -> bool:
    """Whether the push moves an open shipment on from a status other than its recorded one."""
    latest = _latest_status(result)
    if not shipment.active or latest is None or latest.time is None:
        return False
    if shipment.status_changed_at is not None and latest.time <= shipment.status_changed_at:
        return False  # history from before the recorded status, or the recorded change again
    recorded = (shipment.status_code, shipment.status, shipment.status_id)
    names = {str(name).casefold() for name in recorded if name is not None}
    return changed_from.casefold() not in names if names else changed_from != ""


# -- a tracking result -----------------------------------------------------------------------


def _apply_result(
    session: Session,
    shipment: Shipment,
    result: TrackingResult,
    recorder: EventRecorder,
    ctx: PollContext,
) -> None:
    pushed = recorder.source == "push"
    shipment.consecutive_errors = 0
    shipment.last_error_code = None
    if shipment.found_at is None:
        shipment.found_at = ctx.now
    payload = json.dumps(result.raw, sort_keys=True, ensure_ascii=False, default=str)
    digest = hashlib.sha256(payload.encode()).hexdigest()
    if not pushed and digest == shipment.payload_hash:
        # Most polls find nothing new: the same answer holds no history, scan or field to add.
        _schedule_after_result(shipment, ctx, pushed)
        return

    new_statuses = (
        _record_statuses(session, shipment, result.statuses, recorder.source)
        if recorder.batch is None
        else recorder.batch.record(shipment, result.statuses, recorder.source)
    )
    new_scans = _record_scans(session, shipment, result.trackings)
    if new_statuses or new_scans:
        # A change ends a stall; the shipment may stall again later.
        shipment.stalled_at = None

    # Where the carrier's event times say the shipment is now. An answer whose newest status is
    # older than the one recorded is stale (a lagging replica, a reordered response): its
    # history is kept, but it does not move the shipment back.
    recorded_at = shipment.status_changed_at
    latest = _latest_status(result)
    stale = (
        latest is not None
        and latest.time is not None
        and recorded_at is not None
        and latest.time < recorded_at
    )
    previous = _status_view(shipment)
    previous_delay = (shipment.delay_code, shipment.delay_note)
    if not stale:
        _copy_status(shipment, result, pushed)
        if not pushed:
            _copy_details(shipment, result)
            shipment.last_payload = json.loads(payload)
            shipment.payload_hash = digest

    # One status_changed event per transition, in the carrier's order. History from before
    # the recorded status is kept but announces nothing: it happened before what was told.
    for entry in new_statuses:
        if recorded_at is not None and entry.time is not None and entry.time <= recorded_at:
            continue
        name, status_id, code = _status_triplet(entry.status, entry.status_raw, entry.status_name)
        if name != previous.name:
            current = CurrentStatus(name, status_id, code, entry.tracking_name)
            _emit_transition(recorder, previous, current, entry.time)
            previous = current
    if not stale and shipment.status is not None and shipment.status != previous.name:
        # The top-level status moved without a history row to show it.
        _emit_transition(recorder, previous, None, shipment.status_changed_at)

    delay = (shipment.delay_code, shipment.delay_note)
    if not stale and shipment.delay_code is not None and delay != previous_delay:
        recorder.emit(EventType.DELAYED, shipment.status_changed_at)

    for scan in new_scans:
        recorder.emit(EventType.TRACKING_EVENT, scan.occurred_at, scan=_scan_view(scan))

    if shipment.status is not None and parse_status(shipment.status) is None:
        log.warning(
            "unknown carrier status %r for order %s; recorded as-is",
            shipment.status,
            shipment.order_code,
        )
    _schedule_after_result(shipment, ctx, pushed)


def _emit_transition(
    recorder: EventRecorder,
    previous: StatusView,
    current: CurrentStatus | None,
    at: datetime | None,
) -> None:
    """A status_changed event from `previous` to `current` (None: the shipment's status)."""
    # A previous status is only worth telling as such; it travels without the carrier's words.
    told = StatusView(previous.name, previous.id, previous.code) if previous.name else None
    recorder.emit(EventType.STATUS_CHANGED, at, previous_status=told, status=current)


def _scan_view(scan: TrackingEvent) -> ScanView:
    return ScanView(
        scan.status_id,
        scan.status_name,
        scan.post_office_id,
        scan.post_office_name,
        scan.province_id,
        scan.province_name,
        scan.occurred_at,
        scan.notes,
    )


def _status_triplet(
    status: Status | None, raw: str | None, code: str | None
) -> tuple[str | None, int | None, str | None]:
    """(name, carrier ID, code) for a status; unknown ones keep the carrier's raw words."""
    if status is not None:
        return status.value, status.carrier_id, status.code
    return (raw or code), ascii_integer(raw), code


def _latest_status(result: TrackingResult) -> StatusEntry | None:
    dated = [e for e in result.statuses if e.time is not None]
    return max(dated, key=lambda e: e.time or datetime.min.replace(tzinfo=UTC), default=None)


def _copy_status(shipment: Shipment, result: TrackingResult, pushed: bool) -> None:
    """The fields a push carries too: the status, its delay and the delivery's outcome.

    A push has no tracking name and may leave the delivery fields out: what it lacks keeps
    its stored value (the tracking name only while the status stays), until a lookup says.
    """
    name, status_id, code = _status_triplet(result.status, result.status_raw, result.status_name)
    latest = _latest_status(result)
    moved = name is not None and name != shipment.status
    if moved:
        shipment.status_changed_at = (
            latest.time if latest is not None and latest.time is not None else None
        ) or shipment.last_polled_at
    shipment.status, shipment.status_id, shipment.status_code = name, status_id, code
    if not pushed or moved:
        shipment.tracking_name = result.tracking_name
    shipment.delay_code = result.delay_code
    shipment.delay_reason = delay_reason(result.delay_code)
    shipment.delay_note = result.delay_note
    for name_ in ("delivery_notes", "delivery_date", "receiver_name", "external_code"):
        value = getattr(result, name_)
        if not pushed or value is not None:
            setattr(shipment, name_, value)


def _copy_details(shipment: Shipment, result: TrackingResult) -> None:
    """The fields only a lookup's answer has: measures, fees, routes, the delivery photo."""
    shipment.mailer_type = result.mailer_type
    for name_ in ("length", "width", "height", "real_weight", "cal_weight", "weight"):
        value = getattr(result, name_)
        setattr(shipment, name_, Decimal(str(value)) if value is not None else None)
    shipment.quantity = result.quantity
    for name_ in (
        "price",
        "price_fr",
        "far_region_fee_amount",
        "fuel_fee_amount",
        "vat_amount",
        "total_service_cost",
    ):
        setattr(shipment, name_, getattr(result, name_))
    shipment.price_info = [
        {"service_name": p.service_name, "service_id": p.service_id, "cost": str(p.cost)}
        for p in result.price_info
    ]
    shipment.estimate_routes = jsonable(result.estimate_routes)
    shipment.confirm_images = list(result.confirm_images)
    shipment.accept_date = result.accept_date


# One statement each, run over many rows: SQLAlchemy compiles it once and sends the rows in bulk.
# The history rows go in as plain table rows: nothing of the ORM's bulk insert is needed here.
_STATUS_EVENTS = cast(Table, StatusEvent.__table__)
_STATUS_COLUMNS = [
    "shipment_id",
    "status",
    "status_id",
    "status_code",
    "tracking_name",
    "occurred_at",
    "source",
]
_NEW_STATUS = (
    insert(_STATUS_EVENTS)
    .from_select(
        _STATUS_COLUMNS,
        select(unnested(*(_STATUS_EVENTS.c[name] for name in _STATUS_COLUMNS))),
    )
    .on_conflict_do_nothing(index_elements=["shipment_id", "occurred_at", "status"])
    .returning(_STATUS_EVENTS.c.occurred_at, _STATUS_EVENTS.c.status)
)
_NEW_SCAN = (
    insert(TrackingEvent)
    .on_conflict_do_nothing(index_elements=["shipment_id", "fingerprint"])
    .returning(TrackingEvent)
)


def _record_statuses(
    session: Session, shipment: Shipment, entries: Sequence[StatusEntry], source: Source
) -> list[StatusEntry]:
    """Insert the history rows not seen before; return those entries, oldest first."""
    rows = _history_rows(shipment, entries, source)
    if not rows:
        return []
    written = session.connection().execute(
        _NEW_STATUS, as_arrays((row for _, row in rows), _STATUS_COLUMNS)
    )
    inserted = {(r.occurred_at, r.status) for r in written}
    return _oldest_first(
        [entry for entry, row in rows if (row["occurred_at"], row["status"]) in inserted]
    )


# A batch's events travel as one JSON document of rows, read by PostgreSQL as outbox rows:
# their data is JSON already, and as one array per column each event's data would be escaped
# into a text array, which costs more than the insert itself.
_OUTBOX_EVENTS = cast(Table, OutboxEvent.__table__)
_EVENT_COLUMNS = [
    "event_id",
    "account_id",
    "shipment_id",
    "type",
    "sequence",
    "data",
    "created_at",
]
_EVENT_ROWS = func.jsonb_populate_recordset(
    literal_column(f"NULL::{_OUTBOX_EVENTS.name}"), bindparam("events", type_=JSONB)
).table_valued(*_EVENT_COLUMNS)
_NEW_EVENT = (
    insert(_OUTBOX_EVENTS)
    .from_select(_EVENT_COLUMNS, select(*(_EVENT_ROWS.c[name] for name in _EVENT_COLUMNS)))
    .returning(_OUTBOX_EVENTS.c.id, _OUTBOX_EVENTS.c.event_id)
)

# A history row's natural key: (shipment id, time, status).
StatusKey = tuple[int, datetime, str]

_KEY_COLUMNS = ["shipment_id", "occurred_at", "status"]
_KEYS = [_STATUS_EVENTS.c[name] for name in _KEY_COLUMNS]
_STORED_STATUS = select(*_KEYS).where(tuple_(*_KEYS).in_(select(unnested(*_KEYS))))


class BatchWrites:
    """The history rows and outbox events of locked shipments applied together (a batch of
    carrier pushes), written by `write` in one statement each rather than one per shipment
    (and the events without the ORM's flush, whose statement changes with their number).

    Which rows are new is told by the ones stored already, read up front for the entries the
    batch may record, and by those recorded since: no one else writes the history of a
    shipment locked by this transaction.
    """

    def __init__(
        self, session: Session, expected: Iterable[tuple[Shipment, Sequence[StatusEntry]]]
    ) -> None:
        rows = [
            row
            for shipment, entries in expected
            for _, row in _history_rows(shipment, entries, "push")
        ]
        self._stored: set[StatusKey] = set()
        if rows:
            stored = session.connection().execute(_STORED_STATUS, as_arrays(rows, _KEY_COLUMNS))
            self._stored = {(r.shipment_id, r.occurred_at, r.status) for r in stored}
        self._rows: list[dict[str, Any]] = []
        self.events: list[OutboxEvent] = []

    def record(
        self, shipment: Shipment, entries: Sequence[StatusEntry], source: Source
    ) -> list[StatusEntry]:
        """`_record_statuses`, but the rows wait for `write`."""
        fresh = []
        for entry, row in _history_rows(shipment, entries, source):
            key = _status_key(row)
            if key not in self._stored:
                self._stored.add(key)
                self._rows.append(row)
                fresh.append(entry)
        return _oldest_first(fresh)

    def write(self, session: Session) -> None:
        """Insert the rows recorded (conflicts are skipped, as by `_record_statuses`) and the
        events, which are given their ids."""
        if self._rows:
            session.connection().execute(_NEW_STATUS, as_arrays(self._rows, _STATUS_COLUMNS))
            self._rows = []
        if self.events:
            rows = [
                {name: getattr(e, name) for name in _EVENT_COLUMNS}
                | {"created_at": e.created_at.isoformat()}
                for e in self.events
            ]
            written = session.connection().execute(_NEW_EVENT, {"events": rows})
            ids = {r.event_id: r.id for r in written}
            for event in self.events:
                event.id = ids[event.event_id]
            self.events = []


def _history_rows(
    shipment: Shipment, entries: Sequence[StatusEntry], source: Source
) -> list[tuple[StatusEntry, dict[str, Any]]]:
    """Each entry with a time and a status, with its history row."""
    rows = []
    for entry in entries:
        if entry.time is None:
            continue
        name, status_id, code = _status_triplet(entry.status, entry.status_raw, entry.status_name)
        if name is None:
            continue
        row = {
            "shipment_id": shipment.id,
            "status": name,
            "status_id": status_id,
            "status_code": code,
            "tracking_name": entry.tracking_name,
            "occurred_at": entry.time,
            "source": source,
        }
        rows.append((entry, row))
    return rows


def _status_key(row: dict[str, Any]) -> StatusKey:
    return row["shipment_id"], row["occurred_at"], row["status"]


def _oldest_first(entries: list[StatusEntry]) -> list[StatusEntry]:
    return sorted(entries, key=lambda e: e.time or datetime.min.replace(tzinfo=UTC))


def scan_fingerprint(scan: TrackingEntry) -> str:
    """A scan's natural key: a digest of every field the carrier sends for it."""
    parts = [
        scan.status_id,
        scan.status_name,
        scan.post_office_id,
        scan.post_office_name,
        scan.province_id,
        scan.province_name,
        iso_utc(scan.date_change),
        scan.notes,
    ]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def _record_scans(
    session: Session, shipment: Shipment, scans: Sequence[TrackingEntry]
) -> list[TrackingEvent]:
    if not scans:
        return []
    rows = {}
    for scan in scans:
        fingerprint = scan_fingerprint(scan)
        rows[fingerprint] = {
            "shipment_id": shipment.id,
            "fingerprint": fingerprint,
            "status_id": ascii_integer(scan.status_id),
            "status_name": scan.status_name,
            "post_office_id": scan.post_office_id,
            "post_office_name": scan.post_office_name,
            "province_id": scan.province_id,
            "province_name": scan.province_name,
            "occurred_at": scan.date_change,
            "notes": scan.notes,
        }
    inserted = list(session.scalars(_NEW_SCAN, list(rows.values())))
    times = [s.date_change for s in scans if s.date_change is not None]
    if times:
        shipment.last_scan_at = max(times)
    return sorted(inserted, key=lambda t: t.occurred_at or datetime.min.replace(tzinfo=UTC))


def _schedule_after_result(shipment: Shipment, ctx: PollContext, pushed: bool) -> None:
    """Plan the next lookup; after a push, it fetches what the push lacks.

    A terminal status (polled or pushed) first gets one settle lookup for the delivery photo
    and final fees, and the lookup after it ends polling; a push never ends it, since only a
    lookup brings those. Otherwise the push's status plans the next lookup as a poll's would.
    """
    status = parse_status(shipment.status)
    if status is not None and status.terminal:
        if shipment.terminal_at is None:
            shipment.terminal_at = shipment.status_changed_at or ctx.now
            shipment.next_poll_at = ctx.due_in(SETTLE_DELAY)
        elif not pushed:
            shipment.active = False
            shipment.stopped_reason = status.value
        return
    state = ShipmentState(
        registered_at=shipment.registered_at,
        status=status,
        status_entered_at=shipment.status_changed_at,
        last_polled_at=ctx.now,
        status_by_push=pushed,
    )
    shipment.next_poll_at = ctx.plan(state)


# -- a failure -------------------------------------------------------------------------------


def _apply_failure(
    shipment: Shipment, error: CarrierError, recorder: EventRecorder, ctx: PollContext
) -> Applied:
    code = error.code if isinstance(error, CarrierErrorCode) else None
    shipment.last_error_code = code.value if code is not None else type(error).__name__
    if isinstance(error, KeyRefusal):
        # The key's fault, not the shipment's: due again as soon as the account may poll.
        shipment.next_poll_at = ctx.now
        return Applied(recorder.events, pause=error)
    if isinstance(error, OrderCodeNotFound) and shipment.found_at is None:
        # New orders reach the carrier late; keep asking, less often, for a grace period.
        if ctx.now - shipment.registered_at >= NOT_FOUND_GRACE:
            stop_polling(shipment, recorder, EventType.NOT_FOUND, shipment.last_error_code)
        else:
            state = ShipmentState(registered_at=shipment.registered_at, last_polled_at=ctx.now)
            shipment.next_poll_at = ctx.plan(state)
        return Applied(recorder.events)
    if error.retryable or isinstance(error, OrderCodeNotFound):
        # Says nothing about the shipment (or a known order briefly unknown): back off.
        shipment.consecutive_errors += 1
        shipment.next_poll_at = ctx.due_in(error_backoff(shipment.consecutive_errors))
        return Applied(recorder.events)
    # Not in this account, lookup period over, or a code the carrier can never accept.
    stop_polling(shipment, recorder, EventType.POLLING_STOPPED, shipment.last_error_code)
    return Applied(recorder.events)


def apply_refused(shipment: Shipment, error: Exception, ctx: PollContext) -> Applied:
    """Count a lookup whose answer the database refused to store, and back off.

    The caller has rolled back what applying it wrote; the shipment keeps everything stored
    before, and its neighbours in the batch are applied as usual.
    """
    shipment.polls_made += 1
    shipment.last_polled_at = ctx.now
    shipment.consecutive_errors += 1
    shipment.last_error_code = f"Unstorable{type(error).__name__}"[:ERROR_CODE_LIMIT]
    shipment.next_poll_at = ctx.due_in(error_backoff(shipment.consecutive_errors))
    return Applied([])


def error_backoff(consecutive_errors: int) -> timedelta:
    """Capped exponential backoff with ±20% jitter."""
    base: timedelta = ERROR_BACKOFF_BASE * 2 ** min(consecutive_errors - 1, 16)
    return min(base, ERROR_BACKOFF_CAP) * random.uniform(0.8, 1.2)


def stop_polling(
    shipment: Shipment, recorder: EventRecorder, event: EventType, reason: str | None
) -> None:
    """Stop polling a shipment and announce why: the carrier's refusal, or the merchant's wish."""
    shipment.active = False
    shipment.stopped_reason = reason
    recorder.emit(event, None, reason=reason)


def lock_shipments(session: Session, ids: Sequence[int]) -> list[Shipment]:
    """The shipments, locked for this transaction, in id order (a stable lock order)."""
    return list(
        session.scalars(
            select(Shipment).where(Shipment.id.in_(ids)).order_by(Shipment.id).with_for_update()
        )
    )
