"""How soon shipmon sees each transition, against round-robin polling on the same quota.

Runs the carrier's lifecycle engine (worker.sim.workload) in-process, in simulated time, twice with
the same seed: once polled by the project's scheduler (worker.scheduling.model), once by uniform
round-robin over the active shipments at a flat rate of quota per day. Both go through the same
limiter: the pace line (worker.quota.pacing.allowed_by over the carrier day) and the per-second
ceiling, applied per tick. Orders arrive from the engine's generator into an empty system; the
first --warmup-days are not measured. A transition's detection delay runs from its carrier time
to the first lookup that shows it. The scheduler sees only the carrier's answers.

With --push-drop P the carrier also pushes: each transition is pushed with probability 1 - P
after a lognormal delay (--push-delay-s P50,P99), and a pushed transition is seen when its push
arrives, unless it follows one not seen yet: then, as in the worker, the shipment is looked up
at once and the lookup shows both. The scheduler then learns each key's push coverage from
what it has seen, by push or by lookup, as the worker learns it from recorded history, and is
run a second time without pushes ("project_poll_only") on the same carrier; round-robin gets
no pushes, the baseline of the ratios.

With --known-model a third poller, "project_known_model", runs on the same carrier: the
project's scheduler, refitted as often with the same `fit_model`, but from the carrier's true
stays (every order's exact transitions, open stays censored at the time of the fit) rather than
from what its lookups have seen. It is the best this scheduler can do with its model's shape;
"learned_over_known" is the learned plan's mean detection delay over that one (without pushes:
"project_poll_only" is the learned plan it is compared with). It makes a run about half again
as long.

    uv run python benchmarks/freshness.py --workload ../shared/workloads/vn-ecommerce.json \
        --keys 1 --key-quota 40000 --orders-per-day 6000 --days 7 [--push-drop 0.1] \
        [--known-model]

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from worker.domain.vocabulary import ErrorCode, Status, parse_status
from worker.quota.pacing import allowed_by, elapsed_share, per_second_ceiling
from worker.scheduling.coverage import NO_PUSHES, PushCoverage, summarise_transitions
from worker.scheduling.model import (
    DEFAULT_MAX_INTERVAL,
    LearnedModel,
    ShipmentState,
    Stay,
    fit_model,
    next_poll_at,
)
from worker.scheduling.pricing import PriceController, planned_rate
from worker.sim.workload import Carrier, Workload, generate_orders, load_workload

TICK_SECONDS = 60
# The worker refits its model from recent history this often, from stays entered this recently.
REFIT_EVERY = timedelta(hours=6)
HISTORY = timedelta(days=3)
# Simulated time after the measured days, so late transitions of the last day get seen.
TAIL = timedelta(days=1)
START = datetime(2026, 3, 2)  # a Monday, local midnight in the workload's time zone
NOT_FOUND = "NOT_FOUND"


class CarrierView:
    """The carrier's answers, as far as polling reads them: the statuses[] rows at a time.

    The engine builds a whole tracking body per lookup (scans, prices, images), which would
    dominate the run time; the statuses[] rows of that body are exactly the order's transitions up
    to the lookup time, so the view answers from those, and checks itself against
    `tracking_body` on every CHECK_EVERY-th lookup. Both pollers share one view, so they see the
    very same orders.
    """

    CHECK_EVERY = 97

    def __init__(self, carrier: Carrier) -> None:
        self.carrier = carrier
        self.times: dict[str, list[float]] = {}
        self.rows: dict[str, list[tuple[datetime, Status]]] = {}
        self.lookups = 0

    def add(self, code: str, apikey: str, at: datetime) -> None:
        self.carrier.add_order(apikey, code, at)
        truth = self.carrier.transitions(code)
        self.rows[code] = truth
        self.times[code] = [moment.timestamp() for moment, _ in truth]

    def statuses(self, code: str, at: datetime) -> list[tuple[datetime, Status]] | None:
        """The statuses[] rows a lookup at `at` shows, or None for ORDERCODE_NOT_FOUND."""
        seen = bisect.bisect_right(self.times[code], at.timestamp())
        rows = self.rows[code][:seen] if seen else None
        self.lookups += 1
        if self.lookups % self.CHECK_EVERY == 0 and rows != self._from_body(code, at):
            raise RuntimeError(f"the view disagrees with the carrier's answer for {code}")
        return rows

    def exited(self, code: str, k: int) -> str:
        """The key of the status the order's k-th transition left."""
        return NOT_FOUND if k == 0 else self.rows[code][k - 1][1].value

    def _from_body(self, code: str, at: datetime) -> list[tuple[datetime, Status]] | None:
        body = self.carrier.tracking_body(code, at)
        if body["errorCode"] == ErrorCode.ORDERCODE_NOT_FOUND:
            return None
        if body["errorCode"] is not None:
            raise RuntimeError(f"unexpected carrier error {body['errorCode']}")
        rows = []
        for row in body["statuses"]:
            status = parse_status(row["status"])
            if status is None:
                raise RuntimeError(f"unknown status {row['status']!r}")
            # The carrier shows 7 fractional digits; microseconds are what a datetime keeps.
            rows.append((datetime.fromisoformat(row["time"]).astimezone(UTC), status))
        return rows


class CarrierPushes:
    """The carrier's pushes: each transition sent with probability 1 - drop, after a lognormal
    delay, from a generator of its own so that the lookups' randomness is untouched."""

    def __init__(self, drop: float, delay_p50: float, delay_p99: float, seed: int) -> None:
        self.drop = drop
        self.log_mu = math.log(delay_p50)
        self.log_sigma = math.log(delay_p99 / delay_p50) / 2.326
        self.rng = random.Random(seed * 7919 + 1)
        # (arrival time, serial, order code, index of the transition)
        self.queue: list[tuple[float, int, str, int]] = []
        self.sent = 0

    def send(self, code: str, times: list[float]) -> None:
        for k, ts in enumerate(times):
            if self.rng.random() < self.drop:
                continue
            delay = math.exp(self.rng.gauss(self.log_mu, self.log_sigma))
            self.sent += 1
            heapq.heappush(self.queue, (ts + delay, self.sent, code, k))

    def arrived(self, until: float) -> Iterator[tuple[float, str, int]]:
        while self.queue and self.queue[0][0] < until:
            at, _, code, k = heapq.heappop(self.queue)
            yield at, code, k


@dataclass
class Shipment:
    """One order as a poller knows it, from the carrier's answers only."""

    code: str
    key: int
    registered_at: datetime
    status: Status | None = None
    entered_at: datetime | None = None
    last_polled_at: datetime | None = None
    # When each statuses[] row was first seen, by its index in the carrier's order, and which
    # of them a push reported first.
    seen_at: dict[int, float] = field(default_factory=dict)
    pushed: set[int] = field(default_factory=set)
    # The index of the current status (-1: not yet known to the carrier), and whether a push
    # reported it with no lookup since.
    top: int = -1
    top_by_push: bool = False
    # Lookups per day the latest plan asks for (the scheduler's demand signal).
    planned: float = 0.0
    # The serial of its latest planned lookup; earlier ones a push made stale are skipped.
    ticket: int = 0

    def state(self) -> ShipmentState:
        return ShipmentState(
            registered_at=self.registered_at,
            status=self.status,
            status_entered_at=self.entered_at,
            last_polled_at=self.last_polled_at,
            status_by_push=self.top_by_push,
        )


@dataclass
class KeyLoad:
    """One API key's lookups: what was spent today and per carrier day."""

    quota: int
    used_today: int = 0
    per_day: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Poller:
    """The shared half of both pollers: the shipments, the limiter, and what lookups reveal."""

    def __init__(self, view: CarrierView, keys: int, quota: int) -> None:
        self.view = view
        self.zone = view.carrier.workload.zone
        self.keys = [KeyLoad(quota) for _ in range(keys)]
        self.shipments: dict[str, Shipment] = {}
        self.active: dict[str, Shipment] = {}
        self.open_shipments = [0] * keys
        # Ended stays, in the order they were seen, for the model.
        self.ended: deque[Stay] = deque()
        # Transitions as first seen: (carrier time, status key left, push delay or None), in
        # the order they were seen, for the push coverage.
        self.seen: list[deque[tuple[float, str, float | None]]] = [deque() for _ in range(keys)]
        self.day = ""
        self.polls_by_status: dict[str, int] = defaultdict(int)

    def add(self, code: str, key: int, at: datetime) -> Shipment:
        shipment = Shipment(code, key, at)
        self.shipments[code] = shipment
        self.active[code] = shipment
        self.open_shipments[key] += 1
        return shipment

    def allowance(self, key: int, tick_end: datetime) -> int:
        """Lookups the limiter grants this key for the tick ending at `tick_end`."""
        load = self.keys[key]
        line = allowed_by(load.quota, elapsed_share(tick_end, self.zone)) - load.used_today
        return max(0, min(line, per_second_ceiling(load.quota) * TICK_SECONDS))

    def new_day(self, day: str) -> None:
        for load in self.keys:
            load.used_today = 0
        self.day = day

    def poll(self, shipment: Shipment, at: datetime) -> None:
        """Look the shipment up at `at` and take in what the answer shows."""
        load = self.keys[shipment.key]
        self.polls_by_status[shipment.status.value if shipment.status else NOT_FOUND] += 1
        load.used_today += 1
        load.per_day[self.day] += 1
        shipment.last_polled_at = at
        shipment.top_by_push = False
        rows = self.view.statuses(shipment.code, at)
        if rows is None:
            return
        for k in range(len(rows)):
            self.reveal(shipment, k, at.timestamp(), None)

    def reveal(self, shipment: Shipment, k: int, seen_ts: float, push_delay: float | None) -> None:
        """Take in the order's k-th transition, seen at `seen_ts` (by push: `push_delay` late).

        A transition seen before is left as it was; one older than the current status fills
        history without moving the shipment back (nor counts as a stay: its neighbours were not
        both known when it ended).
        """
        if k in shipment.seen_at:
            return
        shipment.seen_at[k] = seen_ts
        entered, status = self.view.rows[shipment.code][k]
        self.seen[shipment.key].append(
            (entered.timestamp(), self.view.exited(shipment.code, k), push_delay)
        )
        if push_delay is not None:
            shipment.pushed.add(k)
        if k < shipment.top:
            return
        if k == shipment.top + 1:
            self.ended.append(
                Stay(
                    shipment.status,
                    shipment.entered_at or shipment.registered_at,
                    entered,
                    next_status=status,
                )
            )
        shipment.status, shipment.entered_at, shipment.top = status, entered, k
        shipment.top_by_push = push_delay is not None
        if status.terminal:
            del self.active[shipment.code]
            self.open_shipments[shipment.key] -= 1

    def coverage(self, key: int, now: datetime) -> PushCoverage:
        """The key's push coverage of the transitions seen that happened within HISTORY."""
        cutoff = (now - HISTORY).timestamp()
        seen = self.seen[key]
        while seen and seen[0][0] < cutoff - HISTORY.total_seconds():
            seen.popleft()
        return summarise_transitions((k, d) for ts, k, d in seen if ts >= cutoff)

    def stays(self, now: datetime) -> list[Stay]:
        """Stays entered within HISTORY of `now`, ended or still open, for fitting."""
        cutoff = now - HISTORY
        while self.ended and self.ended[0].entered_at < cutoff - HISTORY:
            self.ended.popleft()
        chosen = [s for s in self.ended if s.entered_at >= cutoff]
        for shipment in self.active.values():
            entered = shipment.entered_at or shipment.registered_at
            if entered >= cutoff and shipment.last_polled_at is not None:
                observed = max(shipment.last_polled_at, entered)
                chosen.append(Stay(shipment.status, entered, None, observed))
        return chosen


class ProjectPoller(Poller):
    """Polls as the worker does: due shipments by next_poll_at, most overdue first."""

    def __init__(
        self,
        view: CarrierView,
        keys: int,
        quota: int,
        max_interval: timedelta,
        pushes: CarrierPushes | None = None,
    ) -> None:
        super().__init__(view, keys, quota)
        self.max_interval = max_interval
        self.pushes = pushes
        self.covered = [NO_PUSHES] * keys
        self.model = LearnedModel(timezone=view.carrier.workload.timezone)
        zone = view.carrier.workload.timezone
        self.controllers = [PriceController(quota, zone) for _ in range(keys)]
        self.planned = [0.0] * keys
        self.registered = [0] * keys
        self.due: list[list[tuple[float, int, str]]] = [[] for _ in range(keys)]
        # Shipments already due, oldest first: entries leave the heap in time order.
        self.ready: list[deque[tuple[float, int, str]]] = [deque() for _ in range(keys)]
        self.serial = 0
        self.refitted_at: datetime | None = None

    def register(self, code: str, key: int, at: datetime) -> None:
        shipment = self.add(code, key, at)
        self.registered[key] += 1
        if self.pushes is not None:
            self.pushes.send(code, self.view.times[code])
        self.replan(shipment)

    def replan(self, shipment: Shipment) -> None:
        controller = self.controllers[shipment.key]
        ceiling = controller.max_interval(self.max_interval)
        pushes = self.covered[shipment.key]
        due = next_poll_at(shipment.state(), self.model, controller.price, ceiling, pushes)
        self.schedule(shipment, due)

    def schedule(self, shipment: Shipment, due: datetime | None) -> None:
        key = shipment.key
        self.planned[key] -= shipment.planned
        shipment.planned = 0.0
        # A new plan, or none, makes any lookup planned before it stale.
        self.serial += 1
        shipment.ticket = self.serial
        if due is None:
            return
        if shipment.last_polled_at is not None:
            shipment.planned = planned_rate(shipment.last_polled_at, due)
            self.planned[key] += shipment.planned
        heapq.heappush(self.due[key], (due.timestamp(), self.serial, shipment.code))

    def tick(self, start: datetime, end: datetime) -> None:
        if self.refitted_at is None or end - self.refitted_at >= REFIT_EVERY:
            self.model = fit_model(self.stays(end), self.model.timezone, self.model)
            if self.pushes is not None:
                self.covered = [self.coverage(key, end) for key in range(len(self.keys))]
            self.refitted_at = end
        end_ts, start_ts = end.timestamp(), start.timestamp()
        if self.pushes is not None:
            for at, code, k in self.pushes.arrived(end_ts):
                shipment = self.shipments[code]
                if k > shipment.top + 1:
                    # As the worker does on a push that follows a change it has not seen
                    # (its push lost or late): a lookup at once, which shows both in order.
                    self.schedule(shipment, datetime.fromtimestamp(at, UTC))
                    continue
                top = shipment.top
                self.reveal(shipment, k, at, at - self.view.times[code][k])
                if shipment.top != top:
                    # As the worker does on a push: the new status gets its own plan.
                    self.replan(shipment)
        for key, heap in enumerate(self.due):
            ready = self.ready[key]
            while heap and heap[0][0] <= end_ts:
                ready.append(heapq.heappop(heap))
            controller = self.controllers[key]
            budget = self.allowance(key, end)
            while budget > 0 and ready:
                due_ts, ticket, code = ready.popleft()
                shipment = self.shipments[code]
                if ticket != shipment.ticket:
                    continue
                budget -= 1
                self.poll(shipment, datetime.fromtimestamp(max(due_ts, start_ts), UTC))
                self.replan(shipment)
            controller.open_shipments = self.open_shipments[key]
            controller.observe(end, self.planned[key], self.registered[key])
            self.registered[key] = 0


class KnownModelPoller(ProjectPoller):
    """The project's scheduler with its model fitted from the carrier's true stays."""

    def __init__(self, view: CarrierView, keys: int, quota: int, max_interval: timedelta) -> None:
        super().__init__(view, keys, quota, max_interval)
        # Orders that may still have a stay entered within HISTORY, in order of registration.
        self.recent: deque[Shipment] = deque()

    def register(self, code: str, key: int, at: datetime) -> None:
        super().register(code, key, at)
        self.recent.append(self.shipments[code])

    def stays(self, now: datetime) -> list[Stay]:
        """Every stay entered within HISTORY of `now`, as the carrier knows it: ended ones with
        their exact exit, open ones censored at `now`."""
        cutoff = now - HISTORY
        chosen: list[Stay] = []
        kept: deque[Shipment] = deque()
        for shipment in self.recent:
            rows = self.view.rows[shipment.code]
            entries = [(shipment.registered_at, None)] + [(at, s) for at, s in rows if at <= now]
            last_at, last_status = entries[-1]
            if last_at >= cutoff or last_status is None or not last_status.terminal:
                kept.append(shipment)
            for (entered, status), following in itertools.zip_longest(entries, entries[1:]):
                if entered < cutoff or (status is not None and status.terminal):
                    continue
                if following is None:
                    chosen.append(Stay(status, entered, None, now))
                else:
                    chosen.append(Stay(status, entered, following[0], next_status=following[1]))
        self.recent = kept
        self.ended.clear()  # what its lookups saw is not what it learns from
        chosen.sort(key=lambda stay: stay.entered_at)
        return chosen


class UniformPoller(Poller):
    """Round-robin over the active shipments at a flat rate of the quota per day."""

    def __init__(self, view: CarrierView, keys: int, quota: int) -> None:
        super().__init__(view, keys, quota)
        self.rings: list[deque[str]] = [deque() for _ in range(keys)]
        self.credit = [0.0] * keys

    def register(self, code: str, key: int, at: datetime) -> None:
        self.add(code, key, at)
        self.rings[key].append(code)

    def tick(self, start: datetime, end: datetime) -> None:
        for key, ring in enumerate(self.rings):
            self.credit[key] += self.keys[key].quota * TICK_SECONDS / 86_400
            polls = min(int(self.credit[key]), self.allowance(key, end), len(ring))
            self.credit[key] -= polls
            for i in range(polls):
                code = ring.popleft()
                at = start + timedelta(seconds=TICK_SECONDS * i / polls)
                self.poll(self.shipments[code], at)
                if code in self.active:
                    ring.append(code)


def simulate(
    view: CarrierView, pollers: list[Poller], keys: int, workload: Workload, args: Any
) -> float:
    """Run the pollers side by side from an empty system to the end of the tail."""
    zone = workload.zone
    start = START.replace(tzinfo=zone).astimezone(UTC)
    total_days = args.warmup_days + args.days + TAIL.days
    end = start + timedelta(days=total_days)
    arrivals: Iterator[tuple[datetime, str, str]] = generate_orders(
        workload, start, orders_per_day=args.orders_per_day, days=total_days, seed=args.seed
    )
    upcoming = next(arrivals, None)
    now = start
    day = ""
    step = timedelta(seconds=TICK_SECONDS)
    serial = 0
    while now < end:
        tick_end = now + step
        today = now.astimezone(zone).date().isoformat()
        if today != day:
            day = today
            for poller in pollers:
                poller.new_day(day)
        while upcoming is not None and upcoming[0] < tick_end:
            at, _, code = upcoming
            key = serial % keys
            serial += 1
            view.add(code, f"key-{key}", at)
            for poller in pollers:
                poller.register(code, key, at)
            upcoming = next(arrivals, None)
        for poller in pollers:
            poller.tick(now, tick_end)
        now = tick_end
    return end.timestamp()


def measure(poller: Poller, window: tuple[float, float], end: float) -> dict[str, Any]:
    """Detection delays of the transitions inside the measured window."""
    delays: list[float] = []
    by_exited: dict[str, list[float]] = defaultdict(list)
    unseen = pushed = 0
    for shipment in poller.shipments.values():
        truth = poller.view.rows[shipment.code]
        for k, (at, _) in enumerate(truth):
            ts = at.timestamp()
            if not window[0] <= ts < window[1]:
                continue
            seen = shipment.seen_at.get(k)
            if seen is not None:
                delay = seen - ts
                pushed += k in shipment.pushed
            else:
                unseen += 1
                delay = end - ts
            delays.append(delay)
            by_exited[NOT_FOUND if k == 0 else truth[k - 1][1].value].append(delay)
    delays.sort()
    per_day = [n for load in poller.keys for n in load.per_day.values()]
    return {
        "transitions": len(delays),
        "mean_detection_delay_s": round(statistics.fmean(delays), 1) if delays else None,
        "p50_detection_delay_s": round(_quantile(delays, 0.50), 1),
        "p95_detection_delay_s": round(_quantile(delays, 0.95), 1),
        "polls": sum(per_day),
        "max_polls_per_key_day": max(per_day, default=0),
        "over_quota_key_days": sum(n > poller.keys[0].quota for n in per_day),
        "unseen_at_end": unseen,
        "seen_first_by_push": pushed,
        "polls_by_status": dict(sorted(poller.polls_by_status.items())),
        "mean_delay_by_exited_status_s": {
            status: round(statistics.fmean(values), 1)
            for status, values in sorted(by_exited.items())
        },
    }


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, math.floor(q * len(values)))]


def run(workload: Workload, args: Any) -> dict[str, Any]:
    """Both pollers on one carrier; their figures by name."""
    carrier = Carrier(workload, seed=args.seed, key_daily_quota=args.key_quota)
    for key in range(args.keys):
        carrier.add_account(f"account-{key}", f"key-{key}", args.key_quota)
    view = CarrierView(carrier)
    max_interval = timedelta(hours=args.max_interval_hours)
    pushes = None
    if args.push_drop is not None:
        p50, p99 = args.push_delay_s
        pushes = CarrierPushes(args.push_drop, p50, p99, args.seed)
    pollers: dict[str, Poller] = {
        "project": ProjectPoller(view, args.keys, args.key_quota, max_interval, pushes),
        "uniform": UniformPoller(view, args.keys, args.key_quota),
    }
    if pushes is not None:
        pollers["project_poll_only"] = ProjectPoller(view, args.keys, args.key_quota, max_interval)
    if args.known_model:
        pollers["project_known_model"] = KnownModelPoller(
            view, args.keys, args.key_quota, max_interval
        )
    end = simulate(view, list(pollers.values()), args.keys, workload, args)
    start = START.replace(tzinfo=workload.zone).timestamp()
    window = (start + args.warmup_days * 86_400, start + (args.warmup_days + args.days) * 86_400)
    results = {name: measure(poller, window, end) for name, poller in pollers.items()}
    for name, poller in pollers.items():
        if isinstance(poller, ProjectPoller):
            results[name]["final_prices_s"] = [round(c.price, 1) for c in poller.controllers]
    project = pollers["project"]
    assert isinstance(project, ProjectPoller)
    if pushes is not None:
        results["project"]["pushes_sent"] = pushes.sent
        results["project"]["learned_push_coverage"] = [c.to_json() for c in project.covered]
    print(json.dumps({"learned_model": project.model.to_json()}), file=sys.stderr)
    known = pollers.get("project_known_model")
    if isinstance(known, ProjectPoller):
        print(json.dumps({"known_model": known.model.to_json()}), file=sys.stderr)
    return results


def delay_pair(text: str) -> tuple[float, float]:
    """P50,P99 in seconds, the median first."""
    try:
        p50, p99 = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P50,P99 in seconds, got {text!r}") from None
    if not 0 < p50 <= p99:
        raise argparse.ArgumentTypeError("expected 0 < P50 <= P99")
    return p50, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--keys", type=int, default=1)
    parser.add_argument("--key-quota", type=int, default=200_000)
    parser.add_argument("--orders-per-day", type=int, default=6000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--warmup-days", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--max-interval-hours",
        type=float,
        default=DEFAULT_MAX_INTERVAL.total_seconds() / 3600,
        help="the scheduler's ceiling on the interval between two lookups of a shipment",
    )
    parser.add_argument(
        "--push-drop",
        type=float,
        default=None,
        help="the carrier pushes each transition, dropping this share (1: none arrives)",
    )
    parser.add_argument(
        "--push-delay-s",
        type=delay_pair,
        default=(5.0, 60.0),
        help="the pushes' delay, as P50,P99 in seconds (lognormal)",
    )
    parser.add_argument(
        "--known-model",
        action="store_true",
        help="also run the scheduler with its model fitted from the carrier's true stays",
    )
    args = parser.parse_args()
    if args.push_drop is not None and not 0.0 <= args.push_drop <= 1.0:
        parser.error("--push-drop must be between 0 and 1")
    workload = load_workload(args.workload)
    began = time.perf_counter()
    results = run(workload, args)
    summary: dict[str, Any] = {
        "workload": workload.name,
        "keys": args.keys,
        "key_quota": args.key_quota,
        "orders_per_day": args.orders_per_day,
        "days": args.days,
        "warmup_days": args.warmup_days,
        "seed": args.seed,
        "push_drop": args.push_drop,
        "push_delay_s": list(args.push_delay_s) if args.push_drop is not None else None,
        "transitions": next(iter(results.values()))["transitions"],
        **results,
        "over_quota_key_days": sum(r["over_quota_key_days"] for r in results.values()),
        "seconds": round(time.perf_counter() - began, 1),
    }
    summary["ratio_mean"] = round(
        results["project"]["mean_detection_delay_s"] / results["uniform"]["mean_detection_delay_s"],
        3,
    )
    if "project_poll_only" in results:
        summary["ratio_mean_to_poll_only"] = round(
            results["project"]["mean_detection_delay_s"]
            / results["project_poll_only"]["mean_detection_delay_s"],
            3,
        )
        summary["ratio_mean_poll_only"] = round(
            results["project_poll_only"]["mean_detection_delay_s"]
            / results["uniform"]["mean_detection_delay_s"],
            3,
        )
    if "project_known_model" in results:
        learned = results.get("project_poll_only", results["project"])
        summary["learned_over_known"] = round(
            learned["mean_detection_delay_s"]
            / results["project_known_model"]["mean_detection_delay_s"],
            3,
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
