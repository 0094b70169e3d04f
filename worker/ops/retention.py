"""Retention: finished shipments, with their history and notifications, deleted once old."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from worker.domain.models import Shipment

# Finished shipments deleted per call of `purge_finished`, so each transaction stays short.
PURGE_BATCH = 500


def purge_finished(
    session: Session, now: datetime, retention_days: int, batch: int = PURGE_BATCH
) -> int:
    """Delete up to `batch` finished shipments older than the retention period; returns how many.

    Finished: no longer polled, and its terminal status (or, for one stopped without one, its
    last change or poll) is older than `retention_days`. Its history, events and deliveries go
    with it. Call again, each time in a new transaction, while it returns `batch`.
    """
    cutoff = now - timedelta(days=retention_days)
    finished_at = func.coalesce(
        Shipment.terminal_at,
        func.greatest(
            Shipment.status_changed_at,
            Shipment.last_scan_at,
            Shipment.last_polled_at,
            Shipment.registered_at,
        ),
    )
    doomed = (
        select(Shipment.id)
        .where(~Shipment.active, finished_at < cutoff)
        .order_by(Shipment.id)
        .limit(batch)
        # SKIP LOCKED: a concurrent purge (or an operator's update) takes other rows.
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    deleted = session.execute(
        delete(Shipment).where(Shipment.id.in_(doomed)).returning(Shipment.id)
    ).all()
    return len(deleted)
