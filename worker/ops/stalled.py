"""Stalled shipments: open ones silent for longer than is normal for their status.

What is normal is learned from recent history, status by status; a stall is announced once,
with a `shipment.stalled` event, and cleared by the next change the carrier reports.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.orm import Session

from worker.domain.events import StallView
from worker.domain.models import Account, OutboxEvent, Shipment
from worker.domain.vocabulary import TERMINAL_STATUSES, EventType
from worker.tracking.record import EventRecorder

# The stay in a status that counts as normal: longer than 95 of 100 recent stays.
NORMAL_STAY_QUANTILE = 0.95
# Stays that began within this window teach what is normal; older ones describe another season.
NORMAL_STAY_WINDOW = timedelta(days=14)
# Below this many recent stays a status's 95th percentile is noise; the floor alone applies.
MIN_STAYS = 20

# The normal stay per status: the quantile of recent completed stays, where there are enough.
_NORMAL_STAYS = """
    WITH stays AS (
        SELECT e.status,
               lead(e.occurred_at) OVER w - e.occurred_at AS stay
        FROM status_events e
        WHERE e.occurred_at >= :since
        WINDOW w AS (PARTITION BY e.shipment_id ORDER BY e.occurred_at)
    )
    SELECT status,
           percentile_cont(:quantile) WITHIN GROUP (ORDER BY extract(epoch FROM stay)) AS seconds
    FROM stays
    WHERE stay IS NOT NULL
    GROUP BY status
    HAVING count(*) >= :min_stays
"""


def normal_stays(
    session: Session, now: datetime, window: timedelta = NORMAL_STAY_WINDOW
) -> dict[str, timedelta]:
    """How long a shipment normally stays in each status, learned from recent history."""
    rows = session.execute(
        text(_NORMAL_STAYS),
        {"since": now - window, "quantile": NORMAL_STAY_QUANTILE, "min_stays": MIN_STAYS},
    )
    return {status: timedelta(seconds=float(seconds)) for status, seconds in rows}


# The statuses of open shipments not yet stalled, one index probe each (a skip scan of
# ix_shipments_silent_since), so the candidates can be read status by status, by range.
_WATCHED_STATUSES = """
    WITH RECURSIVE watched(status) AS (
        (SELECT status FROM shipments
         WHERE active AND stalled_at IS NULL AND status IS NOT NULL
         ORDER BY status LIMIT 1)
        UNION ALL
        SELECT (SELECT s.status FROM shipments s
                WHERE s.active AND s.stalled_at IS NULL AND s.status > watched.status
                ORDER BY s.status LIMIT 1)
        FROM watched WHERE watched.status IS NOT NULL
    )
    SELECT status FROM watched WHERE status IS NOT NULL
"""


def detect_stalled(
    session: Session, now: datetime, floor: timedelta, window: timedelta = NORMAL_STAY_WINDOW
) -> list[int]:
    """Mark open shipments silent for longer than normal for their status as stalled.

    Silent means no new status and no new scan since the later of `status_changed_at` and
    `last_scan_at`; the limit is the status's normal stay (`normal_stays`), never below `floor`.
    Each stall sets `stalled_at` and writes one `shipment.stalled` event; a shipment already
    stalled is left alone until a change clears `stalled_at`. Returns the new events' ids.
    Candidates are found per status by a range scan of `ix_shipments_silent_since`, so the
    cost follows the shipments past their limit, not all open ones.
    """
    normal = normal_stays(session, now, window)
    terminal = {s.value for s in TERMINAL_STATUSES}
    limits = {
        status: max(normal.get(status, floor), floor)
        for status in session.scalars(text(_WATCHED_STATUSES))
        if status not in terminal
    }
    if not limits:
        return []
    last_change = func.greatest(Shipment.status_changed_at, Shipment.last_scan_at)
    past_limit = [
        and_(
            Shipment.status == status,
            last_change < now - limit,
            # Silence only counts once a poll has seen it: a paused key or a quota-starved
            # account has not looked, and the shipment may well have moved.
            Shipment.last_polled_at >= last_change + limit,
        )
        for status, limit in limits.items()
    ]
    candidates = session.execute(
        select(Shipment, Account, last_change)
        .join(Account)
        .where(Shipment.active, Shipment.stalled_at.is_(None), or_(*past_limit))
        .order_by(Shipment.id)
        # SKIP LOCKED: a shipment a poll is applying right now is judged on the next run.
        .with_for_update(of=Shipment, skip_locked=True)
    ).all()
    events: list[OutboxEvent] = []
    for shipment, account, changed in candidates:
        shipment.stalled_at = now
        stay = normal.get(shipment.status or "")
        recorder = EventRecorder(session, shipment, account, now)
        recorder.emit(
            EventType.STALLED,
            None,
            stalled=StallView(
                last_change_at=changed,
                limit_hours=round(limits[shipment.status or ""].total_seconds() / 3600, 2),
                normal_hours=round(stay.total_seconds() / 3600, 2) if stay else None,
            ),
        )
        events.extend(recorder.events)
    session.flush()
    return [e.id for e in events]
