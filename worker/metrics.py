"""Prometheus metrics of the worker, summed across Celery's prefork processes.

Every worker process started with `PROMETHEUS_MULTIPROC_DIR` set writes its samples to files
in that folder, and `shipmon metrics` serves their sum on one port. Without the variable the
samples stay in the process that made them (tests, one-off commands). The metrics are created
on first use, so a process that only imports this module (a health check, a CLI command) leaves
no files behind.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker.models import Account, Shipment
from worker.quota import KeyStatus

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

# From the carrier's event time to the poll that saw it: minutes to a day.
DETECTION_BUCKETS = (60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, float("inf"))
# From an event's creation to its webhook's acceptance: a fraction of a second to an hour.
DELIVERY_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf"))


@dataclass(frozen=True)
class _Metrics:
    polls: Counter
    quota_used: Gauge
    quota_left: Gauge
    quota_all_used: Gauge
    quota_all_left: Gauge
    due_backlog: Gauge
    transitions: Counter
    delays: Counter
    deliveries: Counter
    detection_delay: Histogram
    delivery_latency: Histogram


_CREATING = threading.Lock()


def _metrics() -> _Metrics:
    # functools.cache does not stop two threads that miss at once from both creating the
    # metrics, and a second registration raises: the delivery loop records from many threads.
    with _CREATING:
        return _create_metrics()


@cache
def _create_metrics() -> _Metrics:
    folder = os.environ.get(MULTIPROC_DIR)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
    # Gauges refreshed by whichever process ran the periodic refresh last: its value counts.
    latest: Literal["mostrecent"] = "mostrecent"
    return _Metrics(
        polls=Counter("shipmon_polls", "Carrier lookups by result.", ["result"]),
        quota_used=Gauge(
            "shipmon_quota_used",
            "Lookups spent today by an account's API key.",
            ["account"],
            multiprocess_mode=latest,
        ),
        quota_left=Gauge(
            "shipmon_quota_left",
            "Lookups an account's API key has left today.",
            ["account"],
            multiprocess_mode=latest,
        ),
        quota_all_used=Gauge(
            "shipmon_quota_all_keys_used",
            "Lookups spent today by all keys together.",
            multiprocess_mode=latest,
        ),
        quota_all_left=Gauge(
            "shipmon_quota_all_keys_left",
            "Lookups all keys together have left today.",
            multiprocess_mode=latest,
        ),
        due_backlog=Gauge(
            "shipmon_due_backlog",
            "Open shipments of an account whose poll is due.",
            ["account"],
            multiprocess_mode=latest,
        ),
        transitions=Counter(
            "shipmon_transitions", "Status changes by previous and new status.", ["from", "to"]
        ),
        delays=Counter("shipmon_delays", "Delays reported by delay code.", ["code"]),
        deliveries=Counter("shipmon_webhook_deliveries", "Webhook attempts by result.", ["result"]),
        detection_delay=Histogram(
            "shipmon_detection_delay_seconds",
            "Time from the carrier's event to the poll that saw it.",
            buckets=DETECTION_BUCKETS,
        ),
        delivery_latency=Histogram(
            "shipmon_webhook_delivery_latency_seconds",
            "Time from an event's creation to its webhook's acceptance.",
            buckets=DELIVERY_BUCKETS,
        ),
    )


def record_poll(result: str) -> None:
    """Count one carrier lookup; `result` is "ok" or the error's code, e.g. ORDERCODE_NOT_FOUND."""
    _metrics().polls.labels(result).inc()


def record_transition(from_: str | None, to: str) -> None:
    """Count one status change; `from_` is None for a shipment's first status."""
    _metrics().transitions.labels(from_ or "", to).inc()


def record_delay(code: int | None) -> None:
    """Count one delay the carrier reported, by its delay code."""
    _metrics().delays.labels("" if code is None else str(code)).inc()


def observe_detection_delay(seconds: float) -> None:
    """Record how long after the carrier's event time a poll saw it."""
    _metrics().detection_delay.observe(max(0.0, seconds))


def record_delivery(result: str) -> None:
    """Count one webhook attempt by result: "succeeded", "failed", "dead", ..."""
    _metrics().deliveries.labels(result).inc()


def observe_delivery_latency(seconds: float) -> None:
    """Record how long after its event a webhook was accepted."""
    _metrics().delivery_latency.observe(max(0.0, seconds))


def refresh_gauges(session: Session, limiter_status: Sequence[KeyStatus]) -> None:
    """Set the quota and backlog gauges: quota from `QuotaLimiter.status`, backlog from the
    database's clock. Accounts are labelled by name; API keys never appear."""
    metrics = _metrics()
    for line in limiter_status:
        left = max(0, line.daily_quota - line.used_today)
        if line.account is None:
            metrics.quota_all_used.set(line.used_today)
            metrics.quota_all_left.set(left)
        else:
            metrics.quota_used.labels(line.account).set(line.used_today)
            metrics.quota_left.labels(line.account).set(left)
    due = func.count(Shipment.id).filter(Shipment.active, Shipment.next_poll_at <= func.now())
    # Every account, those with nothing due too, so a backlog that clears shows as zero.
    for name, count in session.execute(
        select(Account.name, due).outerjoin(Shipment).group_by(Account.name)
    ):
        metrics.due_backlog.labels(name).set(count)


def registry() -> CollectorRegistry:
    """What to serve: the sum of every process's files in multiprocess mode, else this process."""
    folder = os.environ.get(MULTIPROC_DIR)
    if not folder:
        return REGISTRY
    collected = CollectorRegistry()
    MultiProcessCollector(collected, path=folder)  # type: ignore[no-untyped-call]
    return collected


def exposition() -> bytes:
    """The metrics in Prometheus's text format, as `shipmon metrics` serves them."""
    return generate_latest(registry())


def serve(port: int, host: str) -> tuple[WSGIServer, threading.Thread]:
    """Serve the metrics over HTTP from a background thread; stop with `server.shutdown()`."""
    if os.environ.get(MULTIPROC_DIR):
        Path(os.environ[MULTIPROC_DIR]).mkdir(parents=True, exist_ok=True)
    return start_http_server(port, addr=host, registry=registry())
