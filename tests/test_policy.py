"""The poll policy's plan, checked against what its lookups cost when shipments really move."""

from __future__ import annotations

import math
import random

import pytest

from worker.scheduling.policy import BINS_PER_DAY, GRID_SECONDS, StatusDynamics, solve

HOUR = 3600.0


def simulated_cost(waits: list[int], dwells: list[float], price: float) -> float:
    """Mean cost (price per lookup plus detection delay) of looking up after each wait in turn,
    for a shipment entered at the start of a grid step that leaves after each of `dwells`."""
    total = 0.0
    for dwell in dwells:
        polled, lookups = 0, 0
        while polled * GRID_SECONDS < dwell:
            polled += waits[min(polled, len(waits) - 1)]
            lookups += 1
        total += price * lookups + polled * GRID_SECONDS - dwell
    return total / len(dwells)


@pytest.mark.parametrize(("median_hours", "sigma", "price"), [(4, 0.5, 1800), (22, 0.6, 14400)])
def test_the_plan_costs_no_more_than_any_fixed_interval(
    median_hours: float, sigma: float, price: float
) -> None:
    status = StatusDynamics(math.log(median_hours * HOUR), sigma, None, {})
    plan = solve({"S": status}, price, max_wait_steps=96)
    table = plan.waits["S"]
    # The policy's own wait from each age, for a shipment entered at the start of bin 0.
    waits = [int(table[0, age]) for age in range(table.shape[1])]
    rng = random.Random(3)
    # Entered mid-step, as the plan assumes.
    dwells = [
        math.exp(status.log_mu + sigma * rng.gauss(0, 1)) + GRID_SECONDS / 2 for _ in range(20000)
    ]
    planned = simulated_cost(waits, dwells, price)
    best_fixed = min(simulated_cost([w], dwells, price) for w in range(1, 97))
    assert planned < best_fixed * 0.98


def test_no_lookup_is_planned_inside_quiet_hours() -> None:
    # Deliveries from 08:00 to 20:00 local time.
    quiet = (20 * 3600, 8 * 3600)
    status = StatusDynamics(math.log(4 * HOUR), 0.5, quiet, {})
    plan = solve({"S": status}, 1800, max_wait_steps=96)
    table = plan.waits["S"]
    close, reopen = 20 * 4, 8 * 4
    for entry in range(BINS_PER_DAY):
        for age in range(min(48, table.shape[1] - 1)):
            # A lookup lands at the reopening at the earliest and at the close at the latest.
            due = (entry + age + int(table[entry, age])) % BINS_PER_DAY
            assert reopen <= due <= close, (entry, age, due)
    assert plan.reopens(reopen) and not plan.reopens(close)
