"""Pauses: the moment that stands for "until someone acts", and what ops hear when one begins.

An account whose key the carrier refuses stays paused until its key is fixed; the deliveries of
a disabled endpoint are held until it is enabled. Both wait for a person, not for a time, and
people are told so in words, never shown a placeholder date.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

# The earlier of the two placeholder dates once written (9999-01-01 and 9999-12-31), so rows
# holding either compare as forever.
FOREVER = datetime(9999, 1, 1, tzinfo=UTC)


def until_words(moment: datetime) -> str:
    """When a pause ends, for people: "fixed" for one that waits for someone, else the time."""
    return "fixed" if moment >= FOREVER else f"{moment:%Y-%m-%d %H:%M %Z}".rstrip()


@dataclass(frozen=True)
class Alert:
    """What an account's ops contact must hear when its polling pauses, sent after commit."""

    account_name: str
    ops_email: str | None
    paused_until: datetime
    body: str
    # Lookups made on the carrier day the key was refused, where the refusal was about quota.
    spent_today: int | None = None

    @property
    def subject(self) -> str:
        return f"shipmon: polling paused for account {self.account_name}"
