"""The dispatcher's heartbeat: whether anything is polling, for `shipmon show` and `stats`.

Every dispatch tick (every few seconds while the beat and a worker run) writes its time to
Redis. A shipment that is "due now" with no recent tick will stay due: the ops views say so,
and what to start, instead of showing a next-poll time in the past as if it were planned.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import redis

HEARTBEAT_KEY = "shipmon:dispatch:last_tick"
# The beat dispatches every few seconds; a minute without a tick means nothing is running.
SILENT_AFTER = timedelta(minutes=1)
# The key outlives the silence it reports, and a stopped system does not leave it forever.
KEPT_FOR = timedelta(days=7)
# An ISO-8601 time is 32 characters at most; anything longer was not written by a tick.
MAX_VALUE_LENGTH = 64


def record_tick(client: redis.Redis[Any], at: datetime) -> None:
    """Note that the dispatcher ran at `at`."""
    client.set(HEARTBEAT_KEY, at.isoformat(), ex=KEPT_FOR)


def last_tick(client: redis.Redis[Any]) -> datetime | None:
    """When the dispatcher last ran, or None if it never did (or the key holds no time)."""
    value = client.get(HEARTBEAT_KEY)
    if not isinstance(value, bytes | str) or len(value) > MAX_VALUE_LENGTH:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def silence(last: datetime | None, now: datetime) -> str | None:
    """What to tell the user when nothing is polling, or None when the dispatcher is alive."""
    start = "start it with `shipmon run` (or `celery -A worker beat` and `celery -A worker worker`)"
    if last is None:
        return f"nothing is polling: no dispatcher has run yet; {start}"
    if now - last <= SILENT_AFTER:
        return None
    minutes = (now - last).total_seconds() / 60
    return (
        f"nothing is polling: the dispatcher last ran {minutes:,.0f} min ago "
        f"({last:%Y-%m-%d %H:%M} UTC); {start}"
    )
