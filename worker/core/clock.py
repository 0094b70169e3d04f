"""The one clock: every piece of core logic that needs the time is given a `Clock`.

A clock is a plain callable returning an aware UTC datetime, so production passes `utcnow`,
and tests, the simulator and the benchmarks pass their own (simulated, frozen, skewed) clocks
to the very same code.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]
"""Returns the current moment as an aware UTC datetime."""

DAY_SECONDS = 86_400
"""Seconds in a day of 24 hours (a carrier day of 23 or 25 hours is measured, not assumed)."""


def utcnow() -> datetime:
    """The wall clock, in UTC."""
    return datetime.now(UTC)


def iso_utc(moment: datetime | None) -> str | None:
    """`moment` as ISO-8601 in UTC, as every document and event shows times; None stays None."""
    return moment.astimezone(UTC).isoformat() if moment is not None else None
