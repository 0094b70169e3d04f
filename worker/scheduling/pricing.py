"""The price of a lookup: one per key, steered so the lookups its plans ask for fit the quota.

The scheduler (`worker.scheduling.model`) plans each shipment's lookups at its key's price; a
higher price means fewer, better-timed lookups. `PriceController` watches the demand those
plans make, hour by hour of the carrier's day, and moves the price until it fits under the pace
line (`worker.quota.pacing`), so the limiter rarely has to hold shipments back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from worker.core.clock import DAY_SECONDS

INITIAL_PRICE = 1800.0
MIN_PRICE = 1.0
MAX_PRICE = 30.0 * DAY_SECONDS
# Aim the planned lookups a little above the pace line: the planned rate (each plan spread evenly
# over its wait) runs a few percent under the lookups actually made, and the limiter, not this
# target, enforces the line. On the reference workload 0.98 left 3-4% of the quota unspent and
# 1.10 built evening backlogs that cost more than they caught.
TARGET_UTILISATION = 1.03
# When the quota cannot look up every open shipment once per ceiling, the ceiling stretches to
# this many times the interval the quota affords: the price, not the queue, then decides who
# waits, instead of every shipment being looked up in turn at the ceiling. A stretched ceiling is
# rounded up to whole steps, so few plans need solving.
CEILING_STRETCH = 2.0
CEILING_STEP = timedelta(hours=6)
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
    # The key's open shipments, as last counted (see `max_interval`).
    open_shipments: int = 0

    def max_interval(self, setting: timedelta) -> timedelta:
        """The ceiling on a wait: `setting`, stretched when the quota cannot afford it."""
        if self.daily_quota <= 0:
            return setting
        affordable = timedelta(days=CEILING_STRETCH * self.open_shipments / self.daily_quota)
        if affordable <= setting:
            return setting
        return CEILING_STEP * math.ceil(affordable / CEILING_STEP)

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
            "open_shipments": self.open_shipments,
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
            open_shipments=int(data.get("open_shipments", 0)),
        )
