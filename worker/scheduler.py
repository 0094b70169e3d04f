"""The poll scheduler: when each shipment is next worth a lookup, within the key's quota.

A lookup is worth making when it probably reveals a transition soon after it happened. From the
stays shipmon has observed, `fit_model` learns per status how long shipments stay (a lognormal
dwell, censored stays included), the local hours when the status never moves on (its quiet
hours: a transition due then waits for the window to reopen, so its chance piles up at the
reopening), and which status usually follows. `next_poll_at` places a shipment's next lookup by
the optimality condition of a poll schedule with a price per lookup: nothing is spent on
shipments young in a slow status or in quiet hours; a lookup lands at a window's close when
what it would catch is worth it, else just after the reopening; a late lookup that would find
two transitions late counts both. One price per key, adapted by `PriceController` from the
demand of the last day, makes the lookups the policy asks for fit under the pace line
(worker.pacing), so the limiter rarely has to hold shipments back.

Everything here is pure and typed: the worker and the benchmarks call the very same functions
with their own clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from worker.domain import Status

DAY_SECONDS = 86_400
_ROOT_TWO_PI = math.sqrt(2.0 * math.pi)
_ROOT_HALF = math.sqrt(0.5)
# Stays before the carrier knows an order are modelled like a status under this name.
NOT_FOUND = "NOT_FOUND"

# The longest a shipment may wait for its next lookup (no shipment starves), and the shortest.
DEFAULT_MAX_INTERVAL = timedelta(hours=24)
MIN_INTERVAL = timedelta(minutes=2)
# A new shipment's first lookup comes no later than this after its registration.
FIRST_LOOKUP_WITHIN = timedelta(hours=1)
# While the carrier does not know an order, wait at least this share of the order's age: the
# longer it has been unknown, the likelier it is never to be known at all.
NOT_FOUND_BACKOFF_SHARE = 0.25
# A lookup meant for a window's reopening is placed this long after it, so that it sees the
# transitions stamped at the reopening itself.
REOPENING_LAG_SECONDS = 60.0
# Steps of the search for the next lookup, in seconds (refined by bisection).
MIN_STEP_SECONDS = 600.0
MAX_STEP_SECONDS = 3600.0
BISECTIONS = 5

# Cold start: a vague dwell (median 6 h, spread of a factor e) worth a few observations, so the
# first days poll sensibly and data soon dominates.
PRIOR_MEDIAN_SECONDS = 6 * 3600.0
PRIOR_SIGMA = 1.0
PRIOR_WEIGHT = 5.0
# Local-hour bins for learning quiet hours, and how sure a bin must be before it is called quiet.
# Bins are as fine as the data allows: about this many exits per bin, in 5 to 60 minutes.
EXITS_PER_HOUR_BIN = 10
HOUR_BIN_CHOICES = (300, 600, 900, 1200, 1800, 3600)
MIN_EXITS_FOR_QUIET_HOURS = 100
# Quiet hours: a run of bins with under this share of the exits expected from the shipments at
# risk then, long enough, and with enough exits expected for the absence to mean something.
QUIET_RATE_SHARE = 0.03
QUIET_MIN_EXPECTED_EXITS = 20.0
MIN_QUIET_SECONDS = 1800
# An exit this soon after a reopening may have been due at any moment of the quiet hours before.
REOPENING_EXIT_SECONDS = 300
# Quiet hours are learned from at most this many stays per status.
MAX_STAYS_FOR_QUIET_HOURS = 8000
# Fitting cost is bounded by using at most this many stays per status.
MAX_STAYS_PER_FIT = 1500
MIN_STAYS_FOR_FOLLOWER = 50
EM_ITERATIONS = 40
EM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ShipmentState:
    """What shipmon knows of one shipment; every datetime is timezone-aware UTC."""

    registered_at: datetime
    # None while the carrier does not know the order (ORDERCODE_NOT_FOUND).
    status: Status | None = None
    # The carrier's event time of the current status (from statuses[]).
    status_entered_at: datetime | None = None
    last_polled_at: datetime | None = None


@dataclass(frozen=True)
class Stay:
    """One observed stay of a shipment in one status (status None: not yet known to the carrier).

    A stay that has not ended (`exited_at` None) is censored: the shipment was still in the
    status at `observed_until`, the last lookup that saw it.
    """

    status: Status | None
    entered_at: datetime
    exited_at: datetime | None = None
    observed_until: datetime | None = None
    # The status it left for, when it has ended.
    next_status: Status | None = None


@dataclass(frozen=True)
class DwellModel:
    """How long shipments stay in one status, and the local hours when they never leave it."""

    # Lognormal dwell: the mean and spread of the natural log of the dwell in seconds.
    log_mu: float
    log_sigma: float
    # (close, reopen) in local seconds of the day, or None when the status moves at any hour.
    quiet: tuple[int, int] | None = None
    stays: int = 0
    # The usual next status when it is not terminal (its key), and the share of exits into it:
    # a late lookup may then find two transitions to report, not one.
    follower: str | None = None
    follower_share: float = 0.0

    def survival(self, dwell_seconds: float) -> float:
        """The chance that a shipment's dwell exceeds `dwell_seconds`."""
        if dwell_seconds <= 0.0:
            return 1.0
        z = (math.log(dwell_seconds) - self.log_mu) / (self.log_sigma * math.sqrt(2.0))
        return 0.5 * math.erfc(z)

    def last_active(self, local_seconds: float) -> float:
        """The latest moment not after `local_seconds` when a transition could happen."""
        if self.quiet is None:
            return local_seconds
        close, reopen = self.quiet
        into_quiet = (local_seconds - close) % DAY_SECONDS
        if into_quiet < (reopen - close) % DAY_SECONDS:
            return local_seconds - into_quiet
        return local_seconds


PRIOR = DwellModel(math.log(PRIOR_MEDIAN_SECONDS), PRIOR_SIGMA)


@dataclass(frozen=True)
class LearnedModel:
    """Dwell models per status, learned from observed stays, in the carrier's timezone."""

    timezone: str
    dwell: Mapping[str, DwellModel] = field(default_factory=dict)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def for_status(self, status: Status | None) -> DwellModel:
        """The dwell model of a status (None: not yet found), the prior when nothing is known."""
        return self.dwell.get(_key(status), PRIOR)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form, to share the model between processes."""
        return {
            "timezone": self.timezone,
            "dwell": {
                key: {
                    "median_hours": math.exp(m.log_mu) / 3600.0,
                    "sigma": m.log_sigma,
                    "quiet_hours": None if m.quiet is None else [q / 3600.0 for q in m.quiet],
                    "stays": m.stays,
                    "follower": m.follower,
                    "follower_share": m.follower_share,
                }
                for key, m in self.dwell.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LearnedModel:
        """The model `to_json` described."""
        dwell = {}
        for key, m in data["dwell"].items():
            quiet = m["quiet_hours"]
            dwell[key] = DwellModel(
                log_mu=math.log(float(m["median_hours"]) * 3600.0),
                log_sigma=float(m["sigma"]),
                quiet=None if quiet is None else (round(quiet[0] * 3600), round(quiet[1] * 3600)),
                stays=int(m["stays"]),
                follower=m["follower"],
                follower_share=float(m["follower_share"]),
            )
        return cls(timezone=str(data["timezone"]), dwell=dwell)


def _key(status: Status | None) -> str:
    return NOT_FOUND if status is None else status.value


# ---------------------------------------------------------------------------------------------
# The policy


def next_poll_at(
    state: ShipmentState,
    model: LearnedModel,
    price: float,
    max_interval: timedelta = DEFAULT_MAX_INTERVAL,
    first_lookup_within: timedelta = FIRST_LOOKUP_WITHIN,
) -> datetime | None:
    """When this shipment is next worth a lookup; None once its status is terminal.

    `price` is the key's current price of one lookup, in seconds of expected detection delay it
    must cut (see `PriceController`). No wait exceeds `max_interval`. A shipment never looked up
    is due within `first_lookup_within` of its registration, when the carrier probably knows it
    (at once if it usually does).
    """
    if state.status is not None and state.status.terminal:
        return None
    entered = state.status_entered_at if state.status is not None else None
    entered = entered or state.registered_at
    polled = state.last_polled_at
    if polled is None:
        # As if looked up at registration: the first lookup goes where the not-found model puts
        # the next one, but no later than promised.
        polled = state.registered_at
        max_interval = min(max_interval, first_lookup_within)
    # The carrier's local hours, at one offset for the whole horizon: the carrier's timezone has
    # no daylight saving, and elsewhere an hour's shift once a season costs little.
    offset = _utc_offset_seconds(polled, model.zone)
    dwell = model.for_status(state.status)
    wait = _wait_seconds(
        dwell,
        model.dwell.get(dwell.follower) if dwell.follower is not None else None,
        entered=entered.timestamp() + offset,
        polled=polled.timestamp() + offset,
        price=price,
        horizon=max_interval.total_seconds(),
    )
    if state.status is None:
        backoff = (polled - state.registered_at).total_seconds() * NOT_FOUND_BACKOFF_SHARE
        wait = min(max(wait, backoff), max_interval.total_seconds())
    return polled + timedelta(seconds=wait)


def _utc_offset_seconds(moment: datetime, zone: ZoneInfo) -> float:
    delta = moment.astimezone(zone).utcoffset()
    return 0.0 if delta is None else delta.total_seconds()


def _wait_seconds(
    dwell: DwellModel,
    follower: DwellModel | None,
    entered: float,
    polled: float,
    price: float,
    horizon: float,
) -> float:
    """Seconds from the last lookup (at local time `polled`) to the next one.

    With T the transition time, F(t) = P(T <= t | T > polled) and f its density, a lookup at t
    is well placed when moving it later would cost more than it gains (the optimality condition
    of a poll schedule with a price per lookup): F(t) >= f(t) * (price + next gap), the next gap
    being what the square-root law gives at the hazard of t. So nothing is spent while a
    transition is still unlikely, and the lookup comes once most of the likely mass has passed.
    Quiet hours are handled as corners: a lookup at the window's close if what it would catch,
    times the quiet hours it would otherwise wait, outweighs the price; else the next one just
    after the reopening, where the transitions that fell due overnight pile up.

    When the status usually leads to another non-terminal one, a late lookup also finds that
    second transition late: its chance (the first shifted by the follower's median dwell and
    deferred to the follower's active hours) counts among what a lookup would catch.
    """
    alive = dwell.survival(dwell.last_active(polled) - entered)
    end = polled + horizon
    if alive <= 0.0:
        return max(dwell.last_active(end), polled + MIN_INTERVAL.total_seconds()) - polled

    # The dwell's lognormal, unrolled: this runs a dozen times per lookup planned.
    mu, sigma = dwell.log_mu, dwell.log_sigma
    to_z = 1.0 / sigma
    density_scale = 1.0 / (sigma * _ROOT_TWO_PI * alive)
    two_price = 2.0 * price

    def first(x: float) -> tuple[float, float]:
        """P(T <= x | T > polled) and its density at x, for x in active hours."""
        d = x - entered
        if d <= 0.0 or x <= polled:
            return 0.0, 0.0
        z = (math.log(d) - mu) * to_z
        return 1.0 - 0.5 * math.erfc(z * _ROOT_HALF) / alive, (
            math.exp(-0.5 * z * z) * density_scale / d
        )

    follower_share = dwell.follower_share if follower is not None else 0.0
    follower_median = math.exp(follower.log_mu) if follower is not None else 0.0

    def second(x: float) -> tuple[float, float]:
        """The follow-up transition: its expected count by x, and its rate at x."""
        if follower is None or follower_share <= 0.0:
            return 0.0, 0.0
        active = follower.last_active(x)
        share, density = first(dwell.last_active(active - follower_median))
        return follower_share * share, (follower_share * density if active == x else 0.0)

    def settled(x: float) -> bool:
        """Whether a lookup at x (in active hours) is due by the optimality condition."""
        share, density = first(x)
        more, more_density = second(x)
        if density <= 0.0:
            return share + more > 0.0
        left = 1.0 - share
        following = min(math.sqrt(two_price * left / density) if left > 0.0 else 0.0, horizon)
        return share + more >= density * price + (density + more_density) * following

    for start, stop, reopened in _active_spans(dwell, polled, end):
        if reopened and settled(start):
            return (
                max(start + REOPENING_LAG_SECONDS, polled + MIN_INTERVAL.total_seconds()) - polled
            )
        u = start
        while u < stop:
            v = min(u + min(max(MIN_STEP_SECONDS, (u - polled) / 4.0), MAX_STEP_SECONDS), stop)
            if settled(v):
                for _ in range(BISECTIONS):
                    middle = (u + v) / 2.0
                    u, v = (u, middle) if settled(middle) else (middle, v)
                return max(v, polled + MIN_INTERVAL.total_seconds()) - polled
            u = v
        if stop < end and dwell.quiet is not None:
            # The window closes: a lookup now, or none before the reopening.
            share, _ = first(stop)
            more, _ = second(stop)
            quiet_seconds = (dwell.quiet[1] - dwell.quiet[0]) % DAY_SECONDS
            if (share + more) * quiet_seconds >= price * (1.0 - share):
                return max(stop, polled + MIN_INTERVAL.total_seconds()) - polled
    return max(dwell.last_active(end), polled + MIN_INTERVAL.total_seconds()) - polled


def _active_spans(dwell: DwellModel, start: float, end: float) -> list[tuple[float, float, bool]]:
    """The status's active hours within (start, end]: (from, to, whether `from` is a reopening)."""
    if dwell.quiet is None:
        return [(start, end, False)]
    close, reopen = dwell.quiet
    spans = []
    if (start - close) % DAY_SECONDS < (reopen - close) % DAY_SECONDS:
        span_start, reopened = start + (reopen - start) % DAY_SECONDS, True
    else:
        span_start, reopened = start, False
    while span_start < end:
        span_end = min(span_start + ((close - span_start) % DAY_SECONDS or DAY_SECONDS), end)
        spans.append((span_start, span_end, reopened))
        span_start, reopened = span_end + (reopen - close) % DAY_SECONDS, True
    return spans


# ---------------------------------------------------------------------------------------------
# Learning from observed stays


def fit_model(
    stays: Iterable[Stay], timezone: str, previous: LearnedModel | None = None
) -> LearnedModel:
    """Learn each status's dwell and quiet hours from observed stays, censored ones included.

    Pass stays that entered their status within a recent window (a few days), whether or not they
    have ended: that choice keeps the fit unbiased. `previous` only speeds convergence up.
    """
    clock = _LocalClock(ZoneInfo(timezone))
    groups: dict[str, list[Stay]] = {}
    for stay in stays:
        groups.setdefault(_key(stay.status), []).append(stay)
    dwell = {}
    for key, group in groups.items():
        start = previous.dwell.get(key, PRIOR) if previous is not None else PRIOR
        follower, share = _usual_follower(group)
        dwell[key] = replace(
            _fit_status(group, clock, start), follower=follower, follower_share=share
        )
    return LearnedModel(timezone=timezone, dwell=dwell)


def _usual_follower(stays: list[Stay]) -> tuple[str | None, float]:
    """The most frequent non-terminal next status, and its share of the ended stays."""
    counts: dict[str, int] = {}
    ended = 0
    for stay in stays:
        if stay.next_status is not None:
            ended += 1
            if not stay.next_status.terminal:
                counts[stay.next_status.value] = counts.get(stay.next_status.value, 0) + 1
    if ended < MIN_STAYS_FOR_FOLLOWER or not counts:
        return None, 0.0
    follower = max(counts, key=lambda key: counts[key])
    return follower, counts[follower] / ended


class _LocalClock:
    """Local seconds (UTC seconds plus the zone's offset then), with offsets cached by hour."""

    def __init__(self, zone: ZoneInfo) -> None:
        self.zone = zone
        self.offsets: dict[int, float] = {}

    def seconds(self, moment: datetime) -> float:
        ts = moment.timestamp()
        hour = int(ts // 3600)
        offset = self.offsets.get(hour)
        if offset is None:
            offset = self.offsets[hour] = _utc_offset_seconds(moment, self.zone)
        return ts + offset


def _fit_status(stays: list[Stay], clock: _LocalClock, start: DwellModel) -> DwellModel:
    spans: list[tuple[float, float, bool]] = []  # (entered, ended or last seen, ended?)
    for stay in stays[:: max(1, math.ceil(len(stays) / MAX_STAYS_FOR_QUIET_HOURS))]:
        entered = clock.seconds(stay.entered_at)
        if stay.exited_at is not None:
            spans.append((entered, clock.seconds(stay.exited_at), True))
        elif stay.observed_until is not None:
            spans.append((entered, clock.seconds(stay.observed_until), False))
    quiet = _learn_quiet(spans)
    windowed = DwellModel(start.log_mu, start.log_sigma, quiet)
    stride = max(1, math.ceil(len(spans) / MAX_STAYS_PER_FIT))
    exact: list[float] = []
    bounded: list[tuple[float, float]] = []  # log-dwell known to lie between the two
    for entered, ended, exited in spans[::stride]:
        if not exited:
            # Still in the status when last seen: the dwell ran at least to the last active moment.
            low = windowed.last_active(ended) - entered
            if low > 0.0:
                bounded.append((math.log(low), math.inf))
        elif quiet is not None and (ended - quiet[1]) % DAY_SECONDS < REOPENING_EXIT_SECONDS:
            # Left at a reopening: it may have been due at any moment of the quiet hours before.
            closed = ended - (ended - quiet[0]) % DAY_SECONDS
            low = closed - entered
            high = max(ended - entered, 1.0)
            bounded.append((math.log(low) if low > 0.0 else -math.inf, math.log(high)))
        else:
            exact.append(math.log(max(ended - entered, 1.0)))
    mu, sigma = _fit_lognormal(exact, bounded, start.log_mu, start.log_sigma)
    return DwellModel(mu, sigma, quiet, len(stays))


def _learn_quiet(spans: list[tuple[float, float, bool]]) -> tuple[int, int] | None:
    """The longest run of local hours when shipments at risk (nearly) never left the status."""
    total_exits = sum(1 for _, _, exited in spans if exited)
    if total_exits < MIN_EXITS_FOR_QUIET_HOURS:
        return None
    width = next(
        (w for w in HOUR_BIN_CHOICES if total_exits * w / DAY_SECONDS >= EXITS_PER_HOUR_BIN),
        HOUR_BIN_CHOICES[-1],
    )
    bins = DAY_SECONDS // width
    exits = [0] * bins
    # Exposure by local-hour bin, as a difference array over two days to unroll the wrap.
    change = [0.0] * (2 * bins + 1)
    full_days = 0
    for entered, ended, exited in spans:
        if exited:
            exits[int(ended % DAY_SECONDS) // width] += 1
        length = ended - entered
        if length <= 0.0:
            continue
        days, rest = divmod(length, DAY_SECONDS)
        full_days += int(days)
        change[int(entered % DAY_SECONDS) // width] += 1.0
        change[int((entered % DAY_SECONDS + rest) // width)] -= 1.0
    exposure = [float(full_days)] * bins
    running = 0.0
    for i in range(2 * bins):
        running += change[i]
        exposure[i % bins] += running
    rate = total_exits / max(sum(exposure), 1e-9)
    expected = [e * rate for e in exposure]
    quiet = [expected[i] > 0.0 and exits[i] <= QUIET_RATE_SHARE * expected[i] for i in range(bins)]
    if all(quiet) or not any(quiet):
        return None
    # The longest circular run, walked from an active bin so no run is split by the wrap.
    origin = quiet.index(False)
    best_start, best_length, run_start, run_length = 0, 0, 0, 0
    for j in range(1, bins + 1):
        i = (origin + j) % bins
        if quiet[i]:
            if run_length == 0:
                run_start = i
            run_length += 1
            if run_length > best_length:
                best_start, best_length = run_start, run_length
        else:
            run_length = 0
    run = [(best_start + k) % bins for k in range(best_length)]
    if (
        best_length * width < MIN_QUIET_SECONDS
        or sum(expected[i] for i in run) < QUIET_MIN_EXPECTED_EXITS
        or sum(exits[i] for i in run) > QUIET_RATE_SHARE * sum(expected[i] for i in run)
    ):
        return None
    close = best_start * width
    return close, (close + best_length * width) % DAY_SECONDS


def _fit_lognormal(
    exact: list[float], bounded: list[tuple[float, float]], mu: float, sigma: float
) -> tuple[float, float]:
    """Mean and spread of a normal log-dwell by expectation-maximisation, with the prior's weight.

    `exact` are observed log-dwells; `bounded` are (low, high) ranges a log-dwell is known to lie
    in (censored or deferred stays).
    """
    prior_mu, prior_sigma = PRIOR.log_mu, PRIOR.log_sigma
    count = len(exact) + len(bounded) + PRIOR_WEIGHT
    exact_sum = sum(exact) + PRIOR_WEIGHT * prior_mu
    exact_squares = sum(y * y for y in exact) + PRIOR_WEIGHT * (prior_sigma**2 + prior_mu**2)
    for _ in range(EM_ITERATIONS):
        first, second = exact_sum, exact_squares
        for low, high in bounded:
            m1, m2 = _truncated_moments(mu, sigma, low, high)
            first += m1
            second += m2
        new_mu = first / count
        new_sigma = math.sqrt(max(second / count - new_mu * new_mu, 1e-4))
        done = abs(new_mu - mu) < EM_TOLERANCE and abs(new_sigma - sigma) < EM_TOLERANCE
        mu, sigma = new_mu, new_sigma
        if done:
            break
    return mu, sigma


def _truncated_moments(mu: float, sigma: float, low: float, high: float) -> tuple[float, float]:
    """E[y] and E[y^2] of y ~ Normal(mu, sigma) known to lie in (low, high)."""
    a = (low - mu) / sigma
    b = (high - mu) / sigma
    above_a = 1.0 if a == -math.inf else 0.5 * math.erfc(a / math.sqrt(2.0))
    above_b = 0.0 if b == math.inf else 0.5 * math.erfc(b / math.sqrt(2.0))
    mass = above_a - above_b
    if mass < 1e-300:
        # Far in a tail the range is all but a point: its nearer end.
        y = low if math.isfinite(low) and (not math.isfinite(high) or a > 0) else high
        return y, y * y
    pdf_a = 0.0 if not math.isfinite(a) else math.exp(-0.5 * a * a) / _ROOT_TWO_PI
    pdf_b = 0.0 if not math.isfinite(b) else math.exp(-0.5 * b * b) / _ROOT_TWO_PI
    z1 = (pdf_a - pdf_b) / mass
    z2 = 1.0 + ((a * pdf_a if pdf_a else 0.0) - (b * pdf_b if pdf_b else 0.0)) / mass
    return mu + sigma * z1, mu * mu + 2.0 * mu * sigma * z1 + sigma * sigma * z2


# ---------------------------------------------------------------------------------------------
# The price of a lookup

INITIAL_PRICE = 1800.0
MIN_PRICE = 1.0
MAX_PRICE = 30.0 * DAY_SECONDS
# Plan for a little less than the pace line allows: it absorbs the rest of the noise.
TARGET_UTILISATION = 0.98
# How fast the price moves toward the one that fits the last day's demand under the pace line.
PRICE_TIME_CONSTANT = 2 * 3600.0


def planned_rate(last_polled_at: datetime, next_poll: datetime) -> float:
    """Lookups per day a shipment asks for while it waits from one lookup to the next."""
    return DAY_SECONDS / max((next_poll - last_polled_at).total_seconds(), 1.0)


@dataclass
class PriceController:
    """Adapts one key's lookup price so that the lookups the policy asks for fit the pace line.

    Call `observe` every minute or so with the key's planned rate (the sum of `planned_rate`
    over its active shipments, each for its latest plan) and the shipments registered since the
    previous call. The planned rate counts what the policy asks for even when the limiter holds
    lookups back. The demand of each local hour of the last day is kept, with the price it was
    planned at; the price that fits is the one at which, re-priced (intervals grow as the square
    root of the price), the demand from midnight to the end of every hour stays under the pace
    line: savings of the quiet night can be spent in the morning, but no hour can borrow from a
    later one.
    """

    daily_quota: int
    timezone: str
    price: float = INITIAL_PRICE
    # By local hour of the day: [hour start (epoch s), planned lookups, first lookups, price]
    hours: dict[int, list[float]] = field(default_factory=dict)
    observed_at: float | None = None

    def observe(self, now: datetime, planned_per_day: float, registered: int) -> float:
        """Account for the demand since the previous call, and return the updated price."""
        t = now.timestamp()
        elapsed = 0.0 if self.observed_at is None else t - self.observed_at
        self.observed_at = t
        hour_start = t - t % 3600
        local_hour = now.astimezone(ZoneInfo(self.timezone)).hour
        bucket = self.hours.get(local_hour)
        if bucket is None or bucket[0] != hour_start:
            bucket = self.hours[local_hour] = [hour_start, 0.0, 0.0, self.price]
        bucket[1] += planned_per_day * elapsed / DAY_SECONDS
        bucket[2] += registered
        fitting = self._fitting_price()
        if fitting is not None and elapsed > 0.0:
            step = min(1.0, elapsed / PRICE_TIME_CONSTANT)
            self.price *= (fitting / self.price) ** step
            self.price = min(MAX_PRICE, max(MIN_PRICE, self.price))
        return self.price

    def _fitting_price(self) -> float | None:
        """The price at which the last day's demand would just fit under the pace line."""
        planned = first = 0.0
        scale = math.inf  # how far the planned lookups may grow (or must shrink) to fit
        for hour in range(24):
            bucket = self.hours.get(hour)
            if bucket is not None:
                planned += bucket[1] * math.sqrt(bucket[3] / self.price)
                first += bucket[2]
            if planned > 0.0:
                line = self.daily_quota * TARGET_UTILISATION * (hour + 1) / 24.0
                scale = min(scale, max(line - first, 0.0) / planned)
        if not math.isfinite(scale):
            return None
        # Planned lookups vary as the inverse square root of the price.
        return self.price / max(scale, 1e-3) ** 2

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form, to keep the controller in Redis between beat runs."""
        return {
            "daily_quota": self.daily_quota,
            "timezone": self.timezone,
            "price": self.price,
            "hours": {str(hour): bucket for hour, bucket in self.hours.items()},
            "observed_at": self.observed_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PriceController:
        """The controller `to_json` described."""
        return cls(
            daily_quota=int(data["daily_quota"]),
            timezone=str(data["timezone"]),
            price=float(data["price"]),
            hours={int(h): [float(x) for x in b] for h, b in data["hours"].items()},
            observed_at=data["observed_at"],
        )
