"""Prometheus metrics of the worker, summed across Celery's prefork processes.

Every worker process started with `PROMETHEUS_MULTIPROC_DIR` set writes its samples to files
in that folder, and `shipmon metrics` serves their sum on one port, beside a `/healthz` that
reads none of them. Without the variable the samples stay in the process that made them
(tests, one-off commands). The metrics are created on first use, so a process that only imports
this module (a health check, a CLI command) leaves no files behind.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache, wraps
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal, ParamSpec
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.context_managers import Timer
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker.core.clock import DAY_SECONDS
from worker.domain.models import Account, Shipment, WebhookEndpoint

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

# One carrier lookup: tens of milliseconds when healthy, up to the client's whole deadline.
LOOKUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 60, float("inf"))
# From the carrier's event time to the poll that saw it: minutes to a day.
DETECTION_BUCKETS = (60, 300, 600, 1800, 3600, 7200, 14400, 28800, DAY_SECONDS, float("inf"))
# From an event's creation to its webhook's acceptance: a fraction of a second to an hour.
DELIVERY_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf"))

_P = ParamSpec("_P")


@dataclass(frozen=True)
class QuotaGauge:
    """What the quota gauges show of one key's carrier day so far, or all keys' (no account)."""

    account: str | None
    daily_quota: int
    used: int
    allowed_now: int


@dataclass(frozen=True)
class _Metrics:
    polls: Counter
    lookup_latency: Histogram
    dispatch_tick: Gauge
    quota_used: Gauge
    quota_left: Gauge
    quota_allowed: Gauge
    quota_all_used: Gauge
    quota_all_left: Gauge
    quota_all_allowed: Gauge
    due_backlog: Gauge
    stalled: Gauge
    endpoints_disabled: Gauge
    transitions: Counter
    delays: Counter
    webhook_attempts: Counter
    webhook_deliveries: Counter
    emails: Counter
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
    else:
        # With the folder, the exporter adds it instead: a worker's files would keep an old
        # version's line long after an upgrade.
        REGISTRY.register(_BuildInfo())
    # Gauges refreshed by whichever process ran the periodic refresh last: its value counts.
    latest: Literal["mostrecent"] = "mostrecent"

    def refreshed(name: str, what: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, what, labels, multiprocess_mode=latest)

    return _Metrics(
        polls=Counter("shipmon_polls", "Carrier lookups by result.", ["result"]),
        lookup_latency=Histogram(
            "shipmon_carrier_lookup_duration_seconds",
            "Time one carrier lookup took, from sending to its answer or failure.",
            buckets=LOOKUP_BUCKETS,
        ),
        dispatch_tick=Gauge(
            "shipmon_dispatch_last_tick_timestamp_seconds",
            "Unix time of the dispatcher's last completed tick.",
            multiprocess_mode="max",
        ),
        quota_used=refreshed(
            "shipmon_quota_used_lookups", "Lookups spent today by an account's key.", ["account"]
        ),
        quota_left=refreshed(
            "shipmon_quota_left_lookups", "Lookups an account's key has left today.", ["account"]
        ),
        quota_allowed=refreshed(
            "shipmon_quota_allowed_lookups",
            "The pace line: lookups an account's key may have spent by now.",
            ["account"],
        ),
        quota_all_used=refreshed(
            "shipmon_quota_all_keys_used_lookups", "Lookups spent today by all keys together."
        ),
        quota_all_left=refreshed(
            "shipmon_quota_all_keys_left_lookups", "Lookups all keys together have left today."
        ),
        quota_all_allowed=refreshed(
            "shipmon_quota_all_keys_allowed_lookups",
            "The pace line: lookups all keys together may have spent by now.",
        ),
        due_backlog=refreshed(
            "shipmon_due_backlog", "Open shipments of an account whose poll is due.", ["account"]
        ),
        stalled=refreshed(
            "shipmon_stalled_shipments",
            "Open shipments of an account silent for longer than is normal.",
            ["account"],
        ),
        endpoints_disabled=refreshed(
            "shipmon_webhook_endpoints_disabled",
            "Webhook endpoints of an account that are disabled, by hand or after failing too long.",
            ["account"],
        ),
        transitions=Counter(
            "shipmon_transitions", "Status changes by previous and new status.", ["from", "to"]
        ),
        delays=Counter("shipmon_delays", "Delays reported by delay code.", ["code"]),
        webhook_attempts=Counter(
            "shipmon_webhook_attempts", "Webhook sending attempts by result.", ["result"]
        ),
        webhook_deliveries=Counter(
            "shipmon_webhook_deliveries",
            "Webhook deliveries finished: delivered, or dead after their last attempt.",
            ["result"],
        ),
        emails=Counter("shipmon_emails", "Emails sent, or failed to send, by result.", ["result"]),
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


class _BuildInfo(Collector):
    """`shipmon_build_info{version="..."} 1`: which release is serving the metrics."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "shipmon_build_info", "The shipmon release, as a label; always 1.", labels=["version"]
        )
        family.add_metric([_version()], 1)
        yield family


@cache
def _version() -> str:
    try:
        return version("shipmon")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def record_poll(result: str) -> None:
    """Count one carrier lookup; `result` is "ok" or the error's code, e.g. ORDERCODE_NOT_FOUND."""
    _metrics().polls.labels(result).inc()


def timing_lookup() -> Timer:
    """A context manager that records how long the carrier lookup inside it took."""
    return _metrics().lookup_latency.time()


def record_dispatch_tick(at: datetime) -> None:
    """Note that the dispatcher finished a tick: the heartbeat that says something polls."""
    _metrics().dispatch_tick.set(at.timestamp())


def record_transition(from_: str | None, to: str) -> None:
    """Count one status change; `from_` is None for a shipment's first status."""
    _metrics().transitions.labels(from_ or "", to).inc()


def record_delay(code: int | None) -> None:
    """Count one delay the carrier reported, by its delay code."""
    _metrics().delays.labels("" if code is None else str(code)).inc()


def observe_detection_delay(seconds: float) -> None:
    """Record how long after the carrier's event time a poll saw it."""
    _metrics().detection_delay.observe(max(0.0, seconds))


def record_webhook_attempt(outcome: str) -> None:
    """Count one webhook attempt, and the delivery it finished, if any.

    `outcome` is "succeeded" (delivered), "failed" (to be retried) or "dead" (failed, and it
    was the last attempt).
    """
    m = _metrics()
    m.webhook_attempts.labels("succeeded" if outcome == "succeeded" else "failed").inc()
    if outcome != "failed":
        m.webhook_deliveries.labels("delivered" if outcome == "succeeded" else "dead").inc()


def observe_delivery_latency(seconds: float) -> None:
    """Record how long after its event a webhook was accepted."""
    _metrics().delivery_latency.observe(max(0.0, seconds))


def counting_emails(send: Callable[_P, None]) -> Callable[_P, None]:
    """Count every call of `send` as an email "sent", or "failed" when it raises."""

    @wraps(send)
    def counted(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            send(*args, **kwargs)
        except Exception:
            _metrics().emails.labels("failed").inc()
            raise
        _metrics().emails.labels("sent").inc()

    return counted


def refresh_gauges(session: Session, quota: Sequence[QuotaGauge]) -> None:
    """Set the quota, backlog, stalled and endpoint gauges: quota as given, the rest from the
    database (and its clock). Accounts are labelled by name; API keys never appear."""
    metrics = _metrics()
    for line in quota:
        left = max(0, line.daily_quota - line.used)
        if line.account is None:
            metrics.quota_all_used.set(line.used)
            metrics.quota_all_left.set(left)
            metrics.quota_all_allowed.set(line.allowed_now)
        else:
            metrics.quota_used.labels(line.account).set(line.used)
            metrics.quota_left.labels(line.account).set(left)
            metrics.quota_allowed.labels(line.account).set(line.allowed_now)
    # Counted per account by index (ix_shipments_due, ix_shipments_stalled), so the cost
    # follows the backlog and the stalled shipments, not the table.
    mine = (Shipment.account_id == Account.id, Shipment.active)
    due = select(func.count()).where(*mine, Shipment.next_poll_at <= func.now())
    stalled = select(func.count()).where(*mine, Shipment.stalled_at.is_not(None))
    # Every account, those with nothing due too, so a backlog that clears shows as zero.
    for name, due_count, stalled_count in session.execute(
        select(Account.name, due.scalar_subquery(), stalled.scalar_subquery())
    ):
        metrics.due_backlog.labels(name).set(due_count)
        metrics.stalled.labels(name).set(stalled_count)
    disabled = func.count(WebhookEndpoint.id).filter(WebhookEndpoint.enabled.is_(False))
    for name, count in session.execute(
        select(Account.name, disabled).outerjoin(WebhookEndpoint).group_by(Account.name)
    ):
        metrics.endpoints_disabled.labels(name).set(count)


def registry() -> CollectorRegistry:
    """What to serve: the sum of every process's files in multiprocess mode, else this process."""
    folder = os.environ.get(MULTIPROC_DIR)
    if not folder:
        _metrics()  # so a scrape lists every metric, those not recorded yet too
        return REGISTRY
    collected = CollectorRegistry()
    MultiProcessCollector(collected, path=folder)  # type: ignore[no-untyped-call]
    collected.register(_BuildInfo())
    return collected


def exposition() -> bytes:
    """The metrics in Prometheus's text format, as `shipmon metrics` serves them."""
    return generate_latest(registry())


def _app(served: CollectorRegistry) -> WSGIApplication:
    """`/healthz` answers `ok` without collecting; every other path is the metrics page."""
    metrics_page = make_wsgi_app(served)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok"]
        result: Iterable[bytes] = metrics_page(environ, start_response)
        return result

    return app


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape or health check."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(port: int, host: str) -> tuple[WSGIServer, threading.Thread]:
    """Serve `/metrics` and `/healthz` from a background thread; stop with `server.shutdown()`."""
    if os.environ.get(MULTIPROC_DIR):
        Path(os.environ[MULTIPROC_DIR]).mkdir(parents=True, exist_ok=True)

    class MetricsServer(ThreadingWSGIServer):
        # IPv4 or IPv6, whichever the address given is.
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    server: WSGIServer = make_server(
        host, port, _app(registry()), server_class=MetricsServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server, thread
