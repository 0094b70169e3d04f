"""Prometheus metrics (one process and prefork's many) and the JSON log lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from tests.conftest import ROOT, RunServers, make_account
from worker.carrier.client import CarrierClient
from worker.cli import app
from worker.core import metrics
from worker.core.logs import configure_logging
from worker.domain.models import Shipment, WebhookEndpoint
from worker.quota.limiter import KeyStatus
from worker.sim.sandbox import running_sandbox
from worker.sim.workload import Faults
from worker.tracking.poller import track_all

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(exposed: bytes) -> Samples:
    """Every sample of an exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposed.decode())
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_counters_and_histograms_are_exposed_by_label() -> None:
    before = samples(metrics.exposition())
    metrics.record_poll("ok")
    metrics.record_poll("ok")
    metrics.record_poll("ORDERCODE_NOT_FOUND")
    metrics.record_transition(None, "ACCEPTED")
    metrics.record_transition("IN_TRANSIT", "DELIVERING")
    metrics.record_delay(12)
    metrics.record_webhook_attempt("succeeded")
    metrics.record_webhook_attempt("failed")
    metrics.record_webhook_attempt("dead")
    metrics.observe_detection_delay(90)
    metrics.observe_detection_delay(4000)
    metrics.observe_delivery_latency(0.3)

    exposed = metrics.exposition()
    after = samples(exposed)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert b'shipmon_polls_total{result="ok"}' in exposed
    assert b'shipmon_transitions_total{from="IN_TRANSIT",to="DELIVERING"}' in exposed
    assert delta("shipmon_polls_total", result="ok") == 2
    assert delta("shipmon_polls_total", result="ORDERCODE_NOT_FOUND") == 1
    assert delta("shipmon_transitions_total", **{"from": "", "to": "ACCEPTED"}) == 1
    assert delta("shipmon_delays_total", code="12") == 1
    # A dead delivery's last attempt failed too; a failed one that will be retried is no
    # finished delivery.
    assert delta("shipmon_webhook_attempts_total", result="succeeded") == 1
    assert delta("shipmon_webhook_attempts_total", result="failed") == 2
    assert delta("shipmon_webhook_deliveries_total", result="delivered") == 1
    assert delta("shipmon_webhook_deliveries_total", result="dead") == 1
    assert delta("shipmon_webhook_deliveries_total", result="failed") == 0
    detection = "shipmon_detection_delay_seconds"
    assert delta(f"{detection}_count") == 2
    assert delta(f"{detection}_sum") == 4090
    assert delta(f"{detection}_bucket", le="300.0") == 1
    assert delta(f"{detection}_bucket", le="7200.0") == 2
    latency = "shipmon_webhook_delivery_latency_seconds"
    assert delta(f"{latency}_bucket", le="0.25") == 0
    assert delta(f"{latency}_bucket", le="0.5") == 1
    assert value(after, "shipmon_build_info", version=version("shipmon")) == 1


def test_every_carrier_lookup_is_timed_errors_too() -> None:
    lookups = "shipmon_carrier_lookup_duration_seconds_count"
    before = value(samples(metrics.exposition()), lookups)

    async def lookup(base_url: str) -> None:
        async with CarrierClient(base_url) as client:
            # A key the carrier does not know: it answers, with an error, and that is a lookup.
            await track_all(client, "NO-SUCH-KEY", ["ABC12345", "ABC12346"], concurrency=2)

    with running_sandbox(faults=Faults()) as sandbox:
        asyncio.run(lookup(sandbox.base_url))

    assert value(samples(metrics.exposition()), lookups) - before == 2


DISPATCH = """
from worker.core import metrics
from worker.runtime import tasks

tasks.dispatch()
print(metrics.exposition().decode())
"""


def test_a_dispatch_tick_sets_the_heartbeat(servers: RunServers) -> None:
    env = {k: v for k, v in servers.env().items() if k != metrics.MULTIPROC_DIR}
    started = datetime.now(UTC).timestamp()
    done = subprocess.run(
        [sys.executable, "-c", DISPATCH],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    beat = value(samples(done.stdout.encode()), "shipmon_dispatch_last_tick_timestamp_seconds")
    assert started <= beat <= datetime.now(UTC).timestamp()


def test_gauges_show_quota_per_account_and_the_due_backlog(session: Session) -> None:
    busy, idle = make_account(session), make_account(session)
    now = datetime.now(UTC)
    for due in (now - timedelta(hours=1), now - timedelta(hours=2), now + timedelta(hours=1)):
        session.add(Shipment(account_id=busy.id, order_code=secrets.token_hex(4), next_poll_at=due))
    session.add(Shipment(account_id=busy.id, order_code=secrets.token_hex(4), active=False,
                         next_poll_at=now - timedelta(hours=1)))  # fmt: skip
    session.add(Shipment(account_id=idle.id, order_code=secrets.token_hex(4),
                         next_poll_at=now + timedelta(hours=1), stalled_at=now))  # fmt: skip
    for enabled in (True, False):
        session.add(WebhookEndpoint(account_id=busy.id, url="https://shop.example/hook",
                                    secret_encrypted="x", enabled=enabled))  # fmt: skip
    session.flush()
    status = [
        KeyStatus(busy.name, "wxyz", 1000, 17, 300, 5, 200, None, None).gauge(),
        KeyStatus(None, None, 3_000_000, 40, 900_000, 5, 200, None, None).gauge(),
    ]

    metrics.refresh_gauges(session, status)

    exposed = metrics.exposition()
    found = samples(exposed)
    assert value(found, "shipmon_due_backlog", account=busy.name) == 2
    assert value(found, "shipmon_due_backlog", account=idle.name) == 0
    assert f'shipmon_due_backlog{{account="{idle.name}"}} 0.0'.encode() in exposed
    assert value(found, "shipmon_stalled_shipments", account=idle.name) == 1
    assert value(found, "shipmon_stalled_shipments", account=busy.name) == 0
    assert value(found, "shipmon_webhook_endpoints_disabled", account=busy.name) == 1
    assert f'shipmon_webhook_endpoints_disabled{{account="{idle.name}"}} 0.0'.encode() in exposed
    assert value(found, "shipmon_quota_used_lookups", account=busy.name) == 17
    assert value(found, "shipmon_quota_left_lookups", account=busy.name) == 983
    assert value(found, "shipmon_quota_allowed_lookups", account=busy.name) == 300
    assert value(found, "shipmon_quota_all_keys_used_lookups") == 40
    assert value(found, "shipmon_quota_all_keys_left_lookups") == 2_999_960
    assert value(found, "shipmon_quota_all_keys_allowed_lookups") == 900_000
    assert b"wxyz" not in exposed


# A prefork parent like Celery's: it imports the metrics, forks, and its children record.
PREFORK = """
import multiprocessing
import sys

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from worker.core import metrics
from worker.core.metrics import QuotaGauge


def work(used):
    metrics.record_poll("ok")
    metrics.record_transition("IN_TRANSIT", "DELIVERING")
    metrics.observe_detection_delay(120)
    engine = create_engine(sys.argv[1])
    with Session(engine) as session:
        status = [QuotaGauge(sys.argv[2], 1000, used, 0)]
        metrics.refresh_gauges(session, status)
    engine.dispose()


if __name__ == "__main__":
    fork = multiprocessing.get_context("fork")
    for used in (5, 7):  # one after the other: the second child's gauge is the most recent
        child = fork.Process(target=work, args=(used,))
        child.start()
        child.join()
        assert child.exitcode == 0
"""


@pytest.fixture
def exporter(servers: RunServers, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """`shipmon metrics` starting on a free port, over a folder that does not exist yet."""
    folder = tmp_path / "metrics"
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "metrics", "--port", "0"],
        env=servers.env(**{metrics.MULTIPROC_DIR: str(folder)}),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    with process.stdout:
        try:
            yield process, folder
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0


def test_shipmon_metrics_serves_the_sum_of_prefork_children(
    servers: RunServers, exporter: tuple[subprocess.Popen[str], Path]
) -> None:
    process, folder = exporter
    account = f"shop-{secrets.token_hex(3)}"
    # Runs while the exporter starts: both only need the folder's name.
    parent = subprocess.run(
        [sys.executable, "-c", PREFORK, servers.database_url, account],
        env=servers.env(**{metrics.MULTIPROC_DIR: str(folder)}),
        cwd=ROOT,
        timeout=120,
    )
    assert parent.returncode == 0
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("serving metrics on http://127.0.0.1:"), line

    with urllib.request.urlopen(line.split()[-1], timeout=30) as response:
        found = samples(response.read())

    assert value(found, "shipmon_polls_total", result="ok") == 2
    moved = {"from": "IN_TRANSIT", "to": "DELIVERING"}
    assert value(found, "shipmon_transitions_total", **moved) == 2
    assert value(found, "shipmon_detection_delay_seconds_count") == 2
    assert value(found, "shipmon_detection_delay_seconds_bucket", le="300.0") == 2
    assert value(found, "shipmon_quota_used_lookups", account=account) == 7
    # Only the two children wrote files: neither the parent, which only imported the
    # metrics, nor the exporter.
    writers = {p.stem.rsplit("_", 1)[1] for p in folder.glob("*.db")}
    assert len(writers) == 2


def test_shipmon_metrics_answers_healthz_and_names_its_release(
    exporter: tuple[subprocess.Popen[str], Path],
) -> None:
    process, _ = exporter
    assert process.stdout is not None
    page = process.stdout.readline().split()[-1]
    base = page.removesuffix("/metrics")

    with urllib.request.urlopen(f"{base}/healthz", timeout=30) as response:
        assert (response.status, response.read()) == (200, b"ok")
        assert response.headers["Content-Type"].startswith("text/plain")
    with urllib.request.urlopen(page, timeout=30) as response:
        found = samples(response.read())
    assert value(found, "shipmon_build_info", version=version("shipmon")) == 1


def test_shipmon_metrics_needs_the_workers_folder(servers: RunServers) -> None:
    env: dict[str, str | None] = {**servers.env(), metrics.MULTIPROC_DIR: None}
    result = CliRunner().invoke(app, ["metrics", "--port", "0"], env=env)
    assert result.exit_code == 2
    assert metrics.MULTIPROC_DIR in result.output


# -- JSON logs ---------------------------------------------------------------------------------


@pytest.fixture
def log_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """configure_logging writing to a buffer; the root logger is restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    configure_logging("INFO")
    yield buffer
    root.handlers[:], root.level = saved


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_log_lines_are_json_with_the_context_given(log_lines: io.StringIO) -> None:
    log = logging.getLogger("worker.test")
    log.debug("not at INFO")
    log.info("polled %s", "SPX0001", extra={"shipment": 42, "order_code": "SPX0001"})
    try:
        raise ValueError("bad answer")
    except ValueError:
        log.exception("apply failed", extra={"account": "shop-a"})

    first, second = _lines(log_lines)
    assert first["message"] == "polled SPX0001" and first["level"] == "INFO"
    assert (first["shipment"], first["order_code"]) == (42, "SPX0001")
    assert first["logger"] == "worker.test"
    assert datetime.fromisoformat(first["time"]).tzinfo is not None
    assert "task_id" not in first
    assert second["account"] == "shop-a" and second["level"] == "ERROR"
    assert "ValueError: bad answer" in second["exception"]


def test_log_lines_inside_a_task_carry_its_id(log_lines: io.StringIO) -> None:
    celery = Celery("logs-test", set_as_current=False)

    @celery.task(name="shipmon.test_logs")
    def work() -> None:
        logging.getLogger("worker.test").info("working", extra={"shipment_id": 7})

    result = work.apply(task_id="task-123")
    assert result.successful()
    [line] = [line for line in _lines(log_lines) if line["message"] == "working"]
    assert (line["task_id"], line["task_name"], line["shipment_id"]) == (
        "task-123",
        "shipmon.test_logs",
        7,
    )
