"""The periodic work reads by index: its cost follows what is due or changed, not the table."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from tests.conftest import make_account
from worker.core.metrics import refresh_gauges
from worker.domain.models import Account, Shipment, StatusEvent
from worker.domain.vocabulary import Status
from worker.ops import stalled, views
from worker.ops.stalled import detect_stalled
from worker.ops.views import collect_stats
from worker.tracking.dispatch import claim_due, count_due, plan_first_lookups

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


def test_due_shipments_are_counted_from_the_due_index_alone(session: Session) -> None:
    account = make_account(session)
    other = make_account(session)
    due = [_shipment(session, account, next_poll_at=NOW - k * HOUR) for k in range(1, 4)]
    _shipment(session, account, next_poll_at=NOW + HOUR)
    _shipment(session, account, next_poll_at=NOW - HOUR, active=False)
    _shipment(session, other, next_poll_at=NOW - HOUR)
    # Many keys with their own backlogs, and most shipments not due, as in production, so the
    # planner prefers the due index on the table's statistics.
    session.execute(
        text(
            "INSERT INTO shipments (account_id, order_code, next_poll_at) "
            "SELECT CASE WHEN n % 2 = 0 THEN :account ELSE :other END, 'SCLN' || n, "
            "       CASE WHEN n % 2 = 0 THEN :later ELSE :earlier END "
            "FROM generate_series(1, 2000) AS n"
        ),
        {"account": account.id, "other": other.id, "later": NOW + HOUR, "earlier": NOW - HOUR},
    )
    session.execute(text("ANALYZE shipments"))
    # A bitmap scan always reads the heap; the question is whether the index alone can answer.
    session.execute(text("SET LOCAL enable_bitmapscan = off"))

    with plans_of(session, "count(*)") as plans:
        counted = count_due(session, account.id, NOW, 1000)
        capped = count_due(session, account.id, NOW, 2)

    assert (counted, capped) == (3, 2)
    assert len(plans) == 2
    assert all("Index Only Scan using ix_shipments_due" in plan for plan in plans)
    claim = claim_due(session, account.id, 2, NOW)
    assert claim.shipment_ids == sorted(s.id for s in due[1:])


def test_normal_stays_above_the_sample_size_are_learned_from_a_sample(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = make_account(session)
    # 3,000 shipments, each five hours in transit three days ago, then delivering.
    session.execute(
        text(
            """
            WITH made AS (
                INSERT INTO shipments (account_id, order_code, active)
                SELECT :account, 'SCLS' || n, false FROM generate_series(1, 3000) AS n
                RETURNING id
            )
            INSERT INTO status_events (shipment_id, status, occurred_at)
            SELECT id, status, :entered + shift
            FROM made, (VALUES ('IN_TRANSIT', interval '0 hours'),
                               ('DELIVERING', interval '5 hours')) AS steps(status, shift)
            """
        ),
        {"account": account.id, "entered": NOW - timedelta(days=3)},
    )
    session.execute(text("ANALYZE shipments"))
    monkeypatch.setattr(stalled, "NORMAL_STAY_SAMPLE_SHIPMENTS", 750)

    with plans_of(session, "percentile_cont") as plans:
        normal = stalled.normal_stays(session, NOW)

    assert len(plans) == 1 and "Sample Scan on shipments" in plans[0]
    assert "system ('25'" in plans[0].lower()
    assert normal == {"IN_TRANSIT": 5 * HOUR}


def test_gauges_count_the_due_and_stalled_shipments_by_index(session: Session) -> None:
    account = make_account(session)
    _shipment(session, account, next_poll_at=NOW - HOUR, stalled_at=NOW - HOUR)
    _shipment(session, account, next_poll_at=NOW + HOUR)

    with plans_of(session, "stalled_at IS NOT NULL") as plans:
        refresh_gauges(session, [])

    assert len(plans) == 1
    assert "ix_shipments_due" in plans[0] and "ix_shipments_stalled" in plans[0]
    assert "Seq Scan on shipments" not in plans[0]


def test_stats_count_open_shipments_by_index_and_estimate_finished_ones_on_a_large_table(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = make_account(session)
    # 3,000 shipments, one in three delivered and still watched, the others delivered and done,
    # interleaved so that every page of the table holds the same mix.
    session.execute(
        text(
            "INSERT INTO shipments (account_id, order_code, status, active) "
            "SELECT :account, 'SCLT' || n, 'DELIVERED', n % 3 = 0 "
            "FROM generate_series(1, 3000) AS n"
        ),
        {"account": account.id},
    )
    session.execute(text("ANALYZE shipments"))
    monkeypatch.setattr(views, "CLOSED_SAMPLE_ROWS", 750)
    # Without a vacuumed table the planner may as well read the other indexes of open
    # shipments; with them gone, the plan shows whether this one answers alone.
    session.execute(text("DROP INDEX ix_shipments_active_next_poll_at, ix_shipments_due"))
    session.execute(text("SET LOCAL enable_bitmapscan = off"))

    with plans_of(session, "GROUP BY shipments.account_id, shipments.status") as plans:
        counts = collect_stats(session, NOW, []).shipments

    assert len(plans) == 1 and "Index Only Scan using ix_shipments_open_status" in plans[0]
    [line] = [c for c in counts if c.account == account.name]
    assert (line.status, line.open, line.closed_estimated) == ("DELIVERED", 1000, True)
    assert line.closed == pytest.approx(2000, rel=0.1)


def test_normal_stays_read_every_stay_when_the_table_is_smaller_than_estimated(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = make_account(session)
    for hours in range(1, 31):
        row = _shipment(session, account, active=False)
        session.add_all(
            [
                StatusEvent(
                    shipment_id=row.id, status="IN_TRANSIT", occurred_at=NOW - 3 * HOUR * 24
                ),
                StatusEvent(
                    shipment_id=row.id,
                    status="DELIVERING",
                    occurred_at=NOW - 3 * HOUR * 24 + hours * HOUR,
                ),
            ]
        )
    session.flush()
    session.execute(text("ANALYZE shipments"))
    # As after a purge: PostgreSQL still counts many more shipments than the table holds.
    monkeypatch.setattr(stalled, "NORMAL_STAY_SAMPLE_SHIPMENTS", 1)

    normal = stalled.normal_stays(session, NOW)

    # Every one of the 30 stays, as on a small table: 1 to 30 hours, 95th percentile 28.55.
    assert normal == {"IN_TRANSIT": timedelta(hours=28.55)}
