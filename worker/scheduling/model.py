"""The poll scheduler: when each shipment is next worth a lookup, within the key's quota.

A lookup is worth making when it probably reveals transitions soon after they happened. From the
stays shipmon has observed, `fit_model` learns per status how long shipments stay (a lognormal
dwell, censored stays included), the local hours when the status never moves on (its quiet hours: a
transition due then waits for the window to reopen, so transitions pile up at the reopening), and
which statuses follow, in what shares. `next_poll_at` reads the next lookup from the plan
`worker.scheduling.policy` solves for that model at the key's price: the waits that minimise the
expected detection delay of everything still to come plus the price of every lookup. So nothing is
spent on shipments young in a slow status or in quiet hours, a lookup comes just after a
reopening's pile or at a window's close when that pays, and under a high price one lookup is timed
to catch several transitions. One price per key, adapted by `PriceController`
(worker.scheduling.pricing) from the demand of the last day, makes the lookups the policy asks for
fit under the pace line (worker.quota.pacing), so the limiter rarely has to hold shipments back.

Where the carrier pushes its status changes, `PushCoverage` says, per account and status left,
what share of transitions a push reported first and how late, as the recorded history shows it;
the plan for that account counts only the rest as waiting for a lookup, so lookups move to the
shipments and statuses pushes miss. An account without pushes gets exactly the poll-only plan.

Everything here is pure and typed: the worker and the benchmarks call the very same functions
with their own clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from worker.core.clock import DAY_SECONDS
from worker.domain.vocabulary import Status
from worker.scheduling.coverage import (
    NO_PUSHES,
    NOT_FOUND,
    PushCoverage,
    PushTerm,
)
from worker.scheduling.policy import (
    GRID_SECONDS,
    MAX_WAIT_SECONDS,
    Kernel,
    Plan,
    StatusDynamics,
    solve,
)

_ROOT_TWO_PI = math.sqrt(2.0 * math.pi)
# Statuses the model has not seen yet are planned with the prior, under this name.
UNSEEN = "*"

# The longest a shipment may wait for its next lookup (no shipment starves).
DEFAULT_MAX_INTERVAL = timedelta(hours=24)
# While the carrier does not know an order, wait at least this share of the order's age.
NOT_FOUND_BACKOFF_SHARE = 0.25
# A lookup at a reopening comes this long after it, so that it sees the transitions stamped at
# the reopening itself.
REOPENING_LAG_SECONDS = 60.0
# Prices are rounded to steps of this factor, so one solved plan serves a range of prices.
PRICE_STEP = 1.2
PRICE_UNIT = 1800.0

# Cold start: a vague dwell (median 6 h, spread of a factor e) worth a few observations, so the
# first days poll sensibly and data soon dominates.
PRIOR_MEDIAN_SECONDS = 6 * 3600.0
NOT_FOUND_PRIOR_MEDIAN_SECONDS = 1800.0
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
# A status's next statuses are known once this many of its stays have ended.
MIN_ENDED_FOR_NEXT = 50
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
    # The carrier's push reported the current status and no lookup has read it since: its scans,
    # fees and delivery photo are still to fetch.
    status_by_push: bool = False


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
    # The shares of the statuses that follow, by key (terminal ones included): a late lookup may
    # find two or three transitions to report, not one.
    next_shares: Mapping[str, float] = field(default_factory=dict)

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
# Before any order has been found, carriers usually know an order within about half an hour of
# its registration: new shipments are looked up promptly from the first day.
NOT_FOUND_PRIOR = DwellModel(math.log(NOT_FOUND_PRIOR_MEDIAN_SECONDS), PRIOR_SIGMA)


@dataclass(frozen=True)
class LearnedModel:
    """Dwell models per status, learned from observed stays, in the carrier's timezone, and each
    account's push coverage."""

    timezone: str
    dwell: Mapping[str, DwellModel] = field(default_factory=dict)
    pushes: Mapping[int, PushCoverage] = field(default_factory=dict)
    # Plans solved for this model, by price step, ceiling and push terms.
    _plans: dict[tuple[int, int, tuple[PushTerm, ...]], Plan] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _kernels: dict[str, Kernel] = field(default_factory=dict, init=False, repr=False, compare=False)
    _terms: dict[PushCoverage, tuple[PushTerm, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def for_status(self, status: Status | None) -> DwellModel:
        """The dwell model of a status (None: not yet found), the prior when nothing is known."""
        return self.dwell.get(_key(status), PRIOR if status is not None else NOT_FOUND_PRIOR)

    def coverage(self, account_id: int) -> PushCoverage:
        """The account's push coverage, as last learned; none when it has no pushes."""
        return self.pushes.get(account_id, NO_PUSHES)

    def plan(self, price: float, max_interval: timedelta, pushes: PushCoverage = NO_PUSHES) -> Plan:
        """The policy's waits at `price` (rounded to a price step), solved once and kept."""
        step = round(math.log(max(price, 1.0) / PRICE_UNIT) / math.log(PRICE_STEP))
        ceiling = max(1, int(min(max_interval.total_seconds(), MAX_WAIT_SECONDS) // GRID_SECONDS))
        terms = self._terms.get(pushes)
        if terms is None:
            terms = self._terms[pushes] = pushes.terms([UNSEEN, NOT_FOUND, *self.dwell])
        plan = self._plans.get((step, ceiling, terms))
        if plan is None:
            plan = self._plans[(step, ceiling, terms)] = solve(
                self.dynamics(terms), PRICE_UNIT * PRICE_STEP**step, ceiling, self._kernels
            )
        return plan

    def dynamics(self, pushes: Iterable[PushTerm] = ()) -> dict[str, StatusDynamics]:
        """What the policy needs of every learned status, and of the prior for unseen ones,
        with the push share and delay of each status `pushes` names."""
        pushed = {key: (share, delay) for key, share, delay in pushes}

        def of(key: str, model: DwellModel) -> StatusDynamics:
            shares = {key: share for key, share in model.next_shares.items() if key in self.dwell}
            share, delay = pushed.get(key, (0.0, 0.0))
            return StatusDynamics(model.log_mu, model.log_sigma, model.quiet, shares, share, delay)

        priors = {UNSEEN: of(UNSEEN, PRIOR), NOT_FOUND: of(NOT_FOUND, NOT_FOUND_PRIOR)}
        return priors | {key: of(key, model) for key, model in self.dwell.items()}

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
                    "next_shares": dict(m.next_shares),
                }
                for key, m in self.dwell.items()
            },
            "push_coverage": {str(account): c.to_json() for account, c in self.pushes.items()},
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
                next_shares={k: float(v) for k, v in m.get("next_shares", {}).items()},
            )
        pushes = {
            int(account): PushCoverage.from_json(c)
            for account, c in data.get("push_coverage", {}).items()
        }
        return cls(timezone=str(data["timezone"]), dwell=dwell, pushes=pushes)


def _key(status: Status | None) -> str:
    return NOT_FOUND if status is None else status.value


# ---------------------------------------------------------------------------------------------
# The policy


def next_poll_at(
    state: ShipmentState,
    model: LearnedModel,
    price: float,
    max_interval: timedelta = DEFAULT_MAX_INTERVAL,
    pushes: PushCoverage = NO_PUSHES,
) -> datetime | None:
    """When this shipment is next worth a lookup; None once its status is terminal.

    `price` is the key's current price of one lookup, in seconds of expected detection delay it
    must cut (see `PriceController`). No wait exceeds `max_interval`. A shipment never looked up
    is planned as if looked up at its registration: its first lookup comes when the carrier has
    probably come to know it, sooner the cheaper lookups are. `pushes` is the account's push
    coverage: the more of a status's changes pushes report, the later its lookups. A status a
    push reported is planned from its entry, like one a lookup just found: its follow-up lookup
    (for the scans, fees and photos a push lacks) comes at its price like any other; a final
    status a push reported gets one such lookup, `price` seconds after it, the delay at which
    the lookup is just worth its price.
    """
    entered = state.status_entered_at if state.status is not None else None
    entered = entered or state.registered_at
    # A status a push reported after the last lookup is planned as if a lookup had found it.
    polled = max(state.last_polled_at or state.registered_at, entered)
    ceiling = polled + max_interval
    if state.status is not None and state.status.terminal:
        if not state.status_by_push:
            return None
        return min(entered + timedelta(seconds=price), ceiling)
    if max_interval.total_seconds() <= GRID_SECONDS:
        return ceiling  # a ceiling within one step of the plan's grid leaves nothing to plan
    # The carrier's local hours, at one offset for the whole horizon: the carrier's timezone has
    # no daylight saving, and elsewhere an hour's shift once a season costs little.
    offset = _utc_offset_seconds(polled, model.zone)
    plan = model.plan(price, max_interval, pushes)
    key = _key(state.status)
    entry_bin = math.floor((entered.timestamp() + offset) / GRID_SECONDS)
    age = math.floor((polled.timestamp() + offset) / GRID_SECONDS) - entry_bin
    steps = plan.wait_steps(key if key in plan.waits else UNSEEN, entry_bin, age)
    if steps is None:
        # Older in the status than the plan reaches.
        due = ceiling
    else:
        due_bin = entry_bin + age + steps
        lag = REOPENING_LAG_SECONDS if plan.reopens(due_bin) else 0.0
        due = datetime.fromtimestamp(due_bin * GRID_SECONDS + lag - offset, UTC)
    if state.status is None and state.last_polled_at is not None:
        # The longer an order has been unknown, the likelier it is never to be known at all.
        due = max(due, polled + (polled - state.registered_at) * NOT_FOUND_BACKOFF_SHARE)
    return min(due, ceiling)


def _utc_offset_seconds(moment: datetime, zone: ZoneInfo) -> float:
    delta = moment.astimezone(zone).utcoffset()
    return 0.0 if delta is None else delta.total_seconds()


# ---------------------------------------------------------------------------------------------
# Learning from observed stays


@dataclass(frozen=True)
class StayStatistics:
    """What fitting one status needs of its stays, however many there were.

    `sample` is every `sample_stride(count)`-th stay in order of entry; `next_counts` counts
    the statuses the ended ones left for. The database computes these in SQL (`learning`),
    the simulator from a list of stays (`summarise_stays`); both fit alike.
    """

    count: int
    next_counts: Mapping[str, int]
    sample: Sequence[Stay]


def sample_stride(count: int) -> int:
    """One stay in how many a fit reads to learn quiet hours and dwell: at most a few thousand."""
    return max(1, math.ceil(count / MAX_STAYS_FOR_QUIET_HOURS))


def summarise_stays(stays: Iterable[Stay]) -> dict[str, StayStatistics]:
    """The statistics of each status's stays, given in order of entry."""
    groups: dict[str, list[Stay]] = {}
    for stay in stays:
        groups.setdefault(_key(stay.status), []).append(stay)
    statistics = {}
    for key, group in groups.items():
        counts: dict[str, int] = {}
        for stay in group:
            if stay.next_status is not None:
                counts[stay.next_status.value] = counts.get(stay.next_status.value, 0) + 1
        statistics[key] = StayStatistics(len(group), counts, group[:: sample_stride(len(group))])
    return statistics


def fit_model(
    stays: Iterable[Stay], timezone: str, previous: LearnedModel | None = None
) -> LearnedModel:
    """Learn each status's dwell and quiet hours from observed stays, censored ones included.

    Pass stays that entered their status within a recent window (a few days), whether or not they
    have ended: that choice keeps the fit unbiased. `previous` only speeds convergence up.
    """
    return fit_statistics(summarise_stays(stays), timezone, previous)


def fit_statistics(
    statistics: Mapping[str, StayStatistics], timezone: str, previous: LearnedModel | None = None
) -> LearnedModel:
    """`fit_model` from the statistics of the stays rather than the stays themselves."""
    clock = _LocalClock(ZoneInfo(timezone))
    dwell = {}
    for key, group in statistics.items():
        prior = NOT_FOUND_PRIOR if key == NOT_FOUND else PRIOR
        start = previous.dwell.get(key, prior) if previous is not None else prior
        fitted = _fit_status(group, clock, start, prior)
        dwell[key] = replace(fitted, next_shares=_next_shares(group.next_counts))
    return LearnedModel(timezone=timezone, dwell=dwell)


def _next_shares(counts: Mapping[str, int]) -> dict[str, float]:
    """The share of each next status among the ended stays; none until enough have ended."""
    ended = sum(counts.values())
    if ended < MIN_ENDED_FOR_NEXT:
        return {}
    return {key: count / ended for key, count in sorted(counts.items())}


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


def _fit_status(
    stays: StayStatistics, clock: _LocalClock, start: DwellModel, prior: DwellModel
) -> DwellModel:
    spans: list[tuple[float, float, bool]] = []  # (entered, ended or last seen, ended?)
    for stay in stays.sample:
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
    mu, sigma = _fit_lognormal(exact, bounded, start.log_mu, start.log_sigma, prior)
    return DwellModel(mu, sigma, quiet, stays.count)


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
    exact: list[float],
    bounded: list[tuple[float, float]],
    mu: float,
    sigma: float,
    prior: DwellModel,
) -> tuple[float, float]:
    """Mean and spread of a normal log-dwell by expectation-maximisation, with the prior's weight.

    `exact` are observed log-dwells; `bounded` are (low, high) ranges a log-dwell is known to lie
    in (censored or deferred stays); (`mu`, `sigma`) is where the iteration starts.
    """
    prior_mu, prior_sigma = prior.log_mu, prior.log_sigma
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
