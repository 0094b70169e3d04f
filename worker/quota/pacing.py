"""The pace line: how much of a daily quota may be spent by a given moment of the carrier day.

The carrier's day starts at 00:00 in its own timezone. At any moment a key (and the total) may
have used at most its daily quota times the share of the day that has passed, plus a small
slack, so the quota can never run out before midnight. Budget saved in quiet hours stays
available later the same day. The Redis limiter enforces the same line atomically; this module
is the one definition of it, shared by the limiter, the scheduler and the benchmarks.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from worker.core.clock import DAY_SECONDS

# A few minutes' worth of the average rate, so the first polls after midnight need no wait.
SLACK_SHARE = 0.005
MIN_SLACK = 10
# The per-second ceiling, as a multiple of the average rate, that protects the carrier from bursts.
BURST_FACTOR = 5.0


def carrier_day_start(now: datetime, tz: ZoneInfo) -> datetime:
    """The start (00:00 local) of the carrier day containing `now`, as an aware datetime."""
    local = now.astimezone(tz)
    return datetime.combine(local.date(), time(0), tzinfo=tz)


def carrier_day_end(now: datetime, tz: ZoneInfo) -> datetime:
    """The next local midnight after `now`: when the carrier resets its counters."""
    start = carrier_day_start(now, tz)
    # Via the local date, not +24h, so days of 23 or 25 hours still end at midnight.
    next_date = (start + timedelta(hours=36)).date()
    return datetime.combine(next_date, time(0), tzinfo=tz)


def elapsed_share(now: datetime, tz: ZoneInfo) -> float:
    """The share of the carrier day that has passed at `now`, from 0.0 to 1.0."""
    start = carrier_day_start(now, tz)
    length = (carrier_day_end(now, tz) - start).total_seconds()
    return min(1.0, max(0.0, (now - start).total_seconds() / length))


def slack(daily_quota: int) -> int:
    """How far ahead of the straight line a key may run."""
    return max(MIN_SLACK, int(daily_quota * SLACK_SHARE))


def allowed_by(daily_quota: int, share: float) -> int:
    """The most lookups that may have been spent once `share` of the carrier day has passed."""
    return min(daily_quota, int(daily_quota * share) + slack(daily_quota))


def per_second_ceiling(daily_quota: int) -> int:
    """The most lookups in any one second."""
    return max(1, round(daily_quota / DAY_SECONDS * BURST_FACTOR))
