"""The poll scheduler: its policy, what it learns from history, and the price that fits a quota.

Every function takes its clock as an argument, so these tests drive simulated time directly.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from worker.domain.vocabulary import Status
from worker.quota.pacing import allowed_by, elapsed_share
from worker.scheduling.coverage import NO_PUSHES, NOT_FOUND, PushCoverage, summarise_transitions
from worker.scheduling.model import (
    DEFAULT_MAX_INTERVAL,
    DwellModel,
    LearnedModel,
    ShipmentState,
    Stay,
    fit_model,
    next_poll_at,
)
from worker.scheduling.policy import GRID_SECONDS
from worker.scheduling.pricing import PriceController, planned_rate

ZONE_NAME = "Asia/Ho_Chi_Minh"
ZONE = ZoneInfo(ZONE_NAME)
HOUR = 3600.0


def local(day: int, hour: float) -> datetime:
    """A UTC time at `hour` local time on March `day`, 2026."""
    return (datetime(2026, 3, day, tzinfo=ZONE) + timedelta(hours=hour)).astimezone(UTC)


def local_hour(moment: datetime) -> float:
    t = moment.astimezone(ZONE)
    return t.hour + t.minute / 60 + t.second / 3600


def deferred(moment: datetime, window: tuple[int, int]) -> datetime:
    """`moment` if it falls in the local window, else the window's next opening."""
    t = moment.astimezone(ZONE)
    if window[0] <= t.hour < window[1]:
        return moment
    opening = t.replace(hour=window[0], minute=0, second=0, microsecond=0)
    if t.hour >= window[1]:
        opening += timedelta(days=1)
    return opening.astimezone(UTC)


def synthetic_stays(
    rng: random.Random,
    status: Status | None,
    median_hours: float,
    sigma: float,
    window: tuple[int, int],
    now: datetime,
    count: int = 4000,
    entry_hours: tuple[int, int] = (0, 24),
) -> list[Stay]:
    """Stays entered over the three days before `now`, censored at `now` if not yet ended."""
    stays = []
    while len(stays) < count:
        entered = now - timedelta(seconds=rng.uniform(0, 3 * 86_400))
        if not entry_hours[0] <= entered.astimezone(ZONE).hour < entry_hours[1]:
            continue
        dwell = median_hours * HOUR * math.exp(sigma * rng.gauss(0, 1))
        exited = deferred(entered + timedelta(seconds=dwell), window)
        if exited <= now:
            stays.append(Stay(status, entered, exited))
        else:
            stays.append(Stay(status, entered, None, now))
    return stays


@pytest.fixture(scope="module")
def delivering_model() -> LearnedModel:
    """Learned from deliveries that take about 4 hours and happen from 08:00 to 20:00."""
    stays = synthetic_stays(random.Random(5), Status.DELIVERING, 4, 0.5, (8, 20), local(20, 0))
    return fit_model(stays, ZONE_NAME)


def polls_of(state: ShipmentState, model: LearnedModel, price: float, count: int) -> list[datetime]:
    """The next `count` lookups of a shipment whose status does not change."""
    polls = []
    for _ in range(count):
        due = next_poll_at(state, model, price)
        assert due is not None
        polls.append(due)
        state = ShipmentState(
            registered_at=state.registered_at,
            status=state.status,
            status_entered_at=state.status_entered_at,
            last_polled_at=due,
        )
    return polls


def test_a_new_shipment_is_looked_up_once_the_carrier_probably_knows_it() -> None:
    """Orders usually reach the carrier within the hour: the first lookup comes soon after, the
    sooner the cheaper lookups are, and never later than the ceiling."""
    registered = local(2, 10)
    stays = synthetic_stays(random.Random(1), None, 0.5, 1.0, (0, 24), local(2, 0))
    model = fit_model(stays, ZONE_NAME)
    state = ShipmentState(registered_at=registered)
    cheap = next_poll_at(state, model, price=300)
    dear = next_poll_at(state, model, price=7200)
    assert cheap is not None and dear is not None
    assert registered < cheap < dear <= registered + timedelta(hours=3)
    never = next_poll_at(state, model, price=1e9, max_interval=timedelta(hours=6))
    assert never is not None
    assert registered < never <= registered + timedelta(hours=6)


def test_on_a_fresh_install_a_new_shipment_is_looked_up_within_the_hour() -> None:
    """Nothing learned yet: the first lookup still comes soon, as carriers usually know an order
    within about half an hour."""
    registered = local(2, 10)
    due = next_poll_at(ShipmentState(registered_at=registered), LearnedModel(ZONE_NAME), 1800)
    assert due is not None
    assert registered < due <= registered + timedelta(hours=1)


def test_a_new_shipment_is_looked_up_at_once_where_the_carrier_knows_orders_at_once() -> None:
    registered = local(2, 10)
    model = LearnedModel(ZONE_NAME, {NOT_FOUND: DwellModel(math.log(1.0), 0.5)})
    due = next_poll_at(ShipmentState(registered_at=registered), model, price=1800)
    assert due is not None
    # The next step of the scheduler's grid.
    assert due - registered <= timedelta(seconds=GRID_SECONDS)


def test_a_terminal_shipment_is_never_polled_again(delivering_model: LearnedModel) -> None:
    state = ShipmentState(
        registered_at=local(2, 8),
        status=Status.DELIVERED,
        status_entered_at=local(3, 9),
        last_polled_at=local(3, 9.5),
    )
    assert next_poll_at(state, delivering_model, price=600) is None


def test_an_unknown_order_is_polled_again_soon_then_less_and_less() -> None:
    registered = local(2, 10)
    stays = synthetic_stays(random.Random(1), None, 0.5, 1.0, (0, 24), local(5, 0))
    model = fit_model(stays, ZONE_NAME)
    state = ShipmentState(registered_at=registered, last_polled_at=registered)
    polls = polls_of(state, model, price=300, count=30)
    assert polls[0] - registered < timedelta(hours=1)
    gaps = [b - a for a, b in zip([registered, *polls], polls, strict=False)]
    # Once the usual registration delay has passed, the chance fades and the gaps widen.
    assert gaps[2:] == sorted(gaps[2:])
    assert polls[-1] - registered > timedelta(days=3)
    assert gaps[-1] > timedelta(hours=12)


@pytest.mark.parametrize("ceiling", [timedelta(hours=2), DEFAULT_MAX_INTERVAL])
def test_no_interval_exceeds_the_ceiling(
    delivering_model: LearnedModel, ceiling: timedelta
) -> None:
    polled = local(3, 9)
    state = ShipmentState(
        registered_at=local(2, 8),
        status=Status.DELIVERING,
        status_entered_at=local(3, 8.5),
        last_polled_at=polled,
    )
    # A price no lookup could ever justify: only the ceiling brings the next one.
    due = next_poll_at(state, delivering_model, price=1e9, max_interval=ceiling)
    assert due is not None
    assert polled < due <= polled + ceiling


def test_the_ceiling_holds_even_for_a_status_never_seen() -> None:
    polled = local(3, 9)
    state = ShipmentState(
        registered_at=local(2, 8),
        status=Status.PENDING_FOR_RETURN,
        status_entered_at=local(3, 8),
        last_polled_at=polled,
    )
    due = next_poll_at(state, LearnedModel(ZONE_NAME), price=1e9)
    assert due is not None
    assert polled < due <= polled + DEFAULT_MAX_INTERVAL


def test_it_learns_the_dwell_and_the_quiet_hours(delivering_model: LearnedModel) -> None:
    dwell = delivering_model.for_status(Status.DELIVERING)
    assert dwell.quiet == (20 * 3600, 8 * 3600)
    assert math.exp(dwell.log_mu) / HOUR == pytest.approx(4, rel=0.1)
    assert dwell.log_sigma == pytest.approx(0.5, rel=0.15)


def test_censored_stays_keep_a_slow_status_slow() -> None:
    now = local(20, 0)
    stays = synthetic_stays(random.Random(2), Status.IN_TRANSIT, 30, 0.6, (0, 24), now)
    assert sum(s.exited_at is None for s in stays) > len(stays) / 3
    dwell = fit_model(stays, ZONE_NAME).for_status(Status.IN_TRANSIT)
    assert math.exp(dwell.log_mu) / HOUR == pytest.approx(30, rel=0.1)
    assert dwell.quiet is None


def test_hours_with_no_shipment_at_risk_are_not_taken_for_quiet_ones() -> None:
    # Orders reach the carrier only in the day, and are known within the hour: nothing exits at
    # night because nothing waits then, not because the carrier sleeps.
    stays = synthetic_stays(
        random.Random(3), None, 0.3, 0.5, (0, 24), local(20, 0), entry_hours=(8, 22)
    )
    assert fit_model(stays, ZONE_NAME).for_status(None).quiet is None


def test_no_lookup_falls_in_quiet_hours(delivering_model: LearnedModel) -> None:
    for entered_hour in (8.5, 11, 14, 16.5, 19, 21, 2):
        entered = local(3, entered_hour)
        state = ShipmentState(
            registered_at=local(2, 8),
            status=Status.DELIVERING,
            status_entered_at=entered,
            last_polled_at=entered + timedelta(minutes=5),
        )
        for price in (300, 1800, 7200):
            for due in polls_of(state, delivering_model, price, count=6):
                hour = local_hour(due)
                assert 8 <= hour <= 20, (entered_hour, price, due)


def test_a_lookup_lands_at_the_close_and_just_after_the_reopening(
    delivering_model: LearnedModel,
) -> None:
    entered = local(3, 15)
    state = ShipmentState(
        registered_at=local(2, 8),
        status=Status.DELIVERING,
        status_entered_at=entered,
        last_polled_at=entered + timedelta(minutes=5),
    )
    polls = polls_of(state, delivering_model, price=1800, count=4)
    assert local(3, 20) in polls
    assert any(local(4, 8) < due <= local(4, 8.1) for due in polls)


def test_a_shipment_out_for_delivery_overnight_waits_for_the_morning(
    delivering_model: LearnedModel,
) -> None:
    entered = local(3, 19.5)
    state = ShipmentState(
        registered_at=local(2, 8),
        status=Status.DELIVERING,
        status_entered_at=entered,
        last_polled_at=entered + timedelta(minutes=5),
    )
    due = next_poll_at(state, delivering_model, price=600)
    assert due is not None
    assert local(4, 8) < due <= local(4, 8.1)


def test_a_shipment_young_in_a_slow_status_is_left_alone() -> None:
    now = local(20, 0)
    stays = synthetic_stays(random.Random(4), Status.IN_TRANSIT, 22, 0.6, (0, 24), now)
    model = fit_model(stays, ZONE_NAME)
    entered = local(21, 10)
    state = ShipmentState(
        registered_at=local(20, 8),
        status=Status.IN_TRANSIT,
        status_entered_at=entered,
        last_polled_at=entered,
    )
    due = next_poll_at(state, model, price=1800)
    assert due is not None
    assert due - entered > timedelta(hours=8)
    # Later in the same status, with transitions now likely, lookups come much closer together.
    late = ShipmentState(
        registered_at=local(20, 8),
        status=Status.IN_TRANSIT,
        status_entered_at=entered,
        last_polled_at=entered + timedelta(hours=22),
    )
    later = next_poll_at(late, model, price=1800)
    assert later is not None
    assert later - (entered + timedelta(hours=22)) < (due - entered) / 2


def test_a_higher_price_means_fewer_lookups(delivering_model: LearnedModel) -> None:
    entered = local(3, 8.5)
    state = ShipmentState(
        registered_at=local(2, 8),
        status=Status.DELIVERING,
        status_entered_at=entered,
        last_polled_at=entered,
    )
    cheap = polls_of(state, delivering_model, price=300, count=10)
    dear = polls_of(state, delivering_model, price=3000, count=10)
    assert cheap[-1] < dear[-1]


def test_it_learns_which_statuses_follow() -> None:
    now = local(20, 0)
    transit = synthetic_stays(random.Random(6), Status.IN_TRANSIT, 22, 0.6, (0, 24), now)
    delivering, lost = Status.DELIVERING, Status.LOST
    stays = [
        Stay(s.status, s.entered_at, s.exited_at, s.observed_until, lost if n % 10 else delivering)
        if s.exited_at is not None
        else s
        for n, s in enumerate(transit)
    ]
    shares = fit_model(stays, ZONE_NAME).for_status(Status.IN_TRANSIT).next_shares
    assert set(shares) == {Status.DELIVERING.value, Status.LOST.value}
    assert shares[Status.DELIVERING.value] == pytest.approx(0.1, abs=0.02)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_a_quick_follower_makes_a_lookup_at_the_close_worth_it() -> None:
    """Out for delivery since 17:00, rounds end at 20:00: alone, the few deliveries done by then
    do not justify a lookup before the morning's reopening; followed by a quick next step, they
    do, as a lookup at the reopening would find both transitions late. The evening lookup comes
    once the quick step has probably followed too."""
    window = (20 * 3600, 8 * 3600)
    rounds = DwellModel(math.log(4 * HOUR), 0.5, window)
    entered = local(3, 17)
    state = ShipmentState(local(2, 8), Status.DELIVERING, entered, entered)
    alone = LearnedModel(ZONE_NAME, {"DELIVERING": rounds})
    followed = LearnedModel(
        ZONE_NAME,
        {
            "DELIVERING": DwellModel(rounds.log_mu, 0.5, window,
                                     next_shares={"PENDING_FOR_PROCEED": 1.0}),
            "PENDING_FOR_PROCEED": DwellModel(math.log(0.5 * HOUR), 0.3),
        },
    )  # fmt: skip
    price = 6 * HOUR
    assert next_poll_at(state, alone, price) == local(4, 8) + timedelta(minutes=1)
    evening = next_poll_at(state, followed, price)
    assert evening is not None
    assert local(3, 20) <= evening <= local(3, 21)


def test_under_a_high_price_one_lookup_waits_to_catch_a_brief_next_status_too() -> None:
    """Picked up after about 4 hours, then in transit about 2 hours later: when lookups are dear,
    no lookup is spent just after the pick-up; the next one waits for the second step too."""
    entered = local(3, 10)
    state = ShipmentState(local(3, 9), Status.ACCEPTED, entered, entered)
    accepted = DwellModel(math.log(4 * HOUR), 0.2)
    alone = LearnedModel(ZONE_NAME, {"ACCEPTED": accepted})
    chained = LearnedModel(
        ZONE_NAME,
        {
            "ACCEPTED": DwellModel(accepted.log_mu, 0.2, next_shares={"PICKED_UP": 1.0}),
            "PICKED_UP": DwellModel(math.log(2 * HOUR), 0.3),
        },
    )
    price = 8 * HOUR
    first_alone = next_poll_at(state, alone, price)
    first_chained = next_poll_at(state, chained, price)
    assert first_alone is not None and first_chained is not None
    assert first_chained >= first_alone + timedelta(hours=1)
    # When lookups are cheap, each transition gets its own lookup soon after it.
    assert next_poll_at(state, chained, 60) == next_poll_at(state, alone, 60)


def test_the_model_survives_json(delivering_model: LearnedModel) -> None:
    again = LearnedModel.from_json(delivering_model.to_json())
    assert again.timezone == ZONE_NAME
    original = delivering_model.for_status(Status.DELIVERING)
    copied = again.for_status(Status.DELIVERING)
    assert copied.quiet == original.quiet
    assert copied.next_shares == original.next_shares
    assert copied.log_mu == pytest.approx(original.log_mu)
    assert copied.log_sigma == pytest.approx(original.log_sigma)


def test_the_price_controller_survives_json() -> None:
    controller = PriceController(daily_quota=1000, timezone=ZONE_NAME)
    controller.observe(local(2, 0), planned_per_day=500, registered=3)
    controller.observe(local(2, 0.1), planned_per_day=5000, registered=3)
    again = PriceController.from_json(controller.to_json())
    assert again == controller


def test_the_price_rises_when_demand_exceeds_the_quota_and_falls_when_it_does_not() -> None:
    rising = PriceController(daily_quota=1000, timezone=ZONE_NAME, price=100)
    falling = PriceController(daily_quota=1000, timezone=ZONE_NAME, price=100)
    for minute in range(0, 6 * 60, 1):
        at = local(2, minute / 60)
        rising.observe(at, planned_per_day=4000, registered=0)
        falling.observe(at, planned_per_day=250, registered=0)
    assert rising.price > 150
    assert falling.price < 80


def test_the_price_keeps_the_morning_rush_under_the_pace_line() -> None:
    """Demand that fits the day but comes all in the morning is priced as if the day were
    short: no hour may spend what the pace line has not yet granted."""
    even = PriceController(daily_quota=2400, timezone=ZONE_NAME, price=100)
    rush = PriceController(daily_quota=2400, timezone=ZONE_NAME, price=100)
    for minute in range(0, 3 * 24 * 60, 5):
        at = local(2, minute / 60)
        hour = at.astimezone(ZONE).hour
        even.observe(at, planned_per_day=1800, registered=0)
        rush.observe(at, planned_per_day=1800 * 4 if 6 <= hour < 12 else 0, registered=0)
    assert even.price < 100
    assert rush.price > 2 * even.price


def test_a_closed_loop_spends_about_the_quota_and_never_more() -> None:
    """Shipments polled through the pace line, most overdue first, at the controller's price:
    no day spends more than the quota, and once the price has settled most of it is used. (The
    shipments never move on; their dwell is long enough that none grows older than the plan
    reaches, where only the ceiling would bring lookups whatever the price.)"""
    rng = random.Random(7)
    model = LearnedModel(ZONE_NAME, {Status.IN_TRANSIT.value: DwellModel(math.log(30 * HOUR), 0.6)})
    quota = 1500
    controller = PriceController(daily_quota=quota, timezone=ZONE_NAME)
    start = local(2, 0)
    due: list[tuple[float, int, ShipmentState]] = []
    for n in range(300):
        entered = start - timedelta(hours=rng.uniform(0, 20))
        state = ShipmentState(entered, Status.IN_TRANSIT, entered, entered)
        heapq.heappush(due, (start.timestamp(), n, state))
    planned: dict[int, float] = {}
    per_day: dict[str, int] = {}
    now, tick = start, timedelta(minutes=5)
    while now < start + timedelta(days=4):
        end = now + tick
        day = now.astimezone(ZONE).date().isoformat()
        allowed = allowed_by(quota, elapsed_share(end, ZONE)) - per_day.get(day, 0)
        while due and due[0][0] <= end.timestamp() and allowed > 0:
            due_ts, n, state = heapq.heappop(due)
            allowed -= 1
            per_day[day] = per_day.get(day, 0) + 1
            at = max(now, datetime.fromtimestamp(due_ts, UTC))
            state = ShipmentState(state.registered_at, state.status, state.status_entered_at, at)
            following = next_poll_at(state, model, controller.price)
            assert following is not None
            planned[n] = planned_rate(at, following)
            heapq.heappush(due, (following.timestamp(), n, state))
        controller.observe(end, sum(planned.values()), registered=0)
        now = end
    spent = [per_day[day] for day in sorted(per_day)]
    assert max(spent) <= quota
    assert min(spent[1:]) > 0.8 * quota


def test_the_ceiling_stretches_when_the_quota_cannot_afford_it() -> None:
    """A quota that cannot look up every open shipment once a day lets the price decide who
    waits longer, instead of looking everything up in turn at the ceiling."""
    controller = PriceController(daily_quota=1000, timezone=ZONE_NAME, open_shipments=400)
    assert controller.max_interval(DEFAULT_MAX_INTERVAL) == DEFAULT_MAX_INTERVAL
    controller.open_shipments = 1500  # twice the 1.5 days the quota affords: 3 days
    assert controller.max_interval(DEFAULT_MAX_INTERVAL) == timedelta(days=3)
    controller.open_shipments = 1600  # 3.2 days, rounded up to the next 6 hours
    assert controller.max_interval(DEFAULT_MAX_INTERVAL) == timedelta(days=3, hours=6)
    assert PriceController.from_json(controller.to_json()).open_shipments == 1600


# ---------------------------------------------------------------------------------------------
# Push coverage


def chain_model() -> LearnedModel:
    """A fixed lifecycle, with quiet hours, a loop and a terminal exit, to compare plans on."""
    return LearnedModel(
        ZONE_NAME,
        {
            NOT_FOUND: DwellModel(math.log(0.5 * HOUR), 1.0, None, 500, {"ACCEPTED": 1.0}),
            "ACCEPTED": DwellModel(
                math.log(3 * HOUR), 0.8, (72_000, 25_200), 500, {"PICKED_UP": 0.9, "CANCEL": 0.1}
            ),
            "PICKED_UP": DwellModel(math.log(8 * HOUR), 0.6, None, 500, {"DELIVERING": 1.0}),
            "DELIVERING": DwellModel(
                math.log(4 * HOUR),
                0.5,
                (72_000, 28_800),
                500,
                {"DELIVERED": 0.95, "PICKED_UP": 0.05},
            ),
        },
    )


def plan_digest(model: LearnedModel, pushes: PushCoverage = NO_PUSHES) -> str:
    digest = hashlib.sha256()
    for price in (600.0, 1800.0, 7200.0):
        plan = model.plan(price, timedelta(hours=24), pushes)
        for key in sorted(plan.waits):
            digest.update(key.encode())
            digest.update(plan.waits[key].tobytes())
    return digest.hexdigest()


def coverage(share: float, transitions: int = 1000, delay: float = 9.0) -> PushCoverage:
    """An account whose pushes report `share` of every status's transitions `delay` s late."""
    pushed = round(share * transitions)
    return summarise_transitions(
        (key, delay if i < pushed else None)
        for key in (NOT_FOUND, "ACCEPTED", "PICKED_UP", "DELIVERING")
        for i in range(transitions)
    )


def test_an_account_without_pushes_gets_exactly_the_poll_only_plan() -> None:
    # The digest of these plans as solved before the scheduler knew of pushes.
    poll_only = "e382325fd95fb230bda2c682c9ebe3a4c2d8d2450c0b0c84392dc6c6c8929403"
    assert plan_digest(chain_model()) == poll_only
    assert plan_digest(chain_model(), coverage(0.0)) == poll_only
    # Too few transitions to know a share: planned as if no push came.
    assert plan_digest(chain_model(), coverage(1.0, transitions=10)) == poll_only


def wait_hours(model: LearnedModel, pushes: PushCoverage, status: Status, price: float) -> float:
    entered = local(3, 9)
    state = ShipmentState(local(3, 8), status, entered, entered + timedelta(minutes=15))
    due = next_poll_at(state, model, price, DEFAULT_MAX_INTERVAL, pushes)
    assert due is not None
    return (due - entered).total_seconds() / HOUR


def test_the_more_pushes_cover_the_later_the_lookups() -> None:
    model = chain_model()
    waits = [wait_hours(model, coverage(c), Status.PICKED_UP, 1800.0) for c in (0.0, 0.5, 0.9)]
    assert waits[0] < waits[1] < waits[2]


def test_lookups_move_to_the_statuses_pushes_miss() -> None:
    model = chain_model()
    # Pushes report every exit from PICKED_UP and none from DELIVERING.
    pushes = summarise_transitions(
        [("PICKED_UP", 5.0)] * 500 + [("DELIVERING", None)] * 500 + [("ACCEPTED", None)] * 500
    )
    assert wait_hours(model, pushes, Status.PICKED_UP, 1800.0) > wait_hours(
        model, NO_PUSHES, Status.PICKED_UP, 1800.0
    )
    # DELIVERING is no better covered, so its lookups stay as frequent or grow more frequent.
    assert wait_hours(model, pushes, Status.DELIVERING, 1800.0) <= wait_hours(
        model, NO_PUSHES, Status.DELIVERING, 1800.0
    )


def test_a_status_a_push_reported_still_gets_a_follow_up_lookup() -> None:
    model = chain_model()
    happened = local(3, 10)
    # Pushed into DELIVERING, never looked up since it was picked up.
    state = ShipmentState(local(3, 1), Status.DELIVERING, happened, local(3, 2))
    due = next_poll_at(state, model, 1800.0, DEFAULT_MAX_INTERVAL, coverage(0.9))
    assert due is not None
    assert happened < due <= happened + DEFAULT_MAX_INTERVAL


def test_a_final_status_a_push_reported_gets_one_lookup_at_its_price() -> None:
    model = chain_model()
    delivered = local(3, 15)
    pushed = ShipmentState(local(3, 1), Status.DELIVERED, delivered, local(3, 12), True)
    assert next_poll_at(pushed, model, 1800.0) == delivered + timedelta(seconds=1800)
    assert next_poll_at(pushed, model, 7200.0) == delivered + timedelta(seconds=7200)
    # Once a lookup has read it, or when a lookup found it, it is never looked up again.
    polled = ShipmentState(local(3, 1), Status.DELIVERED, delivered, local(3, 16))
    assert next_poll_at(polled, model, 1800.0) is None


def test_planned_push_shares_fall_back_to_the_account_where_a_status_has_few() -> None:
    pushes = summarise_transitions(
        [("PICKED_UP", 5.0)] * 900 + [("PICKED_UP", None)] * 100 + [("DELIVERING", 20.0)] * 10
    )
    terms = dict(
        (key, (share, delay))
        for key, share, delay in pushes.terms(["PICKED_UP", "DELIVERING", "*"])
    )
    assert terms["PICKED_UP"] == (0.9, 5.0)
    # DELIVERING saw too few: the account's share (910 of 1010) and mean delay (about 5.2 s).
    assert terms["DELIVERING"] == (0.9, 5.0)
    assert terms["*"] == (0.9, 5.0)


def test_push_coverage_survives_json_with_the_model() -> None:
    model = replace(chain_model(), pushes={7: coverage(0.6)})
    again = LearnedModel.from_json(json.loads(json.dumps(model.to_json())))
    assert again.coverage(7) == coverage(0.6)
    assert again.coverage(8) == NO_PUSHES
    assert plan_digest(again, again.coverage(7)) == plan_digest(model, coverage(0.6))
