"""What the scheduler learns from recorded history, and the prices that fit the quota."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

import worker.scheduling.learning
from tests.conftest import make_account
from worker.domain.models import SchedulerState, Shipment, StatusEvent
from worker.domain.vocabulary import Status
from worker.scheduling.coverage import (
    LEARNING_WINDOW,
    LONGEST_PUSH_DELAY_SECONDS,
    NO_PUSHES,
    NOT_FOUND,
    PushCounts,
    account_coverage,
    push_coverage,
    summarise_transitions,
)
from worker.scheduling.learning import (
    PlanCache,
    planned_rates,
    recorded_stays,
    relearn,
    stay_statistics,
    update_prices,
)
from worker.scheduling.model import fit_model, fit_statistics, summarise_stays

NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
ZONE = "Asia/Ho_Chi_Minh"


def _shipment_with_history(
    session: Session, account_id: int, code: str, hours: list[float]
) -> Shipment:
    """A shipment that entered ACCEPTED, PICKED_UP, IN_TRANSIT... `hours` apart, polled now."""
    registered = NOW - timedelta(hours=sum(hours) + 1)
    shipment = Shipment(
        account_id=account_id,
        order_code=code,
        registered_at=registered,
        found_at=registered + timedelta(minutes=30),
        last_polled_at=NOW,
        next_poll_at=NOW + timedelta(hours=2),
    )
    session.add(shipment)
    session.flush()
    at = registered + timedelta(minutes=20)
    for status, gap in zip(
        (Status.ACCEPTED, Status.PICKED_UP, Status.IN_TRANSIT), [0.0, *hours], strict=False
    ):
        at += timedelta(hours=gap)
        session.add(StatusEvent(shipment_id=shipment.id, status=status.value, occurred_at=at))
    session.flush()
    return shipment


def test_recorded_history_becomes_stays_with_the_current_one_censored(session: Session) -> None:
    account = make_account(session)
    _shipment_with_history(session, account.id, "LEARN0001", [5.0, 3.0])
    stays = [
        s
        for s in recorded_stays(session, NOW - timedelta(days=4))
        # This shipment's stays only: other tests' shipments are registered at the real time.
        if NOW - timedelta(hours=10) <= s.entered_at <= NOW
    ]
    by_status = {s.status: s for s in stays}
    accepted = by_status[Status.ACCEPTED]
    assert accepted.exited_at is not None
    assert accepted.exited_at - accepted.entered_at == timedelta(hours=5)
    assert accepted.next_status == Status.PICKED_UP
    current = by_status[Status.IN_TRANSIT]
    assert current.exited_at is None
    assert current.observed_until == NOW
    waiting = by_status[None]  # the wait before the carrier knew the order
    assert waiting.exited_at is not None
    assert waiting.next_status == Status.ACCEPTED


def test_relearn_fits_and_stores_the_model_for_every_worker(session: Session) -> None:
    account = make_account(session)
    for i in range(60):
        _shipment_with_history(session, account.id, f"LEARN1{i:03d}", [4.0 + i % 5, 2.0])
    model = relearn(session, ZONE, NOW)
    stored = session.scalar(select(SchedulerState.data).where(SchedulerState.name == "model"))
    assert stored == model.to_json()
    accepted = model.for_status(Status.ACCEPTED)
    assert accepted.stays >= 60
    cache = PlanCache(ZONE)
    cached_model = cache.current(session)
    assert cached_model.to_json() == model.to_json()
    # Every shipment here was picked up next (other tests' committed history may add a few more).
    assert accepted.next_shares[Status.PICKED_UP.value] > 0.9
    assert sum(accepted.next_shares.values()) == pytest.approx(1.0)


def test_prices_rise_when_the_planned_polls_exceed_the_quota(session: Session) -> None:
    account = make_account(session)
    for i in range(50):
        session.add(
            Shipment(
                account_id=account.id,
                order_code=f"PRICE{i:04d}",
                last_polled_at=NOW,
                next_poll_at=NOW + timedelta(minutes=10),
            )
        )
    session.flush()
    # 50 shipments asking for a poll every 10 minutes: 7,200 a day against a quota of 100.
    first = update_prices(session, {account.id: 100}, ZONE, NOW)[account.id]
    later = update_prices(session, {account.id: 100}, ZONE, NOW + timedelta(minutes=30))[account.id]
    assert later > first
    cache = PlanCache(ZONE)
    cache.current(session)
    assert cache.price(account.id) == later
    # 50 open shipments on 100 lookups a day: a 6-hour ceiling cannot be kept, 24 hours can.
    assert cache.max_interval(account.id, timedelta(hours=6)) == timedelta(days=1)
    assert cache.max_interval(account.id, timedelta(days=2)) == timedelta(days=2)


def test_a_large_table_prices_from_a_sample_close_to_the_full_sum(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = make_account(session)
    # 30,000 open shipments, alternately planned every hour and every six hours.
    session.execute(
        text(
            """
            INSERT INTO shipments (account_id, order_code, registered_at, last_polled_at,
                                   next_poll_at)
            SELECT :account, 'PRC' || lpad(i::text, 8, '0'), :now, :now,
                   :now + CASE WHEN i % 2 = 0 THEN interval '1 hour' ELSE interval '6 hours' END
            FROM generate_series(1, 30000) AS i
            """
        ),
        {"account": account.id, "now": NOW},
    )
    session.execute(text("ANALYZE shipments"))
    planned, open_shipments = planned_rates(session)
    assert planned[account.id] == pytest.approx(15_000 * 24 + 15_000 * 4)
    assert open_shipments[account.id] == 30_000

    monkeypatch.setattr(worker.scheduling.learning, "PRICE_SAMPLE_ROWS", 5_000)
    planned, open_shipments = planned_rates(session)
    assert planned[account.id] == pytest.approx(15_000 * 24 + 15_000 * 4, rel=0.05)
    assert open_shipments[account.id] == pytest.approx(30_000, rel=0.05)


def test_the_model_fitted_in_sql_equals_the_one_fitted_from_every_stay(session: Session) -> None:
    account = make_account(session)
    # A recorded history long enough to be sampled: 12,000 shipments over four days, entering
    # ACCEPTED, PICKED_UP after a varying stay, then IN_TRANSIT or DELIVERED or an unknown
    # status, some still waiting to be found by the carrier.
    session.execute(
        text(
            """
            INSERT INTO shipments (account_id, order_code, registered_at, found_at, active,
                                   last_polled_at, next_poll_at)
            SELECT :account, 'REF' || lpad(i::text, 8, '0'),
                   :now - (i % 90) * interval '1 hour' - (i % 53) * interval '1 minute',
                   CASE WHEN i % 11 <> 0 THEN :now - (i % 90) * interval '1 hour'
                        - (i % 53) * interval '1 minute' + interval '25 minutes' END,
                   i % 17 <> 0,
                   :now - (i % 7) * interval '1 minute',
                   :now + interval '1 hour'
            FROM generate_series(1, 12000) AS i
            """
        ),
        {"account": account.id, "now": NOW},
    )
    session.execute(
        text(
            """
            INSERT INTO status_events (shipment_id, status, occurred_at)
            SELECT s.id, step.status, s.found_at + step.after
            FROM shipments s
            CROSS JOIN LATERAL (VALUES
                ('ACCEPTED', interval '0'),
                ('PICKED_UP', (s.id % 97) * interval '9 minutes'),
                (CASE s.id % 5 WHEN 0 THEN 'DELIVERED' WHEN 1 THEN '99' ELSE 'IN_TRANSIT' END,
                 (s.id % 97) * interval '9 minutes' + (s.id % 31) * interval '1 hour')
            ) AS step(status, after)
            WHERE s.account_id = :account AND s.found_at IS NOT NULL
              AND s.found_at + step.after <= :now
            """
        ),
        {"account": account.id, "now": NOW},
    )
    since = NOW - timedelta(days=4)
    previous = fit_model(recorded_stays(session, since - timedelta(days=1)), ZONE)

    statistics = stay_statistics(session, since)

    assert max(s.count for s in statistics.values()) > 8000  # sampled, not read in full
    assert statistics == summarise_stays(recorded_stays(session, since))
    expected = fit_model(recorded_stays(session, since), ZONE, previous)
    assert fit_statistics(statistics, ZONE, previous) == expected
    stored = relearn(session, ZONE, NOW)
    assert stored.dwell.keys() == expected.dwell.keys()
    assert stored.dwell[Status.PICKED_UP.value].next_shares


def _record(
    session: Session, account_id: int, code: str, rows: list[tuple[Status, datetime, float | None]]
) -> None:
    """A shipment with status rows (status, happened, push delay in seconds or None if polled)."""
    shipment = Shipment(
        account_id=account_id,
        order_code=code,
        registered_at=rows[0][1] - timedelta(minutes=30),
        found_at=rows[0][1] + timedelta(minutes=10),
        last_polled_at=NOW,
        next_poll_at=NOW + timedelta(hours=1),
    )
    session.add(shipment)
    session.flush()
    for status, at, delay in rows:
        pushed = delay is not None
        session.add(
            StatusEvent(
                shipment_id=shipment.id,
                status=status.value,
                occurred_at=at,
                seen_at=at + timedelta(seconds=delay if pushed else 1800),
                source="push" if pushed else "poll",
            )
        )
    session.flush()


def test_push_coverage_is_learned_from_which_rows_a_push_reported_first(
    session: Session,
) -> None:
    account = make_account(session)
    other = make_account(session)
    expected: list[tuple[str, float | None]] = []
    for i in range(100):
        start = NOW - timedelta(hours=30 - i % 20)
        # Nine in ten pickups came by push, 2 to 14 s late; the rest of the history by poll.
        delay = None if i % 10 == 0 else 2.0 * (i % 7 + 1)
        rows = [
            (Status.ACCEPTED, start, None),
            (Status.PICKED_UP, start + timedelta(hours=3), delay),
            (Status.IN_TRANSIT, start + timedelta(hours=9), None),
        ]
        _record(session, account.id, f"PUSH{i:04d}", rows)
        expected += [(NOT_FOUND, None), ("ACCEPTED", delay), ("PICKED_UP", None)]
    # Accepted before the window, picked up within it: the status left is still ACCEPTED.
    old = NOW - timedelta(days=9)
    _record(
        session,
        account.id,
        "PUSHOLD1",
        [(Status.ACCEPTED, old, None), (Status.PICKED_UP, NOW - timedelta(hours=1), 4.0)],
    )
    expected.append(("ACCEPTED", 4.0))
    # A clock ahead of the carrier's and a push days late are bounded, not taken as said.
    _record(
        session,
        other.id,
        "PUSHSKEW",
        [
            (Status.ACCEPTED, NOW - timedelta(hours=5), -60.0),
            (Status.PICKED_UP, NOW - timedelta(hours=4), 9 * 86_400.0),
        ],
    )

    learned = push_coverage(session, NOW - LEARNING_WINDOW)

    mine = learned[account.id]
    assert mine.overall.transitions == 301
    assert mine.overall.pushed == 91
    accepted = dict(mine.by_status)["ACCEPTED"]
    assert (accepted.transitions, accepted.pushed) == (101, 91)
    assert dict(mine.by_status)["PICKED_UP"].pushed == 0
    assert mine.to_json() == summarise_transitions(expected).to_json()
    skewed = learned[other.id].overall
    assert skewed.pushed == 2
    assert skewed.median_delay_s == pytest.approx(LONGEST_PUSH_DELAY_SECONDS / 2)
    everyone = learned[None].overall
    assert everyone.transitions >= 303 and everyone.pushed >= 93

    model = relearn(session, ZONE, NOW)
    assert model.coverage(account.id).to_json() == mine.to_json()
    assert model.coverage(other.id + 1000) == NO_PUSHES
    # The plan counts pushes for leaving ACCEPTED, none where polls saw every exit, and the
    # account's share where a status's own exits are too few to tell (IN_TRANSIT).
    terms = {key: share for key, share, _ in model.coverage(account.id).terms(model.dwell)}
    assert terms["ACCEPTED"] == 0.9
    assert terms["IN_TRANSIT"] == 0.3
    assert NOT_FOUND not in terms and "PICKED_UP" not in terms


def test_a_status_a_push_reported_after_the_last_lookup_is_censored_at_its_entry(
    session: Session,
) -> None:
    account = make_account(session)
    entered = NOW - timedelta(hours=2)
    _record(
        session,
        account.id,
        "PUSHCENS",
        [(Status.ACCEPTED, NOW - timedelta(hours=8), None), (Status.PICKED_UP, entered, 3.0)],
    )
    shipment = session.scalars(select(Shipment).where(Shipment.order_code == "PUSHCENS")).one()
    shipment.last_polled_at = NOW - timedelta(hours=5)  # looked up before the pushed pickup
    session.flush()
    sampled = stay_statistics(session, NOW - LEARNING_WINDOW)[Status.PICKED_UP.value].sample
    censored = [s for s in sampled if s.entered_at == entered and s.exited_at is None]
    assert censored and all(s.observed_until == entered for s in censored)


def test_every_account_is_listed_with_its_push_coverage_then_all_accounts(
    session: Session,
) -> None:
    pushed = make_account(session, name="aaa-pushed")
    quiet = make_account(session, name="aaa-quiet")
    at = NOW - timedelta(hours=3)
    _record(
        session,
        pushed.id,
        "PUSHLIST",
        [(Status.ACCEPTED, at, 6.0), (Status.PICKED_UP, at + timedelta(hours=1), 8.0)],
    )
    listed = account_coverage(session, NOW)
    names = [name for name, _ in listed]
    assert names[-1] is None and names.index("aaa-pushed") < names.index("aaa-quiet")
    coverage = dict(listed)
    assert coverage["aaa-pushed"].overall == PushCounts(2, 2, 7.0, 7.0)
    assert coverage["aaa-quiet"] == NO_PUSHES
    assert coverage[None].overall.pushed >= 2
    assert quiet.name in coverage
