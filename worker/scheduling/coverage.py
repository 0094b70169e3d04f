"""How much of each account's change the carrier's pushes report, from recorded history.

`PushCoverage` says, per account and status left, what share of transitions a push reported
first and how late; the scheduler's plan (worker.scheduling.model) counts only the rest as
waiting for a lookup, and `shipmon quota` and `stats` show it. Kept apart from the model so
that those views read it without loading the planner and numpy.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from worker.domain.models import Account

# Stays before the carrier knows an order are modelled like a status under this name.
NOT_FOUND = "NOT_FOUND"
# How far back the scheduler learns: the stays it fits and the pushes it counts.
LEARNING_WINDOW = timedelta(days=4)
# A push share is planned per status left once this many of its transitions were seen, else the
# account's share once the account has seen this many; with fewer, lookups plan as without pushes.
MIN_TRANSITIONS_FOR_PUSH_SHARE = 50
# Planned push shares and delays are rounded to these steps, so that a relearned coverage solves
# a new plan only when it changed enough to matter.
PUSH_SHARE_STEP = 0.05
PUSH_DELAY_STEP_SECONDS = 5.0
# A push reported longer than this after its transition counts as this late (a carrier resending
# old changes must not make every push look slow).
LONGEST_PUSH_DELAY_SECONDS = 86_400.0


@dataclass(frozen=True)
class PushCounts:
    """Transitions out of one status (or all of them): how many, how many a push reported first,
    and the mean and median delay of those pushes (seen minus happened, in seconds)."""

    transitions: int
    pushed: int = 0
    mean_delay_s: float = 0.0
    median_delay_s: float | None = None

    @property
    def share(self) -> float:
        """The share of transitions a push reported first."""
        return self.pushed / self.transitions if self.transitions else 0.0


# A push term of the plan: (status key, planned push share, planned push delay in seconds).
PushTerm = tuple[str, float, float]


@dataclass(frozen=True)
class PushCoverage:
    """How much of one account's change the carrier's pushes report, from recorded history."""

    overall: PushCounts = PushCounts(0)
    # By the status left (NOT_FOUND for an order's first status), sorted by key.
    by_status: tuple[tuple[str, PushCounts], ...] = ()

    def terms(self, keys: Iterable[str]) -> tuple[PushTerm, ...]:
        """The push share and delay the plan counts for each status key, where not zero.

        A status's own share where enough of its transitions were seen, else the account's;
        rounded to steps, so nearby coverages share one plan.
        """
        own = dict(self.by_status)
        terms = []
        for key in sorted(keys):
            counts = own.get(key)
            if counts is None or counts.transitions < MIN_TRANSITIONS_FOR_PUSH_SHARE:
                counts = self.overall
            if counts.transitions < MIN_TRANSITIONS_FOR_PUSH_SHARE:
                continue
            share = round(round(counts.share / PUSH_SHARE_STEP) * PUSH_SHARE_STEP, 6)
            if share <= 0.0:
                continue
            delay = round(counts.mean_delay_s / PUSH_DELAY_STEP_SECONDS) * PUSH_DELAY_STEP_SECONDS
            terms.append((key, min(share, 1.0), delay))
        return tuple(terms)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form, stored with the model and shown by `shipmon quota` and `stats`."""

        def of(counts: PushCounts) -> dict[str, Any]:
            return {
                "transitions": counts.transitions,
                "pushed": counts.pushed,
                "share": round(counts.share, 4),
                "mean_delay_s": round(counts.mean_delay_s, 1),
                "median_delay_s": (
                    None if counts.median_delay_s is None else round(counts.median_delay_s, 1)
                ),
            }

        return of(self.overall) | {"by_status": {key: of(c) for key, c in self.by_status}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PushCoverage:
        """The coverage `to_json` described."""

        def of(d: Mapping[str, Any]) -> PushCounts:
            median = d["median_delay_s"]
            return PushCounts(
                int(d["transitions"]),
                int(d["pushed"]),
                float(d["mean_delay_s"]),
                None if median is None else float(median),
            )

        by_status = tuple(sorted((key, of(c)) for key, c in data["by_status"].items()))
        return cls(of(data), by_status)


NO_PUSHES = PushCoverage()


def summarise_transitions(transitions: Iterable[tuple[str, float | None]]) -> PushCoverage:
    """The coverage of transitions given as (status key left, push delay or None if polled).

    The simulator's counterpart of `learning.push_coverage`, which counts the same in SQL.
    """
    delays: dict[str, list[float]] = {}
    totals: dict[str, int] = {}
    for key, delay in transitions:
        totals[key] = totals.get(key, 0) + 1
        group = delays.setdefault(key, [])
        if delay is not None:
            group.append(min(max(delay, 0.0), LONGEST_PUSH_DELAY_SECONDS))

    def counts(total: int, pushed: list[float]) -> PushCounts:
        if not pushed:
            return PushCounts(total)
        return PushCounts(total, len(pushed), statistics.fmean(pushed), statistics.median(pushed))

    every = [d for group in delays.values() for d in group]
    return PushCoverage(
        counts(sum(totals.values()), every),
        tuple(sorted((key, counts(total, delays[key])) for key, total in totals.items())),
    )


# The transitions that happened since a moment, by account and status left (NOT_FOUND for an
# order's first status), then by account, then over all: how many, how many a push reported
# first, and the mean and median delay of those pushes, bounded to [0, :longest] seconds.
_PUSH_COUNTS = """
    WITH transitions AS (
        SELECT s.account_id,
               e.occurred_at,
               e.source = 'push' AS pushed,
               least(greatest(extract(epoch FROM e.seen_at - e.occurred_at), 0), :longest)
                   AS delay,
               coalesce(lag(e.status) OVER w, :not_found) AS exited
        FROM status_events e JOIN shipments s ON s.id = e.shipment_id
        WHERE e.shipment_id IN (SELECT shipment_id FROM status_events WHERE occurred_at >= :since)
        WINDOW w AS (PARTITION BY e.shipment_id ORDER BY e.occurred_at, e.id)
    )
    SELECT account_id, exited, grouping(account_id) = 1 AS everyone, count(*),
           count(*) FILTER (WHERE pushed),
           coalesce(avg(delay) FILTER (WHERE pushed), 0),
           percentile_cont(0.5) WITHIN GROUP (ORDER BY delay) FILTER (WHERE pushed)
    FROM transitions
    WHERE occurred_at >= :since
    GROUP BY GROUPING SETS ((account_id, exited), (account_id), ())
"""


def push_coverage(session: Session, since: datetime) -> dict[int | None, PushCoverage]:
    """Each account's push coverage of the transitions since `since` (None: all accounts).

    The same as `summarise_transitions` over the recorded history, computed in the database.
    An account with no transitions since then is left out.
    """
    rows = session.execute(
        text(_PUSH_COUNTS),
        {"since": since, "longest": LONGEST_PUSH_DELAY_SECONDS, "not_found": NOT_FOUND},
    )
    overall: dict[int | None, PushCounts] = {}
    by_status: dict[int | None, list[tuple[str, PushCounts]]] = {}
    for account_id, exited, everyone, number, pushed, mean, median in rows:
        counts = PushCounts(
            int(number), int(pushed), float(mean), None if median is None else float(median)
        )
        account = None if everyone else int(account_id)
        if everyone or exited is None:
            overall[account] = counts
        else:
            by_status.setdefault(account, []).append((str(exited), counts))
    return {
        account: PushCoverage(counts, tuple(sorted(by_status.get(account, []))))
        for account, counts in overall.items()
    }


def account_coverage(session: Session, now: datetime) -> list[tuple[str | None, PushCoverage]]:
    """Each account's push coverage over the learning window, by name; then all accounts' (None).

    Accounts with no transitions in the window are listed with no coverage.
    """
    learned = push_coverage(session, now - LEARNING_WINDOW)
    accounts = session.execute(select(Account.id, Account.name).order_by(Account.name))
    named: list[tuple[str | None, PushCoverage]] = [
        (name, learned.get(account_id, NO_PUSHES)) for account_id, name in accounts
    ]
    return [*named, (None, learned.get(None, NO_PUSHES))]
