"""Replays: webhooks sent once more, on an operator's word, with their original webhook-id.

A receiver that lost events, or was down for longer than the retries last, gets them again
(`shipmon webhooks replay`). Each resend is one attempt, recorded like any other; one that gets
through completes its delivery and lets the rest of its line go, one that fails changes nothing
about the delivery's schedule.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, insert, or_, select
from sqlalchemy.orm import Session

from worker.core.config import Settings
from worker.domain.deliveries import DeliveryState
from worker.domain.models import Delivery, DeliveryAttempt, OutboxEvent, WebhookEndpoint
from worker.notify.delivery import (
    DEFAULT_CONCURRENCY,
    NO_KEY_UPDATE,
    Claim,
    SessionFactory,
    Webhook,
    attempt_row,
    clock_of,
    send,
    webhook_claim,
)
from worker.notify.outbox import release_followers
from worker.notify.webhooks.guard import Resolver, system_resolver
from worker.notify.webhooks.sender import AttemptResult, WebhookSender

__all__ = ["ReplayOutcome", "replay"]


@dataclass(frozen=True)
class ReplayOutcome:
    """One resend of an event to one endpoint."""

    delivery_id: int
    event_id: str
    endpoint_id: int
    url: str
    result: AttemptResult


def _replay_claims(
    session: Session,
    secret_key: str,
    now: datetime,
    event_id: str | None,
    failed_since: datetime | None,
    endpoint_id: int | None,
) -> list[tuple[Claim, int]]:
    query = (
        select(Delivery)
        .join(WebhookEndpoint, WebhookEndpoint.id == Delivery.endpoint_id)
        .where(WebhookEndpoint.enabled)
    )
    if event_id is not None:
        query = query.join(OutboxEvent, OutboxEvent.id == Delivery.event_id).where(
            OutboxEvent.event_id == event_id
        )
    if failed_since is not None:
        failed = exists().where(
            DeliveryAttempt.delivery_id == Delivery.id,
            DeliveryAttempt.attempted_at >= failed_since,
            or_(
                DeliveryAttempt.status_code.is_(None),
                DeliveryAttempt.status_code < 200,
                DeliveryAttempt.status_code >= 300,
            ),
        )
        query = query.where(Delivery.state != DeliveryState.SUCCEEDED, failed)
    if endpoint_id is not None:
        query = query.where(Delivery.endpoint_id == endpoint_id)
    deliveries = session.scalars(query.order_by(Delivery.shipment_id, Delivery.sequence)).all()
    events = {
        e.id: e
        for e in session.scalars(
            select(OutboxEvent).where(OutboxEvent.id.in_({d.event_id for d in deliveries}))
        )
    }
    return [
        (webhook_claim(d, events[d.event_id], session, secret_key, now), d.shipment_id)
        for d in deliveries
    ]


def _record_replay(
    session_factory: SessionFactory, claim: Claim, result: AttemptResult, at: datetime
) -> None:
    with session_factory.begin() as session:
        # The same lock order as recording a due attempt (`worker.notify.delivery`).
        delivery = session.get(Delivery, claim.delivery_id, with_for_update=NO_KEY_UPDATE)
        if delivery is None:
            return
        session.execute(insert(DeliveryAttempt).values(attempt_row(claim.delivery_id, at, result)))
        # A replay that gets through completes the delivery; one that fails changes nothing
        # about its schedule.
        if not result.succeeded or delivery.state == DeliveryState.SUCCEEDED:
            return
        was_pending = delivery.state == DeliveryState.PENDING
        delivery.state = DeliveryState.SUCCEEDED
        delivery.completed_at = delivery.last_attempt_at = at
        if was_pending:
            release_followers(session, delivery, at)


def replay(
    session_factory: SessionFactory,
    settings: Settings,
    *,
    secret_key: str,
    event_id: str | None = None,
    failed_since: datetime | None = None,
    endpoint_id: int | None = None,
    now: datetime | None = None,
    resolver: Resolver = system_resolver,
) -> list[ReplayOutcome]:
    """Send webhooks once more, with their original webhook-id, one attempt each.

    Chooses the deliveries of one event (`event_id`, the public id), or those that failed at or
    after `failed_since` and have not succeeded since, optionally of one endpoint. Disabled
    endpoints are left out. Every resend is recorded as an attempt.
    """
    if event_id is None and failed_since is None:
        raise ValueError("replay needs an event id or a time to replay failures since")
    clock = clock_of(now)
    with session_factory.begin() as session:
        claims = _replay_claims(session, secret_key, clock(), event_id, failed_since, endpoint_id)

    # Per shipment and endpoint, resends go one after the other, oldest event first.
    lines: dict[tuple[int, int], list[tuple[Claim, Webhook]]] = {}
    for claim, shipment_id in claims:
        assert isinstance(claim.destination, Webhook)  # replays are webhooks only
        key = (claim.destination.endpoint_id, shipment_id)
        lines.setdefault(key, []).append((claim, claim.destination))

    async def run() -> list[ReplayOutcome]:
        gate = asyncio.Semaphore(DEFAULT_CONCURRENCY)
        async with WebhookSender(
            allow_private=settings.webhook_allow_private, resolver=resolver
        ) as sender:

            async def resend(line: list[tuple[Claim, Webhook]]) -> list[ReplayOutcome]:
                outcomes = []
                async with gate:
                    for claim, webhook in line:
                        at = clock()
                        result = await send(claim, settings, sender)
                        await asyncio.to_thread(_record_replay, session_factory, claim, result, at)
                        outcomes.append(
                            ReplayOutcome(
                                claim.delivery_id,
                                claim.event_id,
                                webhook.endpoint_id,
                                webhook.url,
                                result,
                            )
                        )
                return outcomes

            done = await asyncio.gather(*(resend(line) for line in lines.values()))
            return [outcome for line in done for outcome in line]

    return asyncio.run(run())
