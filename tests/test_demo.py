"""`shipmon demo`, the quick start's first command, runs the whole system and ends cleanly, in
a state of its own."""

from __future__ import annotations

import re
import secrets
import socket
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from tests.conftest import RunServers, make_account
from worker.cli import app
from worker.core.db import transaction
from worker.domain.models import Account, Base, Shipment
from worker.sim.demo import (
    Chart,
    carrier_morning,
    detection_delay_s,
    push_summary,
    start_pushing,
    start_sandbox,
)
from worker.sim.sandbox import running_sandbox
from worker.sim.workload import Faults
from worker.tracking.intake import register_orders, remove_account

pytestmark = pytest.mark.e2e


def test_the_demo_shows_polls_transitions_and_verified_webhooks(
    servers: RunServers, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--duration", "25", "--orders", "10"],
        env=servers.env(
            SHIPMON_HOME=str(tmp_path / "home"), COLUMNS="160", SHIPMON_EMBEDDED_IDLE_TIMEOUT="0"
        ),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = re.findall(r"polls made: (\d+).*?verified by the receiver: (\d+)", result.stdout)
    assert summary, result.stdout[-3000:]
    polls, verified = map(int, summary[-1])
    assert polls > 0
    assert verified > 0
    assert "rejected: 0" in result.stdout
    assert "→" in result.stdout  # transitions were shown
    # The live chart drew polls per second and detection delays in carrier time.
    charts = re.findall(r"polls per second +([·▁▂▃▄▅▆▇█]+) +now", result.stdout)
    assert charts and any(c != "·" * len(c) for c in charts), result.stdout[-3000:]
    delays = re.findall(r"detection delay +[·▁▂▃▄▅▆▇█]+ +median (\d[\d,]*) min", result.stdout)
    assert delays, result.stdout[-3000:]
    assert "What to try next" in result.stdout
    # The sandbox pushed to shipmon's own receiver, which took them; polls caught the rest.
    pushes = re.findall(
        r"changes by push: (\d+), by poll: \d+ .*?carrier pushes sent: (\d+)",
        result.stdout,
    )
    assert pushes, result.stdout[-3000:]
    by_push, sent = map(int, pushes[-1])
    assert sent > 0, result.stdout[-3000:]
    assert by_push > 0
    assert (tmp_path / "home" / "demo" / "demo.log").exists()


def test_the_demos_carrier_opens_on_its_latest_morning() -> None:
    zone = ZoneInfo("Asia/Ho_Chi_Minh")
    # 16:30 in Hanoi: that day's 07:00, so an afternoon demo still watches the parcels move.
    afternoon = datetime(2026, 12, 3, 9, 30, tzinfo=UTC)
    assert carrier_morning(afternoon, zone) == datetime(2026, 12, 3, 7, 0, tzinfo=zone)
    # 05:00 in Hanoi: the morning before, never one still to come.
    before_dawn = datetime(2026, 12, 2, 22, 0, tzinfo=UTC)
    assert carrier_morning(before_dawn, zone) == datetime(2026, 12, 2, 7, 0, tzinfo=zone)
    exactly = datetime(2026, 12, 3, 7, 0, tzinfo=zone)
    assert carrier_morning(exactly, zone) == exactly


def test_the_sandbox_clock_starts_where_it_is_told() -> None:
    start = datetime(2026, 12, 3, 7, 0, tzinfo=ZoneInfo("Asia/Ho_Chi_Minh"))
    process, url = start_sandbox(speed=1.0, seed=1, start=start)
    try:
        now = datetime.fromisoformat(httpx.get(f"{url}/_sandbox/stats").json()["now"])
    finally:
        process.terminate()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()
    assert timedelta(0) <= now - start < timedelta(seconds=30)


@pytest.mark.parametrize(
    ("start", "says"),
    [("yesterday", "is not an ISO 8601 time"), ("2026-12-03T07:00", "has no UTC offset")],
)
def test_a_sandbox_start_it_cannot_place_is_refused(start: str, says: str) -> None:
    result = CliRunner().invoke(app, ["sandbox", "--start", start])
    assert result.exit_code != 0
    assert says in result.output
    assert "2026-12-03T07:00+07:00" in result.output


def test_detection_delay_is_read_on_the_carriers_clock() -> None:
    real = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    carrier = datetime(2026, 12, 3, 0, 0, tzinfo=UTC)  # read at `real`, running 1200 times faster
    # Seen 3 real seconds after the reading: 3,600 carrier seconds later; the change was 10
    # carrier minutes before that.
    changed = carrier + timedelta(minutes=50)
    assert detection_delay_s(changed, real + timedelta(seconds=3), (carrier, real), 1200) == 600
    # A change stamped after the moment it was seen (clock skew) is no negative delay.
    assert detection_delay_s(carrier + timedelta(hours=2), real, (carrier, real), 1200) == 0


def test_the_chart_keeps_a_point_per_refresh() -> None:
    chart = Chart(speed=1200)
    chart.add(0, [])
    chart.add(50, [120.0, 600.0, 60.0])
    chart.add(50, [])
    assert len(chart.polls) == 2 and chart.polls[0] > 0 and chart.polls[1] == 0
    assert list(chart.delays) == [120.0, None]
    lines = chart.render().splitlines()
    assert lines[0].startswith("polls per second") and "█·" in lines[0]
    assert "median 2 min of carrier time" in lines[1]


def test_the_demo_neither_touches_nor_leaves_anything_in_the_users_state(
    servers: RunServers, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    name = f"real-{secrets.token_hex(4)}"
    with transaction(servers.database_url) as s:
        account = make_account(s, name=name)
        register_orders(s, name, ["REAL12345"])
        account_before = _row(s, Account, account.id)
        shipment = s.scalars(select(Shipment).where(Shipment.account_id == account.id)).one()
        shipment_before = _row(s, Shipment, shipment.id)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "worker", "demo", "--duration", "8", "--orders", "3"],
            # No idle time: the demo's own servers stop as it ends.
            env=servers.env(SHIPMON_HOME=str(home), SHIPMON_EMBEDDED_IDLE_TIMEOUT="0"),
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        with transaction(servers.database_url) as s:
            # The real account was neither polled nor paused, and no demo account was left.
            assert _row(s, Account, account.id) == account_before
            assert _row(s, Shipment, shipment.id) == shipment_before
            names = set(s.scalars(select(Account.name)))
            assert not names & {"demo-shop", "demo-market"}
        # The demo kept to a folder of its own and stopped its servers.
        assert {p.name for p in home.iterdir()} == {"demo"}
        assert not (home / "demo" / "postgres" / "postmaster.pid").exists()
        assert "demo" in result.stdout
    finally:
        with transaction(servers.database_url) as s:
            remove_account(s, name)


def _row(s: Session, model: type[Base], row_id: int) -> dict[str, object]:
    """Every column of one row, read afresh from the database."""
    row = s.get(model, row_id, populate_existing=True)
    assert row is not None
    return {c.key: getattr(row, c.key) for c in model.__table__.columns}


def closed_port() -> int:
    with socket.socket() as probe:  # a loopback port just freed: connections are refused
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_demo_turns_pushing_on_and_reports_it() -> None:
    api_port = closed_port()  # no receiver yet: pushes would fail and be given up
    with running_sandbox(faults=Faults(), seed=2) as sandbox:
        assert start_pushing(sandbox.base_url, api_port) is None
        pushes = sandbox.stats()["pushes"]
        assert pushes["url"] == f"http://127.0.0.1:{api_port}/carrier/247/status"
        summary = push_summary(sandbox.base_url, Counter(push=3, poll=5))
    assert "changes by push: [bold cyan]3[/], by poll: [bold]5[/]" in summary
    assert "carrier pushes sent: 0, dropped: 0, failed: 0, given up: 0" in summary


def test_the_demo_goes_on_when_the_sandbox_cannot_push() -> None:
    port = closed_port()
    refusal = start_pushing(f"http://127.0.0.1:{port}", 8000)
    assert refusal is not None and "poll only" in refusal
    assert push_summary(f"http://127.0.0.1:{port}", Counter()).endswith("unknown[/]")
