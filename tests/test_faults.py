"""Faults the fast way: two dispatchers at once, servers that restart under live clients, and
a worker process that exits under `shipmon run`.

The process-level scenarios (workers SIGKILLed, Redis wiped, PostgreSQL restarted under
`shipmon run`, a failing carrier, a troubled receiver) live in benchmarks/faults.py; these are
the parts of them quick enough for every test run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
import redis
from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import RunServers, make_account
from worker.core.db import dispose_engines, session_factory
from worker.core.servers import EmbeddedServers
from worker.domain.models import Account, Shipment
from worker.runtime.supervisor import MAX_RESTARTS, Supervisor
from worker.tracking.dispatch import LEASE, Claim, dispatch

SHIPMENTS = 300
DISPATCHERS = 3
ROUNDS = 4


@pytest.fixture
def sessions(servers: RunServers) -> sessionmaker[Session]:
    return session_factory(servers.database_url)


@pytest.fixture
def account_id(sessions: sessionmaker[Session]) -> Iterator[int]:
    """An account with SHIPMENTS open shipments, committed, deleted afterwards."""
    with sessions.begin() as s:
        account = make_account(s)
        s.add_all(
            Shipment(account_id=account.id, order_code=f"DUO{account.id:05d}{i:06d}")
            for i in range(SHIPMENTS)
        )
        found = account.id
    yield found
    with sessions.begin() as s:
        s.execute(delete(Account).where(Account.id == found))


class Ledger:
    """Grants and refunds from concurrent dispatchers, counted under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.granted = 0
        self.refunded = 0

    def grant(self, session: Session, account_id: int, wanted: int, quota: int) -> int:
        with self.lock:
            self.granted += wanted
        return wanted

    def refund(self, session: Session, account_id: int, polls: int) -> None:
        with self.lock:
            self.refunded += polls


def dispatch_at_once(sessions: sessionmaker[Session], now: datetime, ledger: Ledger) -> list[Claim]:
    """DISPATCHERS dispatch ticks at the same instant, each in its own transaction."""
    start = threading.Barrier(DISPATCHERS)
    claims: list[Claim] = []

    def tick() -> None:
        with sessions.begin() as s:
            start.wait(timeout=10)
            found = dispatch(
                s, now, daily_quota=lambda a: 10**8, grant=ledger.grant, refund=ledger.refund
            )
        with ledger.lock:
            claims.extend(found)

    threads = [threading.Thread(target=tick) for _ in range(DISPATCHERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return claims


def test_concurrent_dispatchers_never_lease_one_shipment_twice(
    sessions: sessionmaker[Session], account_id: int
) -> None:
    # Several beats ticking at the same instant, as two `celery beat` processes would.
    for _ in range(ROUNDS):
        now = datetime.now(UTC)
        with sessions.begin() as s:
            s.execute(
                update(Shipment)
                .where(Shipment.account_id == account_id)
                .values(next_poll_at=now - timedelta(seconds=1))
            )
        ledger = Ledger()
        claims = dispatch_at_once(sessions, now, ledger)

        mine = [c for c in claims if c.account_id == account_id]
        leased = Counter(i for claim in mine for i in claim.shipment_ids)
        assert len(leased) == SHIPMENTS
        assert set(leased.values()) == {1}, "a shipment was leased by two dispatchers"
        # Every grant not turned into a lease went back: no quota spent on nothing.
        assert ledger.granted - ledger.refunded == SHIPMENTS
        with sessions.begin() as s:
            leases = set(
                s.scalars(select(Shipment.next_poll_at).where(Shipment.account_id == account_id))
            )
            assert leases == {c.leased_until for c in mine}
            assert all(until == now + LEASE for until in leases)
            # Within the lease nothing is due, so a later tick polls none of them again.
            later = dispatch(
                s, now + timedelta(seconds=2), daily_quota=lambda a: 10**8,
                grant=Ledger().grant, refund=Ledger().refund,
            )  # fmt: skip
            assert [c for c in later if c.account_id == account_id] == []


def _stop(pid: int, signum: signal.Signals) -> None:
    os.kill(pid, signum)
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.05)


def test_embedded_servers_restart_on_their_ports_and_clients_reconnect(tmp_path: Path) -> None:
    embedded = EmbeddedServers(tmp_path / "home")
    found = embedded.acquire()
    sessions = session_factory(found.database_url)
    client: redis.Redis[bytes] = redis.Redis.from_url(found.redis_url)
    try:
        with sessions.begin() as s:
            assert s.scalar(text("SELECT 1")) == 1
        client.set("shipmon:test", "1")
        # Both stop with clients connected, whose closed connections linger on the ports.
        postmaster = int((embedded.pgdata / "postmaster.pid").read_text().split()[0])
        _stop(postmaster, signal.SIGINT)  # PostgreSQL's fast shutdown
        _stop(int((embedded.redis_dir / "redis.pid").read_text()), signal.SIGTERM)

        again = embedded.acquire()

        assert (again.database_url, again.redis_url) == (found.database_url, found.redis_url)
        # The pooled connection died with the server; the pool replaces it unasked.
        with sessions.begin() as s:
            assert s.scalar(text("SELECT 1")) == 1
        assert client.get("shipmon:test") == b"1"  # the append-only file kept it
    finally:
        client.close()
        dispose_engines()
        embedded.release()
        embedded.stop()


def test_a_child_that_exits_is_restarted_until_it_keeps_exiting() -> None:
    supervisor = Supervisor(env=dict(os.environ))
    supervisor.start("flaky", [sys.executable, "-c", "raise SystemExit(3)"])
    try:
        for _ in range(MAX_RESTARTS):
            assert supervisor.wait_any() == ("flaky", 3)
            assert supervisor.restart("flaky")
        assert supervisor.wait_any() == ("flaky", 3)
        assert not supervisor.restart("flaky")
        assert supervisor.children["flaky"].poll() == 3
    finally:
        supervisor.stop()


RACE = """
import threading, time
import worker.core.metrics as metrics

counter = metrics.Counter

def slow_counter(*args, **kwargs):
    time.sleep(0.05)  # widens the window in which every thread misses the cache
    return counter(*args, **kwargs)

metrics.Counter = slow_counter
start = threading.Barrier(8)
errors = []

def record():
    start.wait()
    try:
        metrics.record_webhook_attempt("succeeded")
    except Exception as error:
        errors.append(error)

threads = [threading.Thread(target=record) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
assert not errors, errors
print(metrics.exposition().decode())
"""


def test_threads_recording_at_once_create_the_metrics_once() -> None:
    # The delivery loop records a webhook's result from several threads; a failed first
    # registration rolled the record back and sent the webhook again.
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", RACE], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert 'shipmon_webhook_attempts_total{result="succeeded"} 8.0' in done.stdout
