"""Celery tasks: thin wrappers that give the core functions their sessions, clients and clock.

Each task's function bears the task's name (`shipmon.relearn` is `relearn`) and states its
delivery guarantees. Follow-up tasks are sent only after the transaction that made them
necessary has committed, so a worker never acts on data it cannot see yet.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime, timedelta
from typing import Any

import redis
from celery import Task
from sqlalchemy.orm import Session, sessionmaker

from worker.carrier.client import CarrierClient
from worker.core import metrics
from worker.core.clock import utcnow
from worker.core.config import Settings, get_settings
from worker.core.db import session_factory
from worker.core.servers import Servers, resolve
from worker.notify.delivery import fan_out_and_deliver
from worker.notify.mail import MailError, send_ops_alert
from worker.notify.webhooks.sender import WebhookSender
from worker.ops import retention, stalled
from worker.ops.heartbeat import record_tick
from worker.quota.limiter import QuotaLimiter, effective_daily_quota, regrow_plans
from worker.runtime.celery import POLL_TIME_LIMIT, TASK_TIME_LIMIT, app
from worker.scheduling import learning
from worker.scheduling.model import DEFAULT_MAX_INTERVAL, ShipmentState, next_poll_at
from worker.tracking import dispatch as dispatching
from worker.tracking import intake
from worker.tracking.poller import poll_claim

log = logging.getLogger(__name__)


class _Process:
    """What one worker process keeps between tasks: sessions, Redis, an event loop, a client.

    Made on first use after the fork, so prefork children never share a connection.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.settings: Settings = get_settings()
        self.servers: Servers = resolve(self.settings)
        self.sessions: sessionmaker[Session] = session_factory(self.servers.database_url)
        self.redis: redis.Redis[bytes] = redis.Redis.from_url(self.servers.redis_url)
        self.limiter = QuotaLimiter(self.redis, self.settings, utcnow)
        self.plans = learning.PlanCache(self.settings.quota_timezone)
        # One loop per process, kept across tasks, so the carrier client's pool is reused.
        self.runner = asyncio.Runner()
        self.carrier = CarrierClient(
            self.settings.carrier_base_url, max_connections=self.settings.poll_concurrency
        )
        self.webhooks = WebhookSender(allow_private=self.settings.webhook_allow_private)

    @property
    def max_interval(self) -> timedelta:
        seconds = self.settings.max_poll_interval
        return timedelta(seconds=seconds) if seconds else DEFAULT_MAX_INTERVAL


_process: _Process | None = None


def process() -> _Process:
    global _process
    if _process is None or _process.pid != os.getpid():
        _process = _Process()
    return _process


class ShipmonTask(Task):  # type: ignore[misc]
    """Every task: acknowledged late, redelivered if its worker dies, no stored result."""

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True


@app.task(name="shipmon.register_orders", base=ShipmonTask, ignore_result=False, time_limit=120)
def register_orders(account: str, order_codes: list[str]) -> dict[str, Any]:
    """Register order codes; returns what was registered, already known, and refused."""
    with process().sessions.begin() as session:
        return intake.register_orders(session, account, order_codes).as_dict()


@app.task(name="shipmon.dispatch", base=ShipmonTask, time_limit=60, expires=10)
def dispatch() -> int:
    """Claim what may be polled now and hand it to poll tasks; returns the batches sent."""
    p = process()
    with p.sessions.begin() as session:
        now = dispatching.database_now(session)
        model = p.plans.current(session)

        def first_lookup(account_id: int, registered: datetime) -> datetime:
            state = ShipmentState(registered_at=registered)
            price = p.plans.price(account_id)
            ceiling = p.plans.max_interval(account_id, p.max_interval)
            pushes = model.coverage(account_id)
            return next_poll_at(state, model, price, ceiling, pushes) or registered

        claims = dispatching.dispatch(
            session,
            now,
            daily_quota=lambda account: effective_daily_quota(account, p.settings),
            grant=p.limiter.acquire,
            refund=p.limiter.refund,
            first_lookup=first_lookup,
        )
    metrics.record_dispatch_tick(now)
    record_tick(p.limiter.redis, now)
    for claim in claims:
        p.limiter.hold(claim.account_id, claim.batch, len(claim.shipment_ids))
        poll.delay(*claim.as_task_args())
    return len(claims)


@app.task(name="shipmon.poll", base=ShipmonTask, time_limit=POLL_TIME_LIMIT)
def poll(account_id: int, shipment_ids: list[int], leased_until: str) -> int:
    """Poll one claimed batch and apply the answers; returns how many were polled."""
    p = process()
    claim = dispatching.Claim(account_id, shipment_ids, datetime.fromisoformat(leased_until))
    report = p.runner.run(
        poll_claim(
            p.sessions,
            p.carrier,
            claim,
            secret_key=p.servers.secret_key,
            plans=p.plans,
            max_interval=p.max_interval,
            concurrency=p.settings.poll_concurrency,
            pause_for_limit=p.limiter.pause_for_limit,
            release=p.limiter.release,
            clock=utcnow,
        )
    )
    if report.event_ids:
        app.send_task("shipmon.deliver", args=[report.event_ids])
    if report.alert is not None and report.alert.ops_email:
        try:
            send_ops_alert(
                p.settings, report.alert.ops_email, report.alert.subject, report.alert.body
            )
        except MailError:
            log.exception("could not email the pause of account %s", account_id)
    return report.polled


@app.task(name="shipmon.update_prices", base=ShipmonTask, time_limit=60, expires=50)
def update_prices() -> None:
    """Steer each key's lookup price towards its daily quota, with lowered plans grown back."""
    p = process()
    now = utcnow()
    with p.sessions.begin() as session:
        regrow_plans(session, p.settings, now)
        quotas = {
            a.id: effective_daily_quota(a, p.settings)
            for a in dispatching.pollable_accounts(session, now)
        }
        learning.update_prices(session, quotas, p.settings.quota_timezone, now)


@app.task(name="shipmon.relearn", base=ShipmonTask, time_limit=300, expires=600)
def relearn() -> None:
    """Refit the scheduler's model from recent history."""
    p = process()
    with p.sessions.begin() as session:
        learning.relearn(session, p.settings.quota_timezone, utcnow())


@app.task(name="shipmon.deliver", base=ShipmonTask, time_limit=TASK_TIME_LIMIT)
def deliver(event_ids: list[int]) -> int:
    """Fan new events out to their endpoints and recipients, and deliver what is due."""
    return _deliver(event_ids)


@app.task(name="shipmon.sweep_deliveries", base=ShipmonTask, time_limit=TASK_TIME_LIMIT, expires=10)
def sweep_deliveries() -> int:
    """The safety net: events never fanned out, and retries that have come due."""
    return _deliver(None)


def _deliver(event_ids: list[int] | None) -> int:
    p = process()
    return p.runner.run(
        fan_out_and_deliver(
            p.sessions, p.settings, p.webhooks, event_ids, secret_key=p.servers.secret_key
        )
    )


@app.task(name="shipmon.detect_stalled", base=ShipmonTask, time_limit=300, expires=600)
def detect_stalled() -> int:
    """Raise `shipment.stalled` once for each shipment silent for longer than is normal."""
    p = process()
    floor = timedelta(hours=p.settings.stalled_floor_hours)
    with p.sessions.begin() as session:
        event_ids = stalled.detect_stalled(session, utcnow(), floor)
    if event_ids:
        app.send_task("shipmon.deliver", args=[event_ids])
    return len(event_ids)


@app.task(name="shipmon.purge_finished", base=ShipmonTask, time_limit=600, expires=3600)
def purge_finished() -> int:
    """Delete finished shipments past the retention period, a batch per transaction."""
    p, total = process(), 0
    while True:
        with p.sessions.begin() as session:
            deleted = retention.purge_finished(session, utcnow(), p.settings.retention_days)
        total += deleted
        if deleted < retention.PURGE_BATCH:
            return total


@app.task(name="shipmon.refresh_metrics", base=ShipmonTask, time_limit=60, expires=25)
def refresh_metrics() -> None:
    """Refresh the quota and backlog gauges."""
    p = process()
    with p.sessions.begin() as session:
        metrics.refresh_gauges(session, [line.gauge() for line in p.limiter.status(session)])
