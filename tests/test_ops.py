"""The ops views: `shipmon show` and `shipmon stats`, stalled detection, retention, SQL views."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from tests.conftest import ROOT, RunServers, make_account
from worker.cli import app
from worker.cli.common import sparkline
from worker.core.config import Settings, get_settings
from worker.core.db import transaction
from worker.domain.models import (
    Account,
    Delivery,
    DeliveryAttempt,
    EmailRecipient,
    OutboxEvent,
    QuotaUsage,
    Shipment,
    StatusEvent,
    TrackingEvent,
    WebhookEndpoint,
)
from worker.domain.vocabulary import EventType, Status, delay_reason
from worker.ops.retention import purge_finished
from worker.ops.stalled import MIN_STAYS, detect_stalled, normal_stays
from worker.ops.views import ShipmentNotFound, collect_stats, shipment_story
from worker.quota.limiter import KeyStatus
from worker.tracking.record import new_event_id

# Far from the real clock, so history other tests commit never falls in the learning window.
NOW = datetime(2031, 3, 1, 6, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _code() -> str:
    return f"OPS{secrets.token_hex(5).upper()}"


def shipment(session: Session, account: Account, **fields: Any) -> Shipment:
    """A shipment row of `account`, flushed; unnamed fields keep the table's defaults."""
    row = Shipment(account_id=account.id, order_code=fields.pop("order_code", _code()), **fields)
    session.add(row)
    session.flush()
    return row


def in_status(status: Status) -> dict[str, Any]:
    return {"status": status.value, "status_id": status.carrier_id, "status_code": status.code}


def event(
    session: Session, s: Shipment, type_: EventType, created_at: datetime, **data: Any
) -> OutboxEvent:
    """An outbox event shaped like the pipeline's, numbered after the shipment's last one."""
    s.last_sequence += 1
    row = OutboxEvent(
        event_id=new_event_id(),
        account_id=s.account_id,
        shipment_id=s.id,
        type=type_.value,
        sequence=s.last_sequence,
        data={"order_code": s.order_code, "sequence": s.last_sequence, **data},
        created_at=created_at,
    )
    session.add(row)
    session.flush()
    return row


def status_view(status: Status | None) -> dict[str, Any] | None:
    if status is None:
        return None
    return {"name": status.value, "id": status.carrier_id, "code": status.code}


def delay_view(code: int, note: str | None = None) -> dict[str, Any]:
    return {"code": code, "reason": delay_reason(code), "note": note}


# -- shipmon show ------------------------------------------------------------------------------


def test_a_shipments_story_has_its_history_delays_and_every_notification(
    session: Session,
) -> None:
    account = make_account(session)
    s = shipment(
        session,
        account,
        **in_status(Status.DELIVERING),
        status_changed_at=NOW - 2 * HOUR,
        delay_code=2,
        delay_reason=delay_reason(2),
        delay_note="gọi không được",
    )
    for status, at in [(Status.IN_TRANSIT, NOW - 9 * HOUR), (Status.ACCEPTED, NOW - 20 * HOUR),
                       (Status.DELIVERING, NOW - 2 * HOUR)]:  # fmt: skip
        session.add(StatusEvent(shipment_id=s.id, status=status.value, status_id=status.carrier_id,
                                status_code=status.code, occurred_at=at))  # fmt: skip
    for office, at in [("Bưu cục Quận 1", NOW - 3 * HOUR), ("Kho Tân Bình", NOW - 8 * HOUR)]:
        session.add(TrackingEvent(shipment_id=s.id, fingerprint=secrets.token_hex(16),
                                  post_office_name=office, occurred_at=at))  # fmt: skip
    changed = event(session, s, EventType.STATUS_CHANGED, NOW - HOUR,
                    previous_status=status_view(Status.IN_TRANSIT),
                    status=status_view(Status.DELIVERING))  # fmt: skip
    delayed = event(
        session, s, EventType.DELAYED, NOW - HOUR, delay=delay_view(2, "gọi không được")
    )
    endpoint = WebhookEndpoint(account_id=account.id, url="https://shop.example/hooks",
                               secret_encrypted="x")  # fmt: skip
    recipient = EmailRecipient(account_id=account.id, address="ops@shop.example")
    session.add_all([endpoint, recipient])
    session.flush()
    hook = Delivery(event_id=delayed.id, endpoint_id=endpoint.id, shipment_id=s.id,
                    sequence=delayed.sequence, state="succeeded", attempts=2)  # fmt: skip
    mail = Delivery(event_id=delayed.id, recipient_id=recipient.id, shipment_id=s.id,
                    sequence=delayed.sequence, state="pending")  # fmt: skip
    session.add_all([hook, mail])
    session.flush()
    session.add_all([
        DeliveryAttempt(delivery_id=hook.id, attempted_at=NOW - 50 * timedelta(minutes=1),
                        status_code=503, duration_ms=120, error=None),
        DeliveryAttempt(delivery_id=hook.id, attempted_at=NOW - 40 * timedelta(minutes=1),
                        status_code=200, duration_ms=80),
    ])  # fmt: skip
    session.flush()

    story = shipment_story(session, s.order_code)

    assert story.account == account.name
    assert story.current["status"]["name"] == "DELIVERING"
    assert story.current["delay"] == delay_view(2, "gọi không được")
    assert [r.status for r in story.statuses] == ["ACCEPTED", "IN_TRANSIT", "DELIVERING"]
    assert [r.post_office for r in story.scans] == ["Kho Tân Bình", "Bưu cục Quận 1"]
    assert [(d.code, d.reason, d.note) for d in story.delays] == [
        (2, delay_reason(2), "gọi không được")
    ]
    assert [(n.event_id, n.type) for n in story.notifications] == [
        (changed.event_id, "shipment.status_changed"),
        (delayed.event_id, "shipment.delayed"),
    ]
    assert story.notifications[0].deliveries == []
    sent = story.notifications[1].deliveries
    assert [(d.channel, d.destination, d.state) for d in sent] == [
        ("webhook", "https://shop.example/hooks", "succeeded"),
        ("email", "ops@shop.example", "pending"),
    ]
    assert [a.status_code for a in sent[0].attempts] == [503, 200]
    as_json = story.as_dict()
    assert json.loads(json.dumps(as_json)) == as_json
    assert as_json["statuses"][0]["occurred_at"] == (NOW - 20 * HOUR).isoformat()


def test_an_order_code_in_two_accounts_needs_the_account(session: Session) -> None:
    first, second = make_account(session), make_account(session)
    code = _code()
    shipment(session, first, order_code=code)
    shipment(session, second, order_code=code, **in_status(Status.ACCEPTED))

    with pytest.raises(ShipmentNotFound, match="--account"):
        shipment_story(session, code)
    assert shipment_story(session, code, second.name).current["status"]["name"] == "ACCEPTED"
    with pytest.raises(ShipmentNotFound, match="shipmon track"):
        shipment_story(session, _code())


# -- shipmon stats -----------------------------------------------------------------------------


def test_stats_count_transitions_in_each_of_the_last_24_hours(session: Session) -> None:
    before = collect_stats(session, NOW, []).transitions_by_hour
    account = make_account(session)
    moved = shipment(session, account, **in_status(Status.IN_TRANSIT))
    # Hour 23 ends now; hour 0 began 24 hours ago; older changes are not shown.
    for ago in (0.5, 0.6, 3.5, 23.5, 25.0):
        event(session, moved, EventType.STATUS_CHANGED, NOW - ago * HOUR,
              previous_status=status_view(Status.PICKED_UP),
              status=status_view(Status.IN_TRANSIT))  # fmt: skip
    event(session, moved, EventType.DELAYED, NOW - HOUR, delay=delay_view(12))

    after = collect_stats(session, NOW, []).transitions_by_hour

    added = [a - b for a, b in zip(after, before, strict=True)]
    assert len(added) == 24
    assert {hour: n for hour, n in enumerate(added) if n} == {0: 1, 20: 1, 23: 2}


def test_a_sparkline_scales_to_the_busiest_value_and_marks_empty_ones() -> None:
    assert sparkline([0, 1, 4, 8]) == "·▁▄█"
    assert sparkline([5, 5]) == "██"
    assert sparkline([0, 0]) == "··"
    assert sparkline([]) == ""


def test_stats_count_shipments_the_backlog_the_last_day_and_what_fails(session: Session) -> None:
    before = collect_stats(session, NOW, [])
    account = make_account(session)
    overdue = shipment(session, account, **in_status(Status.IN_TRANSIT),
                       next_poll_at=NOW - 5000 * 24 * HOUR)  # fmt: skip
    shipment(session, account, **in_status(Status.IN_TRANSIT), next_poll_at=NOW - HOUR)
    delivering = shipment(session, account, **in_status(Status.DELIVERING),
                          next_poll_at=NOW + HOUR, stalled_at=NOW - HOUR,
                          status_changed_at=NOW - 90 * HOUR)  # fmt: skip
    shipment(session, account, **in_status(Status.DELIVERED), active=False, next_poll_at=NOW)
    shipment(session, account, next_poll_at=NOW + HOUR)  # not found yet
    moves = [(None, Status.ACCEPTED), (Status.IN_TRANSIT, Status.DELIVERING),
             (Status.IN_TRANSIT, Status.DELIVERING)]  # fmt: skip
    for previous, current in moves:
        event(session, delivering, EventType.STATUS_CHANGED, NOW - 3 * HOUR,
              previous_status=status_view(previous), status=status_view(current))  # fmt: skip
    event(session, delivering, EventType.STATUS_CHANGED, NOW - 30 * HOUR,
          previous_status=status_view(Status.ACCEPTED),
          status=status_view(Status.PICKED_UP))  # fmt: skip
    event(session, delivering, EventType.DELAYED, NOW - 2 * HOUR, delay=delay_view(12))
    event(session, delivering, EventType.DELAYED, NOW - 50 * HOUR, delay=delay_view(4))
    failing = WebhookEndpoint(account_id=account.id, url="https://down.example/h",
                              secret_encrypted="x", failing_since=NOW - 6 * HOUR)  # fmt: skip
    healthy = WebhookEndpoint(account_id=account.id, url="https://up.example/h",
                              secret_encrypted="x")  # fmt: skip
    session.add_all([failing, healthy])
    session.flush()
    quota = [KeyStatus(account.name, "abcd", 1000, 17, 250, 9, 120, None, None)]

    stats = collect_stats(session, NOW, quota)

    mine = {(r.status, r.open, r.closed) for r in stats.shipments if r.account == account.name}
    assert mine == {(None, 1, 0), ("IN_TRANSIT", 2, 0), ("DELIVERING", 1, 0), ("DELIVERED", 0, 1)}
    assert stats.due == before.due + 2
    assert stats.oldest_overdue is not None
    assert stats.oldest_overdue.order_code == overdue.order_code
    assert stats.oldest_overdue.overdue_seconds == pytest.approx(5000 * 24 * 3600)
    new = {(t.from_status, t.to_status): t.count for t in stats.transitions}
    old = {(t.from_status, t.to_status): t.count for t in before.transitions}
    assert new[("IN_TRANSIT", "DELIVERING")] - old.get(("IN_TRANSIT", "DELIVERING"), 0) == 2
    assert new[(None, "ACCEPTED")] - old.get((None, "ACCEPTED"), 0) == 1
    assert new.get(("ACCEPTED", "PICKED_UP"), 0) == old.get(("ACCEPTED", "PICKED_UP"), 0)
    delays = {d.code: d for d in stats.delays}
    assert delays[12].reason == delay_reason(12)
    assert 4 not in delays or delays[4].count == {d.code: d for d in before.delays}[4].count
    assert [e.url for e in stats.failing_endpoints if e.account == account.name] == [failing.url]
    assert stats.stalled == before.stalled + 1
    assert delivering.order_code in [s.order_code for s in stats.stalled_oldest]
    data = stats.as_dict()
    assert data["quota"] == [q.as_dict() for q in quota]
    assert json.loads(json.dumps(data)) == data


# -- stalled shipments -------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@pytest.fixture
def in_transit_history(session: Session) -> list[float]:
    """Recent IN_TRANSIT stays of 1 to 25 hours, then DELIVERING; returns the stays in hours."""
    account = make_account(session)
    stays = [float(h) for h in range(1, MIN_STAYS + 6)]
    for hours in stays:
        past = shipment(session, account, active=False)
        entered = NOW - timedelta(days=3)
        session.add_all([
            StatusEvent(shipment_id=past.id, status="IN_TRANSIT", occurred_at=entered),
            StatusEvent(shipment_id=past.id, status="DELIVERING",
                        occurred_at=entered + timedelta(hours=hours)),
        ])  # fmt: skip
    session.flush()
    return stays


def test_normal_stays_are_the_95th_percentile_of_recent_stays(
    session: Session, in_transit_history: list[float]
) -> None:
    normal = normal_stays(session, NOW)
    expected = _percentile(in_transit_history, 0.95)
    assert normal["IN_TRANSIT"].total_seconds() / 3600 == pytest.approx(expected)
    # Too few stays to learn from: the floor alone applies there.
    assert "DELIVERING" not in normal


def test_a_shipment_silent_for_longer_than_normal_stalls_once(
    session: Session, in_transit_history: list[float]
) -> None:
    account = make_account(session)
    floor = 2 * HOUR
    normal = timedelta(hours=_percentile(in_transit_history, 0.95))

    def open_shipment(
        status: Status, silent: timedelta, polled: timedelta, **more: Any
    ) -> Shipment:
        return shipment(session, account, **in_status(status), status_changed_at=NOW - silent,
                        last_polled_at=NOW - polled, **more)  # fmt: skip

    learned = open_shipment(Status.IN_TRANSIT, normal + HOUR, timedelta(minutes=5))
    within_normal = open_shipment(Status.IN_TRANSIT, normal - HOUR, timedelta(minutes=5))
    at_floor = open_shipment(Status.DELIVERING, floor + HOUR, timedelta(minutes=5))
    unseen = open_shipment(Status.DELIVERING, floor + HOUR, floor + 30 * timedelta(minutes=1))
    scanned = open_shipment(Status.IN_TRANSIT, normal + HOUR, timedelta(minutes=5),
                            last_scan_at=NOW - HOUR)  # fmt: skip
    settling = open_shipment(Status.DELIVERED, 100 * HOUR, timedelta(minutes=5))
    stopped = open_shipment(Status.IN_TRANSIT, 100 * HOUR, timedelta(minutes=5), active=False)
    mine = {s.id: s for s in (learned, within_normal, at_floor, unseen, scanned, settling, stopped)}

    ids = detect_stalled(session, NOW, floor)

    events = session.scalars(select(OutboxEvent).where(OutboxEvent.id.in_(ids))).all()
    stalled = sorted(e.shipment_id for e in events if e.shipment_id in mine)
    assert stalled == sorted([learned.id, at_floor.id])
    assert all(e.type == "shipment.stalled" for e in events)
    by_shipment = {e.shipment_id: e for e in events}
    data = by_shipment[learned.id].data
    assert data["order_code"] == learned.order_code
    assert data["account"] == account.name
    assert data["sequence"] == 1 == by_shipment[learned.id].sequence
    assert data["status"]["name"] == "IN_TRANSIT"
    assert data["stalled"]["last_change_at"] == (NOW - normal - HOUR).isoformat()
    assert data["stalled"]["normal_hours"] == round(normal.total_seconds() / 3600, 2)
    assert by_shipment[at_floor.id].data["stalled"]["limit_hours"] == 2.0
    assert learned.stalled_at == NOW == at_floor.stalled_at
    assert within_normal.stalled_at is None and unseen.stalled_at is None

    later = detect_stalled(session, NOW + 10 * HOUR, floor)
    assert not {e.shipment_id for e in _events(session, later)} & {learned.id, at_floor.id}

    # A change clears stalled_at (the pipeline does); a new silence stalls it again.
    at_floor.stalled_at = None
    at_floor.status_changed_at = NOW + HOUR
    at_floor.last_polled_at = NOW + 4 * HOUR
    again = detect_stalled(session, NOW + 4 * HOUR, floor)
    assert [e.sequence for e in _events(session, again) if e.shipment_id == at_floor.id] == [2]


def _events(session: Session, ids: list[int]) -> list[OutboxEvent]:
    return list(session.scalars(select(OutboxEvent).where(OutboxEvent.id.in_(ids))))


# -- retention ---------------------------------------------------------------------------------


def test_finished_shipments_are_purged_in_batches_with_their_history(session: Session) -> None:
    now = datetime.now(UTC)
    account = make_account(session)
    old = now - timedelta(days=40)
    delivered = shipment(session, account, **in_status(Status.DELIVERED), active=False,
                         terminal_at=old, last_polled_at=old)  # fmt: skip
    gave_up = shipment(session, account, active=False, last_polled_at=old, registered_at=old)
    recent = shipment(session, account, **in_status(Status.DELIVERED), active=False,
                      terminal_at=now - timedelta(days=2))  # fmt: skip
    watched = shipment(session, account, **in_status(Status.IN_TRANSIT),
                       status_changed_at=old, registered_at=old)  # fmt: skip
    session.add(StatusEvent(shipment_id=delivered.id, status="DELIVERED", occurred_at=old))
    session.add(TrackingEvent(shipment_id=delivered.id, fingerprint="f" * 64, occurred_at=old))
    announced = event(session, delivered, EventType.STATUS_CHANGED, old)
    endpoint = WebhookEndpoint(
        account_id=account.id, url="https://x.example/h", secret_encrypted="x"
    )
    session.add(endpoint)
    session.flush()
    sent = Delivery(event_id=announced.id, endpoint_id=endpoint.id, shipment_id=delivered.id,
                    sequence=announced.sequence, state="succeeded")  # fmt: skip
    session.add(sent)
    session.flush()
    session.add(DeliveryAttempt(delivery_id=sent.id, status_code=200, duration_ms=5))
    session.flush()
    doomed = [delivered.id, gave_up.id]

    assert purge_finished(session, now, retention_days=30, batch=1) == 1
    assert purge_finished(session, now, retention_days=30, batch=1) == 1
    assert purge_finished(session, now, retention_days=30, batch=1) == 0

    session.expunge_all()
    left = set(session.scalars(select(Shipment.id).where(Shipment.account_id == account.id)))
    assert left == {recent.id, watched.id}
    for model in (StatusEvent, TrackingEvent, OutboxEvent):
        column = model.shipment_id  # type: ignore[attr-defined]
        assert session.scalar(select(func.count()).where(column.in_(doomed))) == 0
    assert session.scalar(select(func.count()).where(Delivery.id == sent.id)) == 0
    assert session.scalar(select(func.count()).where(DeliveryAttempt.delivery_id == sent.id)) == 0


# -- the SQL views -----------------------------------------------------------------------------


def _rows(session: Session, sql: str, **params: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in session.execute(text(sql), params)]


def test_the_overview_view_has_one_row_per_shipment_with_counts(session: Session) -> None:
    account = make_account(session)
    s = shipment(session, account, **in_status(Status.DELIVERING),
                 status_changed_at=NOW - 5 * HOUR, last_scan_at=NOW - 2 * HOUR)  # fmt: skip
    session.add_all([
        StatusEvent(shipment_id=s.id, status="IN_TRANSIT", occurred_at=NOW - 9 * HOUR),
        StatusEvent(shipment_id=s.id, status="DELIVERING", occurred_at=NOW - 5 * HOUR),
        TrackingEvent(shipment_id=s.id, fingerprint="a" * 64, occurred_at=NOW - 2 * HOUR),
    ])  # fmt: skip
    first = event(session, s, EventType.STATUS_CHANGED, NOW)
    event(session, s, EventType.TRACKING_EVENT, NOW)
    endpoint = WebhookEndpoint(
        account_id=account.id, url="https://x.example/h", secret_encrypted="x"
    )
    session.add(endpoint)
    session.flush()
    session.add(Delivery(event_id=first.id, endpoint_id=endpoint.id, shipment_id=s.id,
                         sequence=1, state="dead"))  # fmt: skip
    session.flush()

    [row] = _rows(session, "SELECT * FROM shipment_overview WHERE order_code = :code "
                  "AND account = :account", code=s.order_code, account=account.name)  # fmt: skip

    assert row["status"] == "DELIVERING" and row["status_id"] == 25
    assert row["last_change_at"] == NOW - 2 * HOUR
    assert (row["statuses"], row["scans"], row["notifications"]) == (2, 1, 2)
    assert (row["deliveries_pending"], row["deliveries_dead"]) == (0, 1)


def test_the_stalled_and_delay_views(session: Session) -> None:
    account = make_account(session)
    stalled = shipment(session, account, **in_status(Status.DELIVERING), stalled_at=NOW,
                       status_changed_at=NOW - 80 * HOUR, delay_code=12,
                       delay_reason=delay_reason(12))  # fmt: skip
    shipment(session, account, **in_status(Status.DELIVERING), delay_code=12,
             delay_reason=delay_reason(12))  # fmt: skip
    shipment(session, account, **in_status(Status.DELIVERED), active=False, delay_code=12)
    shipment(session, account, **in_status(Status.IN_TRANSIT), stalled_at=NOW, active=False)
    database_now = session.scalar(select(func.now()))
    assert database_now is not None
    for age in (HOUR, 30 * HOUR, 30 * 24 * HOUR):
        event(session, stalled, EventType.DELAYED, database_now - age, delay=delay_view(12))
    event(session, stalled, EventType.DELAYED, database_now - HOUR, delay=delay_view(2))
    event(session, stalled, EventType.DELAYED, database_now - HOUR, delay=None)

    rows = _rows(session, "SELECT * FROM stalled_shipments WHERE account = :a", a=account.name)
    assert [(r["order_code"], r["last_change_at"]) for r in rows] == [
        (stalled.order_code, NOW - 80 * HOUR)
    ]

    delays = _rows(session, "SELECT * FROM delay_reasons WHERE account = :a ORDER BY delay_code",
                   a=account.name)  # fmt: skip
    assert [
        (r["delay_code"], r["delay_reason"], r["open_shipments"], r["reported_24h"],
         r["reported_7d"], r["reported_total"])
        for r in delays
    ] == [
        (2, delay_reason(2), 0, 1, 1, 1),
        (12, delay_reason(12), 2, 1, 2, 3),
    ]  # fmt: skip


def test_the_quota_view_shows_the_carrier_days_use_against_each_plan(session: Session) -> None:
    database_now = session.scalar(select(func.now()))
    assert database_now is not None
    today = database_now.astimezone(ZoneInfo("Asia/Ho_Chi_Minh")).date()
    own_plan = make_account(session, daily_quota=1000)
    default_plan = make_account(session)
    learned = make_account(session, daily_quota=5000)
    learned.learned_daily_quota = 400
    learned.paused_until = database_now + HOUR
    learned.pause_reason = "APIKEY_LIMIT"
    session.add_all([
        QuotaUsage(account_id=own_plan.id, day=today, used=250),
        QuotaUsage(account_id=own_plan.id, day=today - timedelta(days=1), used=999),
        QuotaUsage(account_id=learned.id, day=today, used=400),
    ])  # fmt: skip
    session.flush()
    names = [own_plan.name, default_plan.name, learned.name]
    query = "SELECT * FROM quota_today WHERE account = ANY(:names) ORDER BY account"

    rows = {r["account"]: r for r in _rows(session, query, names=names)}

    assert {r["day"] for r in rows.values()} == {today}
    own = rows[own_plan.name]
    assert (own["used"], own["daily_quota"], own["remaining"]) == (250, 1000, 750)
    assert float(own["percent_used"]) == 25.0
    assert (rows[default_plan.name]["used"], rows[default_plan.name]["daily_quota"]) == (0, 200000)
    paused = rows[learned.name]
    assert (paused["daily_quota"], paused["remaining"], paused["paused"]) == (400, 0, True)
    assert paused["pause_reason"] == "APIKEY_LIMIT" and own["pause_reason"] is None

    session.execute(text("SET LOCAL shipmon.key_daily_quota = '150000'"))
    rows = {r["account"]: r for r in _rows(session, query, names=names)}
    assert rows[default_plan.name]["daily_quota"] == 150000
    assert rows[own_plan.name]["daily_quota"] == 1000


def test_the_failed_deliveries_view_shows_dead_and_retrying_ones(session: Session) -> None:
    account = make_account(session)
    s = shipment(session, account, **in_status(Status.DELIVERING))
    endpoint = WebhookEndpoint(
        account_id=account.id, url="https://x.example/h", secret_encrypted="x"
    )
    recipient = EmailRecipient(account_id=account.id, address="ops@x.example")
    session.add_all([endpoint, recipient])
    session.flush()
    states = {"dead": 8, "pending": 2, "succeeded": 1}
    deliveries = {}
    for state, attempts in states.items():
        e = event(session, s, EventType.STATUS_CHANGED, NOW)
        deliveries[state] = Delivery(event_id=e.id, endpoint_id=endpoint.id,
                                     shipment_id=s.id, sequence=e.sequence, state=state,
                                     attempts=attempts)  # fmt: skip
    waiting = event(session, s, EventType.DELAYED, NOW)
    deliveries["untried"] = Delivery(event_id=waiting.id, recipient_id=recipient.id,
                                     shipment_id=s.id, sequence=waiting.sequence)  # fmt: skip
    session.add_all(deliveries.values())
    session.flush()
    for i, (code, error) in enumerate([(500, None), (None, "timed out")]):
        session.add(DeliveryAttempt(delivery_id=deliveries["dead"].id, status_code=code,
                                    error=error, duration_ms=10,
                                    attempted_at=NOW + i * HOUR))  # fmt: skip
    session.flush()

    rows = _rows(session, "SELECT * FROM failed_deliveries WHERE account = :a ORDER BY delivery_id",
                 a=account.name)  # fmt: skip

    assert [(r["state"], r["attempts"], r["channel"]) for r in rows] == [
        ("dead", 8, "webhook"),
        ("pending", 2, "webhook"),
    ]
    dead = rows[0]
    assert (dead["last_status_code"], dead["last_error"]) == (None, "timed out")
    assert dead["destination"] == "https://x.example/h" and dead["next_attempt_at"] is None
    assert dead["order_code"] == s.order_code and dead["event_type"] == "shipment.status_changed"


# -- the commands ------------------------------------------------------------------------------


@pytest.fixture
def shipmon(servers: RunServers) -> Callable[..., Any]:
    runner = CliRunner()

    def run(*args: str) -> Any:
        get_settings.cache_clear()
        try:
            return runner.invoke(app, list(args), env=servers.env())
        finally:
            get_settings.cache_clear()

    return run


@dataclass(frozen=True)
class Committed:
    order_code: str
    account: str


@pytest.fixture
def committed(servers: RunServers) -> Iterator[Committed]:
    """A shipment with history and a notification, committed so the commands see it."""
    with transaction(servers.database_url) as s:
        account = make_account(s, name=f"ops-cli-{secrets.token_hex(4)}", daily_quota=900)
        row = shipment(s, account, **in_status(Status.DELIVERING), status_changed_at=NOW,
                       delay_code=13, delay_reason=delay_reason(13))  # fmt: skip
        s.add(StatusEvent(shipment_id=row.id, status="DELIVERING", occurred_at=NOW))
        s.add(TrackingEvent(shipment_id=row.id, fingerprint="c" * 64, occurred_at=NOW,
                            post_office_name="Bưu cục Cầu Giấy"))  # fmt: skip
        event(s, row, EventType.DELAYED, datetime.now(UTC), delay=delay_view(13))
        account_id = row.account_id
        found = Committed(row.order_code, account.name)
    yield found
    with transaction(servers.database_url) as s:
        s.execute(delete(Account).where(Account.id == account_id))


def test_show_prints_a_shipment_for_people_and_for_machines(
    shipmon: Callable[..., Any], committed: Committed
) -> None:
    as_json = shipmon("show", committed.order_code, "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["order_code"] == committed.order_code
    assert data["current"]["delay"]["code"] == 13
    assert [s["status"] for s in data["statuses"]] == ["DELIVERING"]
    assert [n["type"] for n in data["notifications"]] == ["shipment.delayed"]

    table = shipmon("show", committed.order_code)
    assert table.exit_code == 0, table.output
    assert "Bưu cục Cầu Giấy" in table.output
    assert delay_reason(13)[:30] in table.output.replace("\n", " ")

    missing = shipmon("show", "NOSUCHCODE1")
    assert missing.exit_code == 1
    assert "no shipment 'NOSUCHCODE1'" in missing.output


def test_stats_prints_the_system_for_people_and_for_machines(
    shipmon: Callable[..., Any], committed: Committed
) -> None:
    as_json = shipmon("stats", "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    mine = [r for r in data["shipments"] if r["account"] == committed.account]
    assert [(r["status"], r["open"], r["closed"]) for r in mine] == [("DELIVERING", 1, 0)]
    [line] = [q for q in data["quota"] if q["account"] == committed.account]
    assert (line["used_today"], line["daily_quota"]) == (0, 900)
    assert data["quota"][-1]["account"] is None
    assert {d["code"] for d in data["delays"]} >= {13}
    [pushes] = [c for c in data["push_coverage"] if c["account"] == committed.account]
    assert (pushes["pushed"], pushes["share"], pushes["median_delay_s"]) == (0, 0.0, None)

    table = shipmon("stats")
    assert table.exit_code == 0, table.output
    for title in ("shipments", "quota", "due now", "transitions", "pushes", "failing endpoints"):
        assert title in table.output
    assert len(data["transitions_by_hour"]) == 24
    [hourly] = [line for line in table.output.splitlines() if "transitions per hour" in line]
    assert sparkline(data["transitions_by_hour"]) in hourly


# -- deployment --------------------------------------------------------------------------------

# What the Compose specification allows in a service, of what this file may use.
SERVICE_KEYS = {
    "image", "build", "command", "environment", "volumes", "ports", "depends_on", "healthcheck",
    "restart", "stop_grace_period", "pid", "profiles",
}  # fmt: skip
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# A `$` is either escaped (`$$`) or starts a well-formed `${NAME}` / `${NAME:-default}`.
INTERPOLATION = re.compile(r"\$\$|\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?+][^}]*)?\}|\$")


def _strings(value: Any) -> Iterator[str]:
    """Every string in a loaded YAML document, keys and values: what Compose interpolates."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_the_compose_file_runs_every_process_with_health_checks_and_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]

    assert set(services) == {
        "postgres", "redis", "migrate", "worker", "notify", "beat", "api", "metrics", "flower",
        "mailpit",
        "sandbox",
    }  # fmt: skip
    for name, service in services.items():
        assert set(service) <= SERVICE_KEYS, name
        assert isinstance(service.get("restart", ""), str), name
        if name != "migrate":  # one-shot: it runs and exits
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        for needed, how in service.get("depends_on", {}).items():
            assert needed in services and how["condition"] in CONDITIONS, name
        for mount in service.get("volumes", []):
            assert mount.split(":")[0] in compose["volumes"], name
        assert all(v is None or isinstance(v, str) for v in service.get("environment", {}).values())
    bare = [v for v in _strings(compose) for m in INTERPOLATION.finditer(v) if m.group() == "$"]
    assert bare == []

    every_setting = {f"SHIPMON_{name.upper()}" for name in Settings.model_fields}
    for name in ("migrate", "worker", "notify", "beat", "api"):
        assert every_setting <= set(services[name]["environment"]), name
    assert services["migrate"]["command"] == ["shipmon", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["api"]["command"][:2] == ["shipmon", "api"]
    assert "/readyz" in services["api"]["healthcheck"]["test"][-1]
    for name in ("worker", "notify", "beat", "api"):
        started = services[name]["depends_on"]["migrate"]["condition"]
        assert started == "service_completed_successfully"
    assert "--appendonly" in services["redis"]["command"]
    assert "redisdata:/data" in services["redis"]["volumes"]
    assert services["sandbox"]["profiles"] == ["sandbox"]
    # The exporter reads the files the worker's processes write, in their pid namespace.
    folder = services["worker"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    assert services["metrics"]["environment"]["PROMETHEUS_MULTIPROC_DIR"] == folder
    assert services["metrics"]["pid"] == "service:worker"
    assert f"metrics:{folder}" in services["worker"]["volumes"]


def test_the_image_installs_the_locked_dependencies_and_copies_what_exists() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "uv sync --frozen --no-dev" in dockerfile
    lines = [line.strip() for line in dockerfile.replace("\\\n", " ").splitlines()]
    stages = [line.split()[-1] for line in lines if line.startswith("FROM ") and " AS " in line]
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        if sources[0].startswith("--from="):
            # From an earlier stage, or from an image pinned to a release.
            origin = sources[0].removeprefix("--from=")
            assert origin in stages or re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+", origin), origin
        else:
            assert all((ROOT / source).exists() for source in sources), sources


def test_the_image_is_built_in_stages_with_a_pinned_uv_as_a_user_with_a_healthcheck() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    starts = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(starts) >= 2
    final = lines[starts[-1] :]
    pinned_uv = re.compile(r"COPY --from=ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+ ")
    assert any(pinned_uv.match(line) for line in lines)
    assert not any("pip install" in line and "uv" in line for line in lines)
    # uv's cache stays out of every layer, and uv out of the image that runs.
    for line in lines:
        if "uv sync" in line:
            assert "--mount=type=cache" in line or "--no-cache" in line, line
    assert not any(line.startswith("COPY --from=ghcr.io/astral-sh/uv") for line in final)
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK ") for line in final)


def test_compose_pins_postgres_and_redis_and_checks_they_serve() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert re.fullmatch(r"postgres:16\.\d+", services["postgres"]["image"])
    assert re.fullmatch(r"redis:7\.\d+\.\d+", services["redis"]["image"])
    # Over TCP (the first start's initialising server listens on the socket only), and only a
    # PONG counts (a loading Redis answers LOADING).
    assert "-h 127.0.0.1" in services["postgres"]["healthcheck"]["test"][1]
    assert "PONG" in services["redis"]["healthcheck"]["test"][1]
    for service in services.values():
        image = service.get("image", "")
        assert not image.endswith(":latest") or image.startswith("${SHIPMON_IMAGE"), image
