"""What the scheduler learns from recorded history, kept in PostgreSQL and shared by workers.

`relearn` fits the scheduler's model from the stays that the recorded status history shows,
summarised in SQL so that only counts and a bounded sample of stays reach Python, and each
account's push coverage (`worker.scheduling.coverage`: the share of transitions the carrier's
push reported first, and how late), from the `source` of its status rows;
`update_prices` adapts each key's lookup price so that the polls planned fit its daily quota.
`PlanCache` gives every worker process the current model and prices without a query per poll.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from worker.domain.models import SchedulerState, Shipment
from worker.domain.vocabulary import Status, parse_status
from worker.scheduling.coverage import LEARNING_WINDOW, NOT_FOUND, push_coverage
from worker.scheduling.model import (
    MAX_STAYS_FOR_QUIET_HOURS,
    LearnedModel,
    Stay,
    StayStatistics,
    fit_statistics,
)
from worker.scheduling.pricing import INITIAL_PRICE, PriceController

MODEL_STATE = "model"
# Stays that began within LEARNING_WINDOW are fitted, ended or not (censored): an unbiased sample.
# How long a worker process trusts its copy of the model and prices.
CACHE_SECONDS = 60.0


def _price_state(account_id: int) -> str:
    return f"price:{account_id}"


def _save(session: Session, name: str, data: dict[str, Any], now: datetime) -> None:
    session.execute(
        insert(SchedulerState)
        .values(name=name, data=data, updated_at=now)
        .on_conflict_do_update(index_elements=["name"], set_={"data": data, "updated_at": now})
    )


def _load(session: Session, name: str) -> dict[str, Any] | None:
    return session.scalar(select(SchedulerState.data).where(SchedulerState.name == name))


# The stays that began since a moment, as `recorded_stays` defines them, summarised in SQL:
# per status (NULL: not yet known to the carrier), the count of each next status, and every
# stride-th stay in order of entry (stride as `sample_stride`), censored at the last poll.
_STAY_STATISTICS = """
    WITH stays AS MATERIALIZED (
        SELECT e.shipment_id,
               e.status,
               e.occurred_at AS entered_at,
               lead(e.occurred_at) OVER w AS exited_at,
               lead(e.status) OVER w AS next_status,
               NULL::timestamptz AS observed_at
        FROM status_events e
        WHERE e.occurred_at >= :since
        WINDOW w AS (PARTITION BY e.shipment_id ORDER BY e.occurred_at, e.id)
        UNION ALL
        SELECT s.id, NULL, s.registered_at, s.found_at,
               (SELECT e.status FROM status_events e WHERE e.shipment_id = s.id
                ORDER BY e.occurred_at, e.id LIMIT 1),
               CASE WHEN s.found_at IS NULL THEN coalesce(s.last_polled_at, s.registered_at) END
        FROM shipments s
        WHERE s.registered_at >= :since AND (s.found_at IS NOT NULL OR s.active)
    ),
    fitted AS (
        SELECT * FROM stays WHERE status IS NULL OR status = ANY(:open_statuses)
    ),
    ranked AS (
        SELECT f.*,
               row_number() OVER (PARTITION BY f.status ORDER BY f.entered_at, f.shipment_id)
                   AS rank,
               count(*) OVER (PARTITION BY f.status) AS total
        FROM fitted f
    )
    SELECT false AS sampled, status, next_status, count(*) AS number,
           NULL::timestamptz, NULL::timestamptz, NULL::timestamptz
    FROM fitted
    GROUP BY status, next_status
    UNION ALL
    SELECT true, r.status, r.next_status, r.rank, r.entered_at, r.exited_at,
           CASE WHEN r.exited_at IS NULL
                THEN greatest(coalesce(r.observed_at, s.last_polled_at), r.entered_at) END
    FROM ranked r JOIN shipments s ON s.id = r.shipment_id
    WHERE (r.rank - 1) % ((r.total + :most - 1) / :most) = 0
"""


def stay_statistics(session: Session, since: datetime) -> dict[str, StayStatistics]:
    """The statistics `fit_statistics` needs of the stays that began after `since`.

    The same as `summarise_stays(recorded_stays(...))`, computed in the database: only the
    counts and a few thousand sampled stays per status reach Python, however long the history.
    """
    open_statuses = [s.value for s in Status if not s.terminal]
    rows = session.execute(
        text(_STAY_STATISTICS),
        {"since": since, "open_statuses": open_statuses, "most": MAX_STAYS_FOR_QUIET_HOURS},
    )
    counts: dict[str, int] = {}
    next_counts: dict[str, dict[str, int]] = {}
    samples: dict[str, list[tuple[int, Stay]]] = {}
    for sampled, status_name, next_name, number, entered, exited, observed in rows:
        status = parse_status(status_name)
        key = NOT_FOUND if status is None else status.value
        following = parse_status(next_name)
        if sampled:
            stay = Stay(status, entered, exited, observed, following)
            samples.setdefault(key, []).append((int(number), stay))
            continue
        counts[key] = counts.get(key, 0) + int(number)
        followers = next_counts.setdefault(key, {})
        if following is not None:
            followers[following.value] = followers.get(following.value, 0) + int(number)
    return {
        key: StayStatistics(
            count, next_counts[key], [stay for _, stay in sorted(samples[key], key=lambda r: r[0])]
        )
        for key, count in counts.items()
    }


def recorded_stays(session: Session, since: datetime) -> list[Stay]:
    """Every stay in a status that began after `since`, from the recorded status history.

    A stay ends when the next recorded status begins; the current one is censored at the
    shipment's last poll, or at its entry when a push reported it after that poll. The wait
    before the carrier first knew an order is a stay too (status None), ended at the first poll
    that found it. Stays come in order of entry (then of shipment), the order `stay_statistics`
    samples in. This reads every stay into Python: it is the definition `stay_statistics` is
    checked against, not for a periodic task.
    """
    rows = session.execute(
        text(
            """
            SELECT e.status,
                   e.occurred_at,
                   lead(e.occurred_at) OVER w AS exited_at,
                   lead(e.status) OVER w AS next_status,
                   s.last_polled_at
            FROM status_events e JOIN shipments s ON s.id = e.shipment_id
            WHERE e.occurred_at >= :since
            WINDOW w AS (PARTITION BY e.shipment_id ORDER BY e.occurred_at, e.id)
            ORDER BY e.occurred_at, e.shipment_id
            """
        ),
        {"since": since},
    )
    stays = []
    for status_name, entered, exited, next_name, polled in rows:
        status = parse_status(status_name)
        if status is None or status.terminal:
            continue
        following = parse_status(next_name) if next_name is not None else None
        censored = None if exited else max(polled, entered) if polled else entered
        stays.append(Stay(status, entered, exited, censored, following))
    unknown = session.execute(
        text(
            """
            SELECT s.registered_at, s.found_at, s.last_polled_at,
                   (SELECT e.status FROM status_events e WHERE e.shipment_id = s.id
                    ORDER BY e.occurred_at, e.id LIMIT 1) AS first_status
            FROM shipments s
            WHERE s.registered_at >= :since AND (s.found_at IS NOT NULL OR s.active)
            ORDER BY s.registered_at, s.id
            """
        ),
        {"since": since},
    )
    for registered, found, polled, first_name in unknown:
        first = parse_status(first_name) if first_name is not None else None
        stays.append(Stay(None, registered, found, None if found else polled or registered, first))
    return stays


def relearn(session: Session, timezone: str, now: datetime) -> LearnedModel:
    """Fit the model and every account's push coverage from recent history, and store them
    for every worker."""
    stored = _load(session, MODEL_STATE)
    previous = LearnedModel.from_json(stored) if stored else None
    since = now - LEARNING_WINDOW
    model = fit_statistics(stay_statistics(session, since), timezone, previous)
    pushes = {
        account: coverage
        for account, coverage in push_coverage(session, since).items()
        if account is not None
    }
    model = replace(model, pushes=pushes)
    _save(session, MODEL_STATE, model.to_json(), now)
    return model


# Above this many shipments the price update reads a sample of the table's pages, not all.
PRICE_SAMPLE_ROWS = 200_000


def planned_rates(session: Session) -> tuple[dict[int, float], dict[int, int]]:
    """Each account's planned lookups per day and open shipments, read or estimated.

    A shipment plans one lookup per interval between its last poll and its next. Up to
    `PRICE_SAMPLE_ROWS` rows are all read; beyond that a block sample of about that many
    rows is scaled up by the table's row estimate over the rows sampled, so the update costs
    the same at ten million shipments as at two hundred thousand. Its error, about one over
    the square root of an account's sampled shipments, is well within what the price's
    controller corrects minute by minute.
    """
    estimate = float(
        session.scalar(text("SELECT reltuples FROM pg_class WHERE oid = 'shipments'::regclass"))
        or 0
    )
    percent = 100.0 if estimate <= PRICE_SAMPLE_ROWS else 100.0 * PRICE_SAMPLE_ROWS / estimate
    rows = session.execute(
        text(
            """
            SELECT account_id,
                   coalesce(sum(86400.0 / greatest(
                       extract(epoch FROM next_poll_at - last_polled_at), 1
                   )) FILTER (WHERE active AND last_polled_at IS NOT NULL), 0),
                   count(*) FILTER (WHERE active),
                   count(*)
            FROM shipments TABLESAMPLE SYSTEM (:percent)
            GROUP BY account_id
            """
        ),
        {"percent": percent},
    ).all()
    sampled = sum(int(row[3]) for row in rows)
    scale = 1.0 if percent >= 100.0 or not sampled else estimate / sampled
    planned = {account_id: float(rate) * scale for account_id, rate, _, _ in rows}
    open_shipments = {account_id: round(int(count) * scale) for account_id, _, count, _ in rows}
    return planned, open_shipments


def update_prices(
    session: Session, quotas: dict[int, int], timezone: str, now: datetime
) -> dict[int, float]:
    """Steer each account's price so the polls its shipments ask for fit its daily quota."""
    planned, open_shipments = planned_rates(session)
    prices = {}
    for account_id, quota in quotas.items():
        stored = _load(session, _price_state(account_id))
        controller = (
            PriceController.from_json(stored)
            if stored
            else PriceController(daily_quota=quota, timezone=timezone)
        )
        controller.daily_quota = quota
        controller.open_shipments = open_shipments.get(account_id, 0)
        since = (
            datetime.fromtimestamp(controller.observed_at, now.tzinfo)
            if controller.observed_at is not None
            else now
        )
        registered = session.scalar(
            select(func.count()).where(
                Shipment.account_id == account_id, Shipment.registered_at > since
            )
        )
        prices[account_id] = controller.observe(
            now, float(planned.get(account_id, 0.0)), int(registered or 0)
        )
        _save(session, _price_state(account_id), controller.to_json(), now)
    return prices


@dataclass
class PlanCache:
    """A process's copy of the model and prices, refreshed at most once a minute."""

    timezone: str
    model: LearnedModel | None = None
    stored: dict[str, Any] | None = None
    controllers: dict[int, PriceController] = field(default_factory=dict)
    loaded_at: float = float("-inf")

    def current(self, session: Session) -> LearnedModel:
        if self.model is None or time.monotonic() - self.loaded_at > CACHE_SECONDS:
            stored = _load(session, MODEL_STATE)
            if self.model is None or stored != self.stored:
                # A new model only when it changed: the plans solved for this one are kept.
                self.model = (
                    LearnedModel.from_json(stored) if stored else LearnedModel(self.timezone)
                )
                self.stored = stored
            rows = session.execute(
                select(SchedulerState.name, SchedulerState.data).where(
                    SchedulerState.name.like("price:%")
                )
            )
            self.controllers = {
                int(name.split(":")[1]): PriceController.from_json(data) for name, data in rows
            }
            self.loaded_at = time.monotonic()
        return self.model

    def price(self, account_id: int) -> float:
        """The account's current price of a lookup."""
        controller = self.controllers.get(account_id)
        return INITIAL_PRICE if controller is None else controller.price

    def max_interval(self, account_id: int, setting: timedelta) -> timedelta:
        """The account's ceiling on a wait: `setting`, stretched when its quota cannot afford it."""
        controller = self.controllers.get(account_id)
        return setting if controller is None else controller.max_interval(setting)
