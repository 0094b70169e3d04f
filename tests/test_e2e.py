"""End to end: `shipmon run` (real Celery worker and beat processes) against the sandbox.

A few hundred orders live their whole lifecycles on a sandbox clock running thousands of times
faster than real time. Every shipment's recorded history must equal the carrier's, terminal
shipments must stop being polled, and every transition must have exactly one outbox event.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from celery import Celery
from sqlalchemy import create_engine, text

from tests.conftest import RunServers
from worker.carrier.parse import parse_tracking

pytestmark = pytest.mark.e2e

ORDERS = 200
SPEED = 20_000.0
DEADLINE_S = 150.0

# A quick population: lifecycles of a few sandbox hours, moving at any hour, always found.
WORKLOAD = Path(__file__).resolve().parent.parent / "benchmarks/workloads/quick-lifecycles.json"


@dataclass
class Sandbox:
    process: subprocess.Popen[str]
    base_url: str


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "sandbox", "--port", "0", "--speed", str(SPEED),
         "--seed", "11", "--workload", str(WORKLOAD)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, f"sandbox did not start: {line!r}"
        yield Sandbox(process, match.group(0))
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture
def system(servers: RunServers, tmp_path: Path, sandbox: Sandbox) -> Iterator[dict[str, str]]:
    env = servers.env(
        SHIPMON_HOME=str(tmp_path / "home"),
        SHIPMON_CARRIER_BASE_URL=sandbox.base_url,
        SHIPMON_MAX_POLL_INTERVAL="1",
        SHIPMON_KEY_DAILY_QUOTA="100000000",
        SHIPMON_GLOBAL_DAILY_QUOTA="100000000",
        SHIPMON_LOG_LEVEL="WARNING",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", "--concurrency", "2"], env=env,
        stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        yield env
    finally:
        process.terminate()  # `shipmon run` stops its worker and beat processes
        process.wait(60)


def test_every_transition_is_recorded_once_and_announced_once(
    request: pytest.FixtureRequest, servers: RunServers, sandbox: Sandbox, system: dict[str, str]
) -> None:
    name = f"e2e-{secrets.token_hex(3)}"
    api_key = f"E2E-{secrets.token_hex(8)}"
    admin = httpx.Client(base_url=sandbox.base_url, timeout=10)
    request.addfinalizer(admin.close)
    admin.post("/_sandbox/accounts", json={"name": name, "apikey": api_key}).raise_for_status()
    codes = [f"E2E{secrets.token_hex(3).upper()}{i:04d}" for i in range(ORDERS)]
    for code in codes:
        admin.post("/_sandbox/orders", json={"apikey": api_key, "order_code": code})

    added = subprocess.run(
        [sys.executable, "-m", "worker", "account", "add", name, "--api-key", api_key],
        env=system, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    # Intake by Celery task name, as a merchant's backend would, with no import of shipmon.
    client = Celery(broker=system["SHIPMON_REDIS_URL"], backend=system["SHIPMON_REDIS_URL"])
    answer = client.send_task("shipmon.register_orders", args=[name, codes]).get(timeout=60)
    assert len(answer["registered"]) == ORDERS
    client.close()

    engine = create_engine(servers.database_url)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        with engine.connect() as conn:
            open_ = conn.scalar(
                text("SELECT count(*) FROM shipments s JOIN accounts a ON a.id = s.account_id "
                     "WHERE a.name = :n AND s.active"), {"n": name})  # fmt: skip
        if open_ == 0:
            break
        assert time.monotonic() < deadline, f"{open_} shipments still open"
        time.sleep(1)

    checked = 0
    with engine.connect() as conn:
        for code in codes:
            truth = admin.get(f"/_sandbox/orders/{code}").json()
            carrier = parse_tracking(json.dumps(truth["tracking"]).encode(), code)
            expected = [(e.status.value if e.status else None, e.time) for e in carrier.statuses]
            recorded = conn.execute(
                text("SELECT e.status, e.occurred_at FROM status_events e "
                     "JOIN shipments s ON s.id = e.shipment_id "
                     "JOIN accounts a ON a.id = s.account_id "
                     "WHERE a.name = :n AND s.order_code = :c ORDER BY e.occurred_at"),
                {"n": name, "c": code},
            ).all()  # fmt: skip
            assert [tuple(r) for r in recorded] == expected, code
            announced = conn.execute(
                text("SELECT o.data FROM outbox_events o JOIN shipments s ON s.id = o.shipment_id "
                     "JOIN accounts a ON a.id = s.account_id WHERE a.name = :n "
                     "AND s.order_code = :c AND o.type = 'shipment.status_changed' "
                     "ORDER BY o.sequence"),
                {"n": name, "c": code},
            ).scalars().all()  # fmt: skip
            names = [d["status"]["name"] for d in announced]
            assert names == [status for status, _ in expected], code
            assert expected[-1][0] in ("DELIVERED", "RETURNED", "LOST", "CANCEL", "CONFISCATED")
            checked += 1
    engine.dispose()
    assert checked == ORDERS


# Imports the app and every task, then reads the configuration as a starting worker does.
IMPORT_THEN_CONFIGURE = """
import json
import worker.core.servers as servers
import worker.runtime.tasks
from worker.celery import app

imported = {"resolved": servers._servers is not None, "configured": app.configured}
print(json.dumps(imported), flush=True)
print(json.dumps({"broker": app.conf.broker_url, "schedule": app.conf.beat_schedule_filename}))
"""


def test_importing_the_app_touches_no_server_until_celery_reads_its_configuration(
    servers: RunServers, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    # A home where nothing runs yet: an import that resolved servers would create it.
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_THEN_CONFIGURE], env=servers.env(SHIPMON_HOME=str(home)),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    imported, configured = (json.loads(line) for line in done.stdout.splitlines())
    assert imported == {"resolved": False, "configured": False}
    assert configured == {
        "broker": servers.redis_url,
        "schedule": str(home / "celerybeat-schedule"),
    }
    assert home.is_dir()
