"""Where a delivery stands: the states a `Delivery` row moves through, named once.

The database holds them as plain strings (the `known_state` constraint is generated from this
enum), so every query, view and command compares against these members, never a literal.
"""

from __future__ import annotations

from enum import StrEnum


class DeliveryState(StrEnum):
    """A delivery's state: waiting its turn or retrying, or one of three ends."""

    # Due at `next_attempt_at`: never tried yet, retrying, or waiting behind an earlier one.
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    # Every retry failed; kept for a replay once the receiver works again.
    DEAD = "dead"
    # An email delivery made while email is off: never sent, so that none piles up.
    SKIPPED = "skipped"
