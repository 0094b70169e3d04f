"""The periodic work reads by index: its cost follows what is due or changed, not the table."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from tests.conftest import make_account
from worker.domain.models import Account, Shipment
from worker.domain.vocabulary import Status
from worker.ops.stalled import detect_stalled
from worker.tracking.dispatch import plan_first_lookups

NOW = datetime(2031, 5, 1, 6, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _shipment(session: Session, account: Account, **fields: Any) -> Shipment:
    row = Shipment(account_id=account.id, order_code=f"SCL{secrets.token_hex(5).upper()}", **fields)
    session.add(row)
    session.flush()
    return row


@contextmanager
def plans_of(session: Session, marker: str) -> Iterator[list[str]]:
    """The query plans of the statements run in the block whose SQL contains `marker`.

    Sequential scans are disabled first, so a plan shows whether an index can answer the
    statement at all (on a small test table the planner would rightly prefer a scan).
    """
    connection = session.connection()
    connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if marker in statement and not statement.startswith("EXPLAIN"):
            seen.append((statement, parameters))

    event.listen(connection, "before_cursor_execute", record)
    plans: list[str] = []
    try:
        yield plans
    finally:
        event.remove(connection, "before_cursor_execute", record)
    for statement, parameters in seen:
        rows = connection.exec_driver_sql("EXPLAIN " + statement, parameters).all()
        plans.append("\n".join(row[0] for row in rows))


def test_first_lookups_are_planned_from_the_index_of_unplanned_rows(session: Session) -> None:
    account = make_account(session)
    registered = NOW - HOUR
    new = [_shipment(session, account, registered_at=registered, next_poll_at=registered)]
    backlog = [
        _shipment(session, account, registered_at=registered, next_poll_at=registered + HOUR / 2)
        for _ in range(3)
    ]
    polled = _shipment(
        session, account, registered_at=registered, next_poll_at=registered, last_polled_at=NOW
    )
    first_lookup: Callable[[int, datetime], datetime] = lambda _, at: at + 2 * HOUR  # noqa: E731

    with plans_of(session, "last_polled_at IS NULL") as plans:
        plan_first_lookups(session, NOW, first_lookup)

    assert len(plans) == 1 and "ix_shipments_unplanned" in plans[0]
    for row in (*new, *backlog, polled):
        session.refresh(row)
    assert [s.next_poll_at for s in new] == [registered + 2 * HOUR]
    assert {s.next_poll_at for s in backlog} == {registered + HOUR / 2}
    assert polled.next_poll_at == registered


def test_stalled_candidates_are_read_by_range_per_status(session: Session) -> None:
    account = make_account(session)
    floor = 2 * HOUR
    silent = _shipment(
        session,
        account,
        status=Status.PICKED_UP.value,
        status_changed_at=NOW - 3 * HOUR,
        last_polled_at=NOW - timedelta(minutes=5),
    )
    recent = _shipment(
        session,
        account,
        status=Status.PICKED_UP.value,
        status_changed_at=NOW - HOUR,
        last_polled_at=NOW - timedelta(minutes=5),
    )

    with plans_of(session, "FOR UPDATE OF shipments SKIP LOCKED") as plans:
        ids = detect_stalled(session, NOW, floor)

    assert len(plans) == 1 and "ix_shipments_silent_since" in plans[0]
    # A range on the last change within the status, not a filter over every open shipment.
    assert "GREATEST(status_changed_at, last_scan_at) <" in plans[0].split("Filter")[0]
    assert ids
    session.refresh(silent)
    session.refresh(recent)
    assert silent.stalled_at == NOW and recent.stalled_at is None
