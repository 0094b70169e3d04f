"""The poll policy: how long to wait before the next lookup, solved for the whole lifecycle.

A lookup costs the key's price (in seconds of detection delay it must save, see
`pricing.PriceController`); a transition costs the time from when it happened to the first
lookup that shows it. `solve` finds, by dynamic programming on a 15-minute grid, the wait that
minimises the expected cost of everything still to come, for every status, local time of day the
status was entered, and age in the status at the last lookup. Because the cost to go after a
lookup counts the statuses that follow, the plan knows that a late lookup may find two or three
transitions at once, when the next status is usually brief, or ends in a pile at a window's
reopening: under a high price it waits for the pile instead of paying for each step.

The grid's model of one status: the dwell is lognormal; a transition due in the status's quiet
hours happens at their reopening (a pile, caught by a lookup just after the reopening); the next
status is drawn from the observed shares. Where the carrier pushes status changes, a share of a
status's exits is seen a push's delay after it happens whatever the lookups do, and the status that
follows is planned from its entry; only the rest waits for a lookup, so the lookups a status is
worth shrink with its push share. Everything here is pure: numbers in, waits out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from worker.core.clock import DAY_SECONDS

GRID_SECONDS = 900
BINS_PER_DAY = DAY_SECONDS // GRID_SECONDS
# Stays are planned up to this age (or the dwell's 99.9th percentile and a day, if sooner);
# older shipments wait the longest interval allowed.
MAX_AGE_SECONDS = 6 * DAY_SECONDS
# The standard normal's 99.9th percentile: a lognormal dwell this many sigmas past its median
# is the 99.9th percentile of stays.
DWELL_TAIL_SIGMAS = 3.09
# Waits are planned up to this long; a longer ceiling only matters past the plan.
MAX_WAIT_SECONDS = 2 * DAY_SECONDS
# Statuses that lead back to one another are solved this many times around the loop.
LOOP_PASSES = 2
# Below this chance of still being in the status, a state is treated as unreachable.
UNREACHABLE = 1e-12

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


@dataclass(frozen=True)
class StatusDynamics:
    """What the policy needs to know of one status."""

    log_mu: float
    log_sigma: float
    # (close, reopen) in local seconds of the day, or None when the status moves at any hour.
    quiet: tuple[int, int] | None
    # The shares of the statuses that follow, by key; terminal ones are left out, so the shares
    # may sum to less than one.
    next: Mapping[str, float]
    # The share of its exits the carrier's push reports first, and their mean delay in seconds.
    push_share: float = 0.0
    push_delay_s: float = 0.0


@dataclass(frozen=True)
class Plan:
    """The waits that are optimal at one price: `waits[key][entry bin, age bin]`, in grid steps.

    Bins count grid steps of local time; an entry bin is taken modulo a day.
    """

    price: float
    waits: Mapping[str, npt.NDArray[np.int16]]
    # Time-of-day bins at whose start some status reopens.
    reopenings: frozenset[int] = frozenset()

    def reopens(self, grid_bin: int) -> bool:
        """Whether some status's quiet hours end at the start of this bin."""
        return grid_bin % BINS_PER_DAY in self.reopenings

    def wait_steps(self, key: str, entry_bin: int, age_bin: int) -> int | None:
        """Grid steps from the age bin of the last lookup to the next one; None past the plan."""
        table = self.waits.get(key)
        if table is None or age_bin >= table.shape[1]:
            return None
        return int(table[entry_bin % BINS_PER_DAY, max(age_bin, 0)])


class Kernel:
    """One status's exits on the grid, by the local time-of-day bin it was entered in."""

    def __init__(self, dynamics: StatusDynamics) -> None:
        longest = math.exp(dynamics.log_mu + DWELL_TAIL_SIGMAS * dynamics.log_sigma) + DAY_SECONDS
        self.ages = int(min(MAX_AGE_SECONDS, longest) // GRID_SECONDS)
        k = np.arange(self.ages + 1)
        # Raw dwell: entered mid-bin, so bin k after entry holds dwells ((k - 0.5), (k + 0.5)).
        edges = np.concatenate([[0.0], (k + 0.5) * GRID_SECONDS])
        cdf = np.array([_lognormal_cdf(x, dynamics.log_mu, dynamics.log_sigma) for x in edges])
        raw = np.diff(cdf)
        # exits[e, k]: the chance of leaving in bin k after entering in time-of-day bin e;
        # pile[e, k]: whether that exit is the pile at a reopening (at the end of bin k).
        self.exits = np.zeros((BINS_PER_DAY, self.ages + 1))
        self.pile = np.zeros((BINS_PER_DAY, self.ages + 1), dtype=bool)
        if dynamics.quiet is None:
            self.exits[:] = raw
        else:
            quiet, to_reopen = _quiet_bins(dynamics.quiet)
            for e in range(BINS_PER_DAY):
                tod = (e + k) % BINS_PER_DAY
                deferred = quiet[tod]
                target = np.where(deferred, k + to_reopen[tod] - 1, k)
                inside = target <= self.ages
                np.add.at(self.exits[e], target[inside], raw[inside])
                self.pile[e, target[inside & deferred]] = True
        # stays[e, a]: the chance of not having left before bin a (a lookup then still sees it).
        self.stays = np.zeros((BINS_PER_DAY, self.ages + 2))
        self.stays[:, :-1] = np.cumsum(self.exits[:, ::-1], axis=1)[:, ::-1]
        # Where the next status's cost to go is read: its entry bin, and the lag of a pile.
        self.next_bin = (np.arange(BINS_PER_DAY)[:, None] + k[None, :] + self.pile) % BINS_PER_DAY
        self.exit_offset = np.where(self.pile, 1.0, 0.5).astype(np.float32)
        self.exits32 = self.exits.astype(np.float32)


def solve(
    dynamics: Mapping[str, StatusDynamics],
    price: float,
    max_wait_steps: int,
    kernels: dict[str, Kernel] | None = None,
) -> Plan:
    """The optimal waits at `price` for every status in `dynamics`, none over `max_wait_steps`.

    Pass the same `kernels` dict to later calls on the same dynamics to reuse the grid's exits.
    """
    max_wait_steps = min(max_wait_steps, MAX_WAIT_SECONDS // GRID_SECONDS)
    kernels = {} if kernels is None else kernels
    for key, status in dynamics.items():
        if key not in kernels:
            kernels[key] = Kernel(status)
    later = {key: np.zeros((BINS_PER_DAY, max_wait_steps + 1)) for key in dynamics}
    waits: dict[str, npt.NDArray[np.int16]] = {}
    for group in _successors_first(dynamics):
        for _ in range(LOOP_PASSES if _is_loop(group, dynamics) else 1):
            for key in group:
                waits[key], later[key] = _solve_status(
                    kernels[key], dynamics[key], later, price, max_wait_steps
                )
    reopenings = frozenset(
        round(status.quiet[1] / GRID_SECONDS) % BINS_PER_DAY
        for status in dynamics.values()
        if status.quiet is not None
    )
    return Plan(price=price, waits=waits, reopenings=reopenings)


def _solve_status(
    kernel: Kernel,
    status: StatusDynamics,
    later: Mapping[str, Floats],
    price: float,
    max_wait: int,
) -> tuple[npt.NDArray[np.int16], Floats]:
    """One status's waits, and its cost to go for a shipment entered `d` steps before a lookup.

    Returns (waits[e, a], entered[e, d]): the best wait after a lookup at age a, and the expected
    cost of everything from the status onward when the first lookup since entering it comes d
    steps after entry in time-of-day bin e.

    An exit the carrier pushes (share c) costs its push delay plus what follows from a lookup
    right at its entry, whenever the lookups come; only the rest, 1 - c, is seen by a lookup.
    A lookup planned after a pushed exit is never made (the next status's plan replaces it), so
    its price is paid only while no pushed exit came first. With c = 0 nothing of this is added:
    an account without pushes gets exactly the plan it would without them.
    """
    ages, width = kernel.ages, max_wait
    following = np.zeros((BINS_PER_DAY, width + 1))
    for key, share in status.next.items():
        if key in later:
            following += share * later[key]
    # cost[d-1, e, k]: an exit in bin k seen d steps later: its delay plus what follows (read
    # one step earlier for a pile, which happens at the end of its bin).
    columns = np.arange(1, width + 1)
    rows = kernel.next_bin * (width + 1) - kernel.pile
    flat = following.astype(np.float32).ravel()
    cost = np.take(flat, rows[None, :, :] + columns[:, None, None])
    cost += (columns.astype(np.float32)[:, None, None] - kernel.exit_offset) * GRID_SECONDS
    pushed = status.push_share
    if pushed > 0.0:
        on_push = np.take(flat, rows + kernel.pile) + np.float32(status.push_delay_s)
        cost *= np.float32(1.0 - pushed)
        cost += np.float32(pushed) * on_push[None, :, :]
    cost *= kernel.exits32
    # caught[w-1, e, p]: the cost of the exits in bins p-w .. p-1, all seen by a lookup at p.
    caught = np.zeros_like(cost)
    for w in range(1, width + 1):
        if w > 1:
            caught[w - 1] = caught[w - 2]
        if w <= ages:
            caught[w - 1, :, w:] += cost[w - 1, :, : ages + 1 - w]
    del cost
    stays = kernel.stays
    value = np.zeros((BINS_PER_DAY, ages + 2))
    waits = np.full((BINS_PER_DAY, ages + 1), width, dtype=np.int16)
    steps = np.arange(1, width + 1)
    for age in range(ages - 1, -1, -1):
        options = steps[: min(width, ages - age)]
        polled = age + options
        alive = stays[:, age]
        reachable = alive > UNREACHABLE
        total = stays[:, polled] * value[:, polled] + caught[options - 1, :, polled].T
        if pushed > 0.0:
            # The lookup at `polled` is spared when a pushed exit comes before it.
            total -= pushed * price * (alive[:, None] - stays[:, polled])
        choice = np.argmin(total, axis=1)
        best = total[np.arange(BINS_PER_DAY), choice]
        value[:, age] = np.where(reachable, price + best / np.where(reachable, alive, 1.0), 0.0)
        waits[:, age] = np.where(reachable, options[choice], width)
    entered = np.empty((BINS_PER_DAY, width + 1))
    entered[:, 0] = value[:, 0]
    d_steps = np.minimum(np.arange(1, width + 1), ages)
    entered[:, 1:] = (
        stays[:, d_steps] * value[:, d_steps] + caught[np.minimum(d_steps, width) - 1, :, d_steps].T
    )
    return waits, entered


def _lognormal_cdf(x: float, mu: float, sigma: float) -> float:
    if x <= 0.0:
        return 0.0
    return 0.5 * math.erfc(-(math.log(x) - mu) / (sigma * math.sqrt(2.0)))


def _quiet_bins(quiet: tuple[int, int]) -> tuple[npt.NDArray[np.bool_], Ints]:
    """Which time-of-day bins are quiet, and the steps from each bin to the next reopening."""
    close = round(quiet[0] / GRID_SECONDS) % BINS_PER_DAY
    reopen = round(quiet[1] / GRID_SECONDS) % BINS_PER_DAY
    bins = np.arange(BINS_PER_DAY)
    inside = (bins - close) % BINS_PER_DAY < (reopen - close) % BINS_PER_DAY
    return inside, (reopen - bins) % BINS_PER_DAY


def _successors_first(dynamics: Mapping[str, StatusDynamics]) -> list[list[str]]:
    """Statuses grouped into loops (strongly connected), each group after those it leads to."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(key: str) -> None:
        index[key] = low[key] = len(index)
        stack.append(key)
        on_stack.add(key)
        for follower in dynamics[key].next:
            if follower not in dynamics:
                continue
            if follower not in index:
                visit(follower)
                low[key] = min(low[key], low[follower])
            elif follower in on_stack:
                low[key] = min(low[key], index[follower])
        if low[key] == index[key]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == key:
                    break
            groups.append(group)

    for key in dynamics:
        if key not in index:
            visit(key)
    return groups


def _is_loop(group: list[str], dynamics: Mapping[str, StatusDynamics]) -> bool:
    return len(group) > 1 or group[0] in dynamics[group[0]].next
