"""Stalled shipments: open ones silent for longer than is normal for their status.

What is normal is learned from recent history, status by status; a stall is announced once,
with a `shipment.stalled` event, and cleared by the next change the carrier reports.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.orm import Session

from worker.core.db import estimated_rows
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

# Above this many shipments the normal stays are learned from a sample of about this many.
NORMAL_STAY_SAMPLE_SHIPMENTS = 20_000

# The normal stay per status: the quantile of recent completed stays, where there are enough.
# Each shipment's recent history is read by its index, for all the shipments or for a block
# sample of them.
_NORMAL_STAYS = """
    SELECT stays.status,
           percentile_cont(:quantile) WITHIN GROUP (ORDER BY extract(epoch FROM stays.stay)),
           count(*)
    FROM shipments s TABLESAMPLE SYSTEM (:percent)
    CROSS JOIN LATERAL (
        SELECT e.status, lead(e.occurred_at) OVER (ORDER BY e.occurred_at, e.id) - e.occurred_at
        FROM status_events e
        WHERE e.shipment_id = s.id AND e.occurred_at >= :since
    ) AS stays(status, stay)
    WHERE stays.stay IS NOT NULL
    GROUP BY stays.status
"""
# Fewer sampled stays than this and the table is smaller than PostgreSQL's estimate of it (a
# stale one, after a purge): every stay is read instead.
MIN_SAMPLED_STAYS = 200


def normal_stays(
    session: Session, now: datetime, window: timedelta = NORMAL_STAY_WINDOW
) -> dict[str, timedelta]:
    """How long a shipment normally stays in each status, learned from recent history.

    Up to `NORMAL_STAY_SAMPLE_SHIPMENTS` shipments every stay is read. Beyond, the stays of a
    block sample of about that many shipments are, so a run costs the same at ten million
    shipments as at twenty thousand: with some ten thousand stays per status, a sampled 95th
    percentile lies within about half a percentile point of the whole history's.
    """
    estimate = estimated_rows(session, "shipments")
    percent = min(100.0, 100.0 * NORMAL_STAY_SAMPLE_SHIPMENTS / max(estimate, 1.0))
    params = {"since": now - window, "quantile": NORMAL_STAY_QUANTILE}
    rows = session.execute(text(_NORMAL_STAYS), {**params, "percent": percent}).all()
    if percent < 100.0 and sum(count for _, _, count in rows) < MIN_SAMPLED_STAYS:
        percent = 100.0
        rows = session.execute(text(_NORMAL_STAYS), {**params, "percent": percent}).all()
    # A status needs enough stays in the whole history, the sampled count scaled up.
    return {
        status: timedelta(seconds=float(seconds))
        for status, seconds, count in rows
        if count * 100.0 / percent >= MIN_STAYS
    }


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
