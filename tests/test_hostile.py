"""A standing hostile-input suite, carrier side: hostile answers in a batch stall no one.

The promise: in a batch where some answers are hostile, every good shipment is applied,
nothing already stored is lost, no lookup is spent twice for one answer, and nothing raises
out of the poll.
"""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import RunServers
from tests.test_pipeline import Pipeline, account, clock, sandbox, sessions  # noqa: F401
from worker.carrier.errors import CarrierError, MalformedResponse
from worker.carrier.parse import TrackingResult, parse_tracking
from worker.domain.models import Account, Shipment, StatusEvent
from worker.scheduling.learning import PlanCache
from worker.sim.sandbox import HOSTILE_KINDS, ManualClock, SandboxHandle, hostile_body
from worker.tracking.poller import Outcome, _apply_all

ORDERS = 24


@pytest.fixture
def pipeline(
    sessions: sessionmaker[Session],  # noqa: F811
    sandbox: SandboxHandle,  # noqa: F811
    clock: ManualClock,  # noqa: F811
    account: Account,  # noqa: F811
    servers: RunServers,
) -> Pipeline:
    return Pipeline(sessions, sandbox, clock, account, servers)


def _delivering(pipeline: Pipeline, prefix: str, count: int) -> list[str]:
    codes = [f"{prefix}{i:05d}" for i in range(count)]
    for code in codes:
        pipeline.sandbox.add_order(pipeline.account.api_key, code, status="DELIVERING")  # type: ignore[attr-defined]
    pipeline.register(*codes)
    return codes


@pytest.mark.parametrize("kind", [k for k in HOSTILE_KINDS if k not in ("huge_body", "gzip_bomb")])
def test_every_hostile_body_is_refused_or_means_the_truth(pipeline: Pipeline, kind: str) -> None:
    (code,) = _delivering(pipeline, "KIND", 1)
    truth = pipeline.sandbox.order(code)["tracking"]
    body = json.dumps(truth).encode()
    for seed in range(8):
        hostile = hostile_body(body, kind, random.Random(seed))
        try:
            result = parse_tracking(hostile, code)
        except MalformedResponse:
            continue
        expected = parse_tracking(body, code)
        assert [(e.status, e.time) for e in result.statuses] == [
            (e.status, e.time) for e in expected.statuses
        ]
        assert result.status == expected.status


def test_a_batch_with_hostile_answers_applies_every_good_one_and_loses_nothing(
    pipeline: Pipeline,
) -> None:
    codes = _delivering(pipeline, "HOST", ORDERS)
    first = pipeline.poll_due()
    assert sum(r.polled for r in first) == ORDERS
    with pipeline.sessions.begin() as s:
        stored = s.scalar(select(func.count()).select_from(StatusEvent))
    pipeline.clock.advance(timedelta(minutes=30))
    for code in codes:
        pipeline.sandbox.advance(code, to="DELIVERED")
    pipeline.sandbox.set_faults({"hostile": 0.5})
    before = pipeline.sandbox.stats()
    pipeline.clock.advance(timedelta(days=2))
    reports = pipeline.poll_due()  # raises nothing
    after = pipeline.sandbox.stats()

    hostile = after["faults"].get("hostile", 0) - before["faults"].get("hostile", 0)
    assert after["carrier_day"] != before["carrier_day"]  # the day's count is this round's
    lookups = after["requests"]["total"]
    assert 0 < hostile < ORDERS
    assert lookups == sum(r.polled for r in reports) == ORDERS  # one lookup, one answer applied
    shipments = [pipeline.shipment(code) for code in codes]
    delivered = [s for s in shipments if s.status == "DELIVERED"]
    assert len(delivered) >= ORDERS - hostile  # every good answer applied
    for shipment in shipments:
        assert shipment.polls_made == 2
        assert shipment.status in {"DELIVERED", "DELIVERING"}  # nothing stored is lost
        if shipment.status == "DELIVERING":
            assert shipment.last_error_code == "MalformedResponse"
            assert shipment.next_poll_at > pipeline.clock.now()
    with pipeline.sessions.begin() as s:
        assert s.scalar(select(func.count()).select_from(StatusEvent)) >= stored


def test_an_answer_the_database_refuses_backs_off_alone(
    pipeline: Pipeline, servers: RunServers
) -> None:
    codes = _delivering(pipeline, "POISON", 5)
    pipeline.poll_due()
    pipeline.clock.advance(timedelta(days=2))
    for code in codes:
        pipeline.sandbox.advance(code, to="DELIVERED")
    outcomes: dict[int, Outcome] = {}
    started = pipeline.clock.now()
    with pipeline.sessions.begin() as s:
        for code in codes:
            shipment = s.scalar(select(Shipment).where(Shipment.order_code == code))
            assert shipment is not None
            shipment.next_poll_at = started
            result = parse_tracking(
                json.dumps(pipeline.sandbox.order(code)["tracking"]).encode(), code
            )
            outcomes[shipment.id] = result
    poisoned_id = min(outcomes)
    good = outcomes[poisoned_id]
    assert isinstance(good, TrackingResult)
    # A value past the status column that no parser check caught: the database refuses it.
    outcomes[poisoned_id] = dataclasses.replace(good, status=None, status_raw="Z" * 41, statuses=())
    report, events = _apply_all(
        pipeline.sessions, pipeline.account.id, started, outcomes, 0,
        plans=PlanCache("Asia/Ho_Chi_Minh"), max_interval=timedelta(hours=24),
        pause_for_limit=lambda s, a, now: None, clock=pipeline.clock.now,
    )  # fmt: skip
    assert report.polled == 5
    assert events
    with pipeline.sessions.begin() as s:
        rows = {r.id: r for r in s.scalars(select(Shipment).where(Shipment.id.in_(outcomes)))}
        poisoned = rows.pop(poisoned_id)
        assert poisoned.status == "DELIVERING"  # what was stored stays
        assert poisoned.last_error_code == "UnstorableDataError"
        assert poisoned.consecutive_errors == 1
        assert poisoned.next_poll_at > started
        assert poisoned.polls_made == 2
        assert {r.status for r in rows.values()} == {"DELIVERED"}


def test_hostile_outcomes_are_carrier_errors_not_crashes(pipeline: Pipeline) -> None:
    codes = _delivering(pipeline, "BIG", 12)
    pipeline.sandbox.set_faults({"hostile": 1.0})
    reports = pipeline.poll_due()
    assert sum(r.polled for r in reports) == 12
    for code in codes:
        shipment = pipeline.shipment(code)
        assert shipment.polls_made == 1
        assert shipment.last_error_code in {None, "MalformedResponse"}
    assert issubclass(MalformedResponse, CarrierError)
