"""Deliveries sent when due: claimed under a lease, sent, and each attempt recorded.

Everything about a delivery's future lives in PostgreSQL, so a worker may die at any moment:

- A delivery is claimed by pushing its `next_attempt_at` a lease ahead, in a transaction that
  commits before anything is sent. If the worker dies mid-send, the claim simply comes due
  again when the lease runs out, and another worker sends it: at least once, never lost.
- No transaction is open while a webhook or an email is on its way.
- Only the head of a shipment's line to a destination is claimed (`worker.notify.outbox` keeps
  the lines); an endpoint gets a bounded share of the attempts in flight, and one that stops
  answering rests behind an open circuit, or is disabled, with its ops people told.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from worker.core import metrics
from worker.core.clock import Clock, utcnow
from worker.core.config import Settings, mask_url
from worker.domain.deliveries import DeliveryState
from worker.domain.models import (
    Account,
    Delivery,
    DeliveryAttempt,
    EmailRecipient,
    OutboxEvent,
    Shipment,
    TrackingEvent,
    WebhookEndpoint,
)
from worker.notify.mail import EventEmail, MailError, event_email, event_message, send_message
from worker.notify.mail import send_ops_alert as send_alert_mail
from worker.notify.outbox import fan_out, hold_followers, release_followers
from worker.notify.webhooks.endpoints import DISABLE_AFTER, set_endpoint_enabled
from worker.notify.webhooks.sender import (
    ERROR_LIMIT,
    AttemptResult,
    WebhookSender,
    clean_text,
    describe_error,
    retry_delay,
)
from worker.notify.webhooks.signing import event_body, signing_secrets

__all__ = [
    "CIRCUIT_AFTER",
    "CIRCUIT_REST",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_LEASE",
    "DEFAULT_LIMIT",
    "ENDPOINT_IN_FLIGHT",
    "deliver_due",
    "fan_out_and_deliver",
]

log = logging.getLogger(__name__)

SessionFactory = sessionmaker[Session]

# Longer than the slowest attempt (15 s for a webhook or an email) plus recording it, so a live
# worker's claim never runs out under it.
DEFAULT_LEASE = timedelta(seconds=60)
# Attempts one call makes at most; the sweep picks up the rest.
DEFAULT_LIMIT = 1000
# Attempts in flight at once.
DEFAULT_CONCURRENCY = 32
# Attempts in flight at once to one endpoint, over every worker: a receiver that tarpits holds
# this many slots and no more.
ENDPOINT_IN_FLIGHT = 8
# Attempts in a row that end with no answer (timeout, reset, refused) before the endpoint rests
# for CIRCUIT_REST; its deliveries wait, their attempts uncounted, and then one goes first.
CIRCUIT_AFTER = 5
CIRCUIT_REST = timedelta(minutes=1)
# How many due deliveries a claim looks at for each one it wants: some endpoints have room for
# fewer than they have waiting, and the rest of the slots go to those further down the line.
CANDIDATES_PER_CLAIM = 4
# The latest scans an event email lists.
SCANS_IN_EMAIL = 5
# How a delivery or an endpoint is locked to change it: FOR NO KEY UPDATE, which a fan-out
# inserting deliveries (KEY SHARE on their endpoint, by the foreign key) never waits for.
NO_KEY_UPDATE: dict[str, Any] = {"key_share": True}


def clock_of(now: datetime | None) -> Clock:
    """A clock stopped at `now`, for tests and simulations, or the wall clock when it is None."""
    return utcnow if now is None else (lambda: now)


# --- Claiming --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Webhook:
    """Where a claimed webhook goes, and what it says."""

    endpoint_id: int
    url: str
    secrets: list[str]
    # The event's body: the same bytes on every attempt.
    body: bytes


@dataclass(frozen=True)
class _Email:
    address: str
    content: EventEmail
    message_id: str


@dataclass(frozen=True)
class Claim:
    """A delivery this worker holds until its lease runs out, with all it needs to send it."""

    delivery_id: int
    # The delivery's attempt count after this claim: the claim's token, see `_record`.
    attempts: int
    event_id: str
    destination: Webhook | _Email


def _is_head(now: datetime) -> Any:
    """True for a delivery that is next in line for its shipment and destination.

    An endpoint whose circuit is open has no delivery next in line until it closes.
    """
    earlier = aliased(Delivery)
    earlier_pending = exists().where(
        earlier.shipment_id == Delivery.shipment_id,
        earlier.sequence < Delivery.sequence,
        earlier.state == DeliveryState.PENDING,
        earlier.endpoint_id.is_not_distinct_from(Delivery.endpoint_id),
        earlier.recipient_id.is_not_distinct_from(Delivery.recipient_id),
    )
    # An earlier event whose fan-out has not happened yet has no delivery row to wait for.
    earlier_unfanned = exists().where(
        OutboxEvent.shipment_id == Delivery.shipment_id,
        OutboxEvent.sequence < Delivery.sequence,
        OutboxEvent.fanned_out_at.is_(None),
    )
    destination_enabled = or_(
        exists().where(
            WebhookEndpoint.id == Delivery.endpoint_id,
            WebhookEndpoint.enabled,
            or_(
                WebhookEndpoint.circuit_open_until.is_(None),
                WebhookEndpoint.circuit_open_until <= now,
            ),
        ),
        exists().where(EmailRecipient.id == Delivery.recipient_id, EmailRecipient.enabled),
    )
    return and_(~earlier_pending, ~earlier_unfanned, destination_enabled)


def _claim(
    session_factory: SessionFactory,
    settings: Settings,
    secret_key: str,
    count: int,
    now: datetime,
    lease: timedelta,
) -> tuple[list[Claim], int]:
    """Claim up to `count` due deliveries; returns those to send, and how many were claimed.

    No endpoint gets more than its share of attempts in flight, counted over every worker, so
    one that is slow to answer holds a few slots, never all of them.
    """
    with session_factory.begin() as session:
        in_flight = (
            select(Delivery.endpoint_id, func.count().label("attempts"))
            .where(Delivery.leased_until > now, Delivery.endpoint_id.is_not(None))
            .group_by(Delivery.endpoint_id)
            .subquery()
        )
        # Right after its circuit closes, an endpoint gets one attempt to show it answers.
        cap = case((WebhookEndpoint.unanswered >= CIRCUIT_AFTER, 1), else_=ENDPOINT_IN_FLIGHT)
        full = (
            select(in_flight.c.endpoint_id)
            .join(WebhookEndpoint, WebhookEndpoint.id == in_flight.c.endpoint_id)
            .where(in_flight.c.attempts >= cap)
        )
        # The most overdue deliveries next in line, of destinations with room. The limit lets
        # the scan stop early however many are due; materialized, it runs once.
        candidates = (
            select(Delivery.id, Delivery.endpoint_id, Delivery.next_attempt_at)
            .where(
                Delivery.state == DeliveryState.PENDING,
                Delivery.next_attempt_at <= now,
                or_(Delivery.endpoint_id.is_(None), Delivery.endpoint_id.not_in(full)),
                _is_head(now),
            )
            .order_by(Delivery.next_attempt_at)
            .limit(count * CANDIDATES_PER_CLAIM)
            .cte("candidates")
            .prefix_with("MATERIALIZED")
        )
        ranked = (
            select(
                candidates.c.id,
                candidates.c.endpoint_id,
                func.row_number()
                .over(
                    partition_by=candidates.c.endpoint_id,
                    order_by=(candidates.c.next_attempt_at, candidates.c.id),
                )
                .label("rank"),
            )
        ).subquery()
        allowed = (
            select(ranked.c.id)
            .outerjoin(WebhookEndpoint, WebhookEndpoint.id == ranked.c.endpoint_id)
            .outerjoin(in_flight, in_flight.c.endpoint_id == ranked.c.endpoint_id)
            .where(
                or_(
                    ranked.c.endpoint_id.is_(None),
                    ranked.c.rank <= cap - func.coalesce(in_flight.c.attempts, 0),
                )
            )
            .cte("allowed")
            .prefix_with("MATERIALIZED")
        )
        # SKIP LOCKED: deliveries another worker is claiming right now are its own; wait for none.
        # Claims running at once may each see the same attempts in flight: the cap holds per
        # claim, and overall to within the number of workers claiming at that moment.
        due = (
            select(Delivery.id)
            .where(
                Delivery.id.in_(select(allowed.c.id)),
                Delivery.state == DeliveryState.PENDING,
                Delivery.next_attempt_at <= now,
            )
            .order_by(Delivery.next_attempt_at)
            .limit(count)
            .with_for_update(skip_locked=True, of=Delivery, key_share=True)
        )
        deliveries = session.scalars(
            update(Delivery)
            .where(Delivery.id.in_(due.scalar_subquery()))
            .values(
                next_attempt_at=now + lease,
                leased_until=now + lease,
                attempts=Delivery.attempts + 1,
            )
            .returning(Delivery),
            execution_options={"synchronize_session": False},
        ).all()
        if not deliveries:
            return [], 0
        events = {
            e.id: e
            for e in session.scalars(
                select(OutboxEvent).where(OutboxEvent.id.in_({d.event_id for d in deliveries}))
            )
        }
        claims = [
            webhook_claim(d, events[d.event_id], session, secret_key, now)
            for d in deliveries
            if d.endpoint_id is not None
        ]
        emails = [d for d in deliveries if d.recipient_id is not None]
        if emails and settings.smtp_url is None:
            # Email is off: these deliveries will never be sent, and must not pile up.
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_([d.id for d in emails]))
                .values(state=DeliveryState.SKIPPED, completed_at=now, leased_until=None)
            )
        else:
            claims += [_email_claim(d, events[d.event_id], session, settings) for d in emails]
        return claims, len(deliveries)


def webhook_claim(
    delivery: Delivery, event: OutboxEvent, session: Session, secret_key: str, now: datetime
) -> Claim:
    """The claim of a webhook delivery: its body, and the endpoint's secrets valid at `now`."""
    endpoint = session.get_one(WebhookEndpoint, delivery.endpoint_id)
    webhook = Webhook(
        endpoint.id,
        endpoint.url,
        signing_secrets(endpoint, secret_key, now),
        event_body(event.event_id, event.type, event.created_at, event.data),
    )
    return Claim(delivery.id, delivery.attempts, event.event_id, webhook)


def _email_claim(
    delivery: Delivery, event: OutboxEvent, session: Session, settings: Settings
) -> Claim:
    recipient = session.get_one(EmailRecipient, delivery.recipient_id)
    shipment = session.get_one(Shipment, event.shipment_id)
    scans = session.scalars(
        select(TrackingEvent)
        .where(TrackingEvent.shipment_id == shipment.id)
        .order_by(TrackingEvent.occurred_at.desc().nulls_last(), TrackingEvent.id.desc())
        .limit(SCANS_IN_EMAIL)
    ).all()
    domain = settings.email_from.rpartition("@")[2] or "localhost"
    email = _Email(
        recipient.address,
        event_email(event, shipment, scans),
        # The same Message-ID on every attempt lets mail clients drop a duplicate.
        message_id=f"<{event.event_id}.{recipient.id}@{domain}>",
    )
    return Claim(delivery.id, delivery.attempts, event.event_id, email)


# --- Sending ---------------------------------------------------------------------------------


def _send_email(settings: Settings, email: _Email) -> AttemptResult:
    """Render and send one event email (blocking); every failure becomes a result."""
    started = time.perf_counter()

    def elapsed() -> int:
        return round((time.perf_counter() - started) * 1000)

    try:
        message = event_message(settings, email.address, email.content, message_id=email.message_id)
        send_message(settings, message)
    except MailError as error:
        return AttemptResult(False, elapsed(), status_code=error.code, error=str(error))
    except Exception as error:  # a deployment's template may fail in any way Jinja2 can
        log.exception("cannot render the email of event %s", email.content.event_id)
        return AttemptResult(False, elapsed(), error=f"template error: {error}")
    # smtplib raises unless the server accepted the message with 250.
    return AttemptResult(True, elapsed(), status_code=250)


async def send(claim: Claim, settings: Settings, sender: WebhookSender) -> AttemptResult:
    """Make one attempt at a claim's destination; never records it (the caller does)."""
    destination = claim.destination
    if isinstance(destination, Webhook):
        return await sender.send(
            destination.url, destination.secrets, claim.event_id, destination.body
        )
    return await asyncio.to_thread(_send_email, settings, destination)


# --- Recording -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Alert:
    to: str
    subject: str
    body: str


def attempt_row(delivery_id: int, at: datetime, result: AttemptResult) -> dict[str, Any]:
    """The `DeliveryAttempt` row of one attempt's result."""
    return {
        "delivery_id": delivery_id,
        "attempted_at": at,
        "status_code": result.status_code,
        "duration_ms": result.duration_ms,
        # Errors come from receivers, mail servers and templates; any may carry a NUL.
        "error": None if result.error is None else clean_text(result.error, ERROR_LIMIT),
        "response_excerpt": result.response_excerpt,
    }


def _record(
    session_factory: SessionFactory,
    claim: Claim,
    result: AttemptResult,
    attempted_at: datetime,
    now: datetime,
    rng: random.Random | None,
) -> _Alert | None:
    """Store an attempt and decide the delivery's future; returns an alert to send, if any."""
    with session_factory.begin() as session:
        # Locks in one order everywhere, delivery then endpoint, and never stronger than NO KEY
        # UPDATE: a fan-out inserting deliveries holds KEY SHARE on their endpoint (the foreign
        # key) while it waits for this delivery, and FOR UPDATE would wait for it in turn.
        delivery = session.get(Delivery, claim.delivery_id, with_for_update=NO_KEY_UPDATE)
        if delivery is None:
            return None
        session.execute(
            insert(DeliveryAttempt).values(attempt_row(claim.delivery_id, attempted_at, result))
        )
        if delivery.state != DeliveryState.PENDING or delivery.attempts != claim.attempts:
            # Our lease ran out and another worker claimed it again: its record decides.
            return None
        delivery.last_attempt_at = attempted_at
        delivery.leased_until = None
        delay = (
            None if result.succeeded else retry_delay(delivery.attempts, result.retry_after, rng)
        )
        if delay is not None:
            delivery.next_attempt_at = now + delay
            hold_followers(session, delivery, delivery.next_attempt_at)
        else:
            delivery.state = DeliveryState.SUCCEEDED if result.succeeded else DeliveryState.DEAD
            delivery.completed_at = now
            release_followers(session, delivery, now)
            if not result.succeeded:
                log.warning("delivery %s of event %s is dead", delivery.id, claim.event_id)
        if not isinstance(claim.destination, Webhook):
            return None
        # The delivery's end, or "failed" while it is still to be retried.
        outcome = "failed" if delivery.state == DeliveryState.PENDING else str(delivery.state)
        waited = _waited(session, delivery) if result.succeeded else None
        alert = _endpoint_health(session, claim.destination.endpoint_id, result, now)
    # Counted once the transaction has committed: a metrics failure must not undo a delivery.
    metrics.record_webhook_attempt(outcome)
    if waited is not None:
        metrics.observe_delivery_latency(waited)
    return alert


def _waited(session: Session, delivery: Delivery) -> float | None:
    """Seconds from the event's creation to its delivery's completion."""
    created = session.scalar(
        select(OutboxEvent.created_at).where(OutboxEvent.id == delivery.event_id)
    )
    if created is None or delivery.completed_at is None:
        return None
    return (delivery.completed_at - created).total_seconds()


def _endpoint_health(
    session: Session, endpoint_id: int, result: AttemptResult, now: datetime
) -> _Alert | None:
    """Track how long an endpoint has been failing; disable it on 410 or after DISABLE_AFTER.

    Also opens its circuit after CIRCUIT_AFTER attempts in a row without an answer, and closes
    it on any answer.
    """
    endpoint = session.get_one(WebhookEndpoint, endpoint_id, with_for_update=NO_KEY_UPDATE)
    if result.status_code is not None:
        endpoint.unanswered = 0
        endpoint.circuit_open_until = None
    else:
        endpoint.unanswered += 1
        resting = endpoint.circuit_open_until is not None and endpoint.circuit_open_until > now
        if endpoint.unanswered >= CIRCUIT_AFTER and not resting:
            endpoint.circuit_open_until = now + CIRCUIT_REST
            log.warning("webhook endpoint %s does not answer; resting it", endpoint.id)
    if result.succeeded:
        if endpoint.failing_since is not None:
            endpoint.failing_since = None
        return None
    if endpoint.failing_since is None:
        endpoint.failing_since = now
    if not endpoint.enabled:
        return None
    if result.gone:
        reason = "the endpoint answered 410 Gone"
    elif now - endpoint.failing_since >= DISABLE_AFTER:
        reason = f"every attempt failed since {endpoint.failing_since:%Y-%m-%d %H:%M} UTC"
    else:
        return None
    set_endpoint_enabled(session, endpoint, False, now=now, reason=reason)
    log.warning("webhook endpoint %s disabled: %s", endpoint.id, reason)
    account = session.get_one(Account, endpoint.account_id)
    if account.ops_email is None:
        return None
    return _Alert(
        to=account.ops_email,
        subject=f"shipmon: webhook endpoint {endpoint.id} of {account.name} disabled",
        body=(
            f"shipmon stopped sending webhooks to {mask_url(endpoint.url)} (endpoint "
            f"{endpoint.id} of account {account.name}): {reason}.\n\n"
            "Its undelivered events are kept. Once the receiver works again, run\n\n"
            f"    shipmon endpoint enable {endpoint.id}\n\n"
            "and they will be delivered, oldest first.\n"
        ),
    )


def _send_alert(settings: Settings, alert: _Alert) -> None:
    try:
        send_alert_mail(settings, alert.to, alert.subject, alert.body)
    except MailError as error:
        log.error("cannot email %s about a disabled endpoint: %s", alert.to, error)


# --- The delivery loop -----------------------------------------------------------------------


async def _attempt(
    claim: Claim,
    session_factory: SessionFactory,
    settings: Settings,
    sender: WebhookSender,
    clock: Clock,
    rng: random.Random | None,
) -> None:
    """Make one attempt and record it; whatever goes wrong is this attempt's alone.

    An exception here would end the delivery loop and cancel every other attempt in flight,
    so each failure becomes a failed attempt of this delivery, which then backs off as any
    failed attempt does.
    """
    attempted_at = clock()
    try:
        result = await send(claim, settings, sender)
    except Exception as error:
        log.exception("attempt at delivery %s failed", claim.delivery_id)
        result = AttemptResult(False, 0, error=f"internal error: {describe_error(error)}")
    try:
        alert = await asyncio.to_thread(
            _record, session_factory, claim, result, attempted_at, clock(), rng
        )
    except Exception as error:
        log.exception("cannot record attempt at delivery %s", claim.delivery_id)
        # Without what the receiver said, which is what could not be stored.
        bare = AttemptResult(
            False, result.duration_ms, error=f"answer not recorded: {describe_error(error)}"
        )
        try:
            alert = await asyncio.to_thread(
                _record, session_factory, claim, bare, attempted_at, clock(), rng
            )
        except Exception:
            # The database itself is failing: the claim's lease runs out and it comes due again.
            log.exception("cannot record attempt at delivery %s", claim.delivery_id)
            return
    if alert is not None:
        await asyncio.to_thread(_send_alert, settings, alert)


async def deliver_due(
    session_factory: SessionFactory,
    settings: Settings,
    sender: WebhookSender,
    *,
    secret_key: str,
    now: datetime | None = None,
    limit: int = DEFAULT_LIMIT,
    lease: timedelta = DEFAULT_LEASE,
    concurrency: int = DEFAULT_CONCURRENCY,
    rng: random.Random | None = None,
) -> int:
    """Send due deliveries until none is due or `limit` were attempted; returns the attempts.

    A delivery that finishes may put the next event of its shipment in line, so claiming goes
    on while attempts complete; a slow receiver holds one slot, never the others.
    """
    clock = clock_of(now)
    attempted = 0
    running: set[asyncio.Task[None]] = set()
    drained = False
    try:
        while True:
            free = min(concurrency - len(running), limit - attempted)
            # A claim gives each endpoint no more than its room, so claim again while claims
            # find something: the slots left go to the next endpoints in line.
            while not drained and free > 0:
                claims, claimed = await asyncio.to_thread(
                    _claim, session_factory, settings, secret_key, free, clock(), lease
                )
                attempted += len(claims)
                running |= {
                    asyncio.create_task(_attempt(c, session_factory, settings, sender, clock, rng))
                    for c in claims
                }
                drained = claimed == 0
                free = min(concurrency - len(running), limit - attempted)
            if not running:
                return attempted
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            if attempted < limit:
                # Events committed since this run began: fanned out here, they go out with
                # this run's attempts rather than wait for a worker to take their own task.
                await asyncio.to_thread(_fan_out_committed, session_factory, None, clock())
            drained = False
    finally:
        # Claims cut short here stay leased and come due again: delayed, never lost.
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def _fan_out_committed(
    session_factory: SessionFactory, event_ids: Sequence[int] | None, now: datetime
) -> None:
    with session_factory.begin() as session:
        fan_out(session, event_ids, now=now)


async def fan_out_and_deliver(
    session_factory: SessionFactory,
    settings: Settings,
    sender: WebhookSender,
    event_ids: Sequence[int] | None = None,
    *,
    secret_key: str,
    now: datetime | None = None,
    limit: int = DEFAULT_LIMIT,
) -> int:
    """Fan out events (None: every event not yet fanned out), then deliver what is due.

    Call it after the transaction that wrote the events commits, and periodically as the
    safety net. Returns the attempts made. A process that keeps its event loop and `sender`
    across calls saves setting both up each time.
    """
    await asyncio.to_thread(_fan_out_committed, session_factory, event_ids, clock_of(now)())
    return await deliver_due(
        session_factory, settings, sender, secret_key=secret_key, now=now, limit=limit
    )
