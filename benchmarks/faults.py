"""Fault scenarios: shipmon loses no transition when the world around it breaks.

Each scenario runs the whole system as a merchant would: `shipmon run` (a polls worker, a notify
worker and beat) on embedded PostgreSQL and Redis under a temporary SHIPMON_HOME, against the
carrier sandbox (served from this process, its clock thousands of times faster than real time)
and a webhook receiver that verifies every Standard Webhooks signature. A hundred orders are
created at the carrier and registered through the Celery task, as a merchant's backend does.
Something breaks mid-run; the scenario then waits until every order has ended and every
transition has been announced, and compares what shipmon recorded and delivered with the
carrier's truth.

    uv run python benchmarks/faults.py
    uv run python benchmarks/faults.py --only redis-wipe --orders 60 --keep

Scenarios: baseline (nothing breaks), sigkill-workers (worker processes SIGKILLed at random),
redis-wipe (Redis stopped, its data deleted, started again), postgres-restart (PostgreSQL
stopped for a few seconds), carrier-faults (10% HTTP 500, 5% timeouts, 2% malformed or HTML
bodies, slow answers), two-beats (a second beat process), webhook-faults (a receiver that hangs,
answers slowly, answers 500 or closes the connection), hostile (a fifth of the carrier's
answers hostile: NUL bytes, over-long text, huge numbers, Unicode digits, deep nesting, wrong
types, duplicated keys, 50 MB bodies and gzip bombs), push (the sandbox pushes every status
change to `shipmon run`'s HTTP API, 20% of them twice, 10% never, late by a delay spread that
reorders them, while polling goes on as the backstop).

Columns: transitions (status entries in the carrier's truth), recorded (of those, found in
status_events), delivered (of those, whose status_changed webhook the receiver accepted), lost,
duplicates (webhooks accepted more than once, always under the same webhook-id), recovery (from
the fault's end to the next transition recorded, or webhook accepted once every transition was
recorded; the longest for repeated faults) and done (from the fault's end, or registration,
until everything was announced). The push scenario also reports what the carrier pushed and the
time from each pushed change at the carrier to its webhook's first arrival at the receiver.
A second table counts carrier lookups: made (seen by the carrier), applied (polls recorded on
shipments), counted (lookups charged to the key's quota in PostgreSQL and in Redis) and how the
worker paced itself after failed lookups. The script exits 1 if any transition was lost or any
check failed; only the servers and processes it started are stopped or killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]
import psycopg
import redis
from aiohttp import web
from celery import Celery
from standardwebhooks import Webhook, WebhookVerificationError

from worker.carrier.errors import CarrierError
from worker.carrier.parse import parse_tracking
from worker.core.db import dispose_engines, upgrade
from worker.core.servers import EmbeddedServers, Servers
from worker.sim.demo import free_port
from worker.sim.sandbox import TRACKING_PATH, SpeedClock, create_app
from worker.sim.workload import Carrier, Faults, parse_workload

# Orders live about half a minute of real time: transitions happen between polls, under the
# faults, not before the first poll.
SPEED = 2_000.0
ACCOUNT = "faults"
# Lifecycles of a few sandbox hours, moving at any hour, always found (shared with the tests).
WORKLOAD: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent / "workloads" / "quick-lifecycles.json").read_text()
)

# The carrier faults of the issue; a timeout holds the connection just past the worker's
# 15-second deadline, so the worker gives up first, as it would with the real carrier.
HEAVY_FAULTS = {
    "http_500": 0.10,
    "timeout": 0.05,
    "malformed": 0.02,
    "slow_ms": [50, 1500],
    "hang_seconds": 16,
}
# Hostile carrier answers (NUL bytes, huge numbers, 50 MB bodies, gzip bombs...); hostile
# webhook receivers join this scenario through its `behaviour`.
HOSTILE_FAULTS = {"hostile": 0.2}
# A lookup of the same order this soon after a failed one would be hammering the carrier.
HAMMER_S = 0.5
# A receiver that hangs holds the request past the worker's 15-second attempt timeout.
RECEIVER_HANG_S = 20.0
RECEIVER_SLOW_S = 2.0
# The carrier's pushes in the push scenario: 20% sent twice, 10% never, late by a lognormal of
# sandbox seconds whose tail (p99 two sandbox hours, about 3.6 s here) reaches past the next
# transition, so some pushes arrive after a later one.
PUSH_FAULTS = {"drop": 0.10, "duplicate": 0.20, "delay_s": [5.0, 7200.0]}
# Carrier event to webhook POST, for pushed changes.
PUSH_MEDIAN_LIMIT_S = 1.0
# PostgreSQL and Redis stay down this long.
DOWNTIME_S = 5.0
# A scenario's outer limit: lost poll tasks wait out their 5-minute lease.
SETTLE_DEADLINE_S = 420.0


def log(message: str) -> None:
    print(f"{datetime.now(UTC):%H:%M:%S} {message}", file=sys.stderr, flush=True)


# --- The carrier ------------------------------------------------------------------------------


@dataclass
class Lookup:
    """One tracking request as the carrier saw it."""

    at: float
    apikey: str
    order_code: str
    failed: bool = True


class CarrierSandbox:
    """The sandbox served from a thread of this process, logging every tracking request."""

    def __init__(self, seed: int) -> None:
        self.world = Carrier(parse_workload(WORKLOAD), seed=seed)
        self.clock = SpeedClock(SPEED)
        self.lookups: list[Lookup] = []
        app = create_app(self.world, self.clock, Faults(), seed=seed)
        app.middlewares.append(self._log)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1
        )
        port = self._run(self._start())
        self.base_url = f"http://127.0.0.1:{port}"
        self.admin = httpx.Client(base_url=self.base_url, timeout=30)

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _start(self) -> int:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return int(self._runner.addresses[0][1])

    @web.middleware
    async def _log(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path != TRACKING_PATH:
            return await handler(request)
        query = {name.lower(): value for name, value in request.query.items()}
        lookup = Lookup(time.monotonic(), query.get("apikey", ""), query.get("ordercode", ""))
        self.lookups.append(lookup)
        response = await handler(request)
        # A lookup failed unless the worker got a tracking result out of it.
        if isinstance(response, web.Response) and response.status == 200 and response.body:
            body = response.body if isinstance(response.body, bytes) else b""
            try:
                parse_tracking(body, lookup.order_code)
                lookup.failed = False
            except CarrierError:
                pass
        return response

    def set_faults(self, faults: dict[str, Any]) -> None:
        self.admin.put("/_sandbox/faults", json=faults).raise_for_status()

    def set_push(self, push: dict[str, Any]) -> None:
        self.admin.put("/_sandbox/push", json=push).raise_for_status()

    def real_time(self, sandbox_at: datetime) -> float:
        """The real epoch second at which the sandbox clock read `sandbox_at`."""
        behind = (self.clock.now() - sandbox_at).total_seconds()
        return time.time() - self.clock.real_seconds(behind)

    def truth(self, order_code: str) -> list[tuple[str | None, datetime | None]]:
        """The order's statuses[] as the carrier reports them: (status, time) in order."""
        tracking = self.admin.get(f"/_sandbox/orders/{order_code}").json()["tracking"]
        result = parse_tracking(json.dumps(tracking).encode(), order_code)
        return [(e.status.value if e.status else None, e.time) for e in result.statuses]

    def close(self) -> None:
        self.admin.close()
        self._run(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


# --- The webhook receiver ----------------------------------------------------------------------

Behaviour = Callable[[str, int], str]
"""(webhook-id, how many times it has arrived) -> ok, slow, hang, 500 or close."""


def always_ok(webhook_id: str, arrival: int) -> str:
    return "ok"


def troubled_first_attempts(webhook_id: str, arrival: int) -> str:
    """Four in ten webhooks meet trouble on their first attempt; every retry is accepted."""
    if arrival > 1:
        return "ok"
    bucket = int(hashlib.sha256(webhook_id.encode()).hexdigest(), 16) % 10
    return {0: "hang", 1: "500", 2: "close", 3: "slow"}.get(bucket, "ok")


class Receiver:
    """A webhook receiver on a free loopback port that verifies every signature."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.secret: str | None = None
        self.arrivals: Counter[str] = Counter()
        # Webhook-id -> when it first arrived (epoch seconds).
        self.first_arrival: dict[str, float] = {}
        # Webhook-id -> how many times it was accepted (answered 2xx).
        self.accepted: Counter[str] = Counter()
        self.bodies: dict[str, dict[str, Any]] = {}
        self.rejected = 0
        self.troubles: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        app = web.Application()
        app.router.add_post("/webhooks", self._handle)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1
        )
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        self.url = f"http://127.0.0.1:{port}/webhooks"

    async def _start(self) -> int:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return int(self._runner.addresses[0][1])

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            assert self.secret is not None, "no secret yet"
            document = Webhook(self.secret).verify(body, dict(request.headers))
        except (AssertionError, WebhookVerificationError):
            self.rejected += 1
            return web.Response(status=400)
        webhook_id = request.headers["webhook-id"]
        self.first_arrival.setdefault(webhook_id, time.time())
        self.arrivals[webhook_id] += 1
        self.bodies[webhook_id] = document
        behaviour = self.behaviour(webhook_id, self.arrivals[webhook_id])
        if behaviour != "ok":
            self.troubles[behaviour] += 1
        if behaviour == "hang":
            await asyncio.sleep(RECEIVER_HANG_S)
            return web.Response(status=504)
        if behaviour == "500":
            return web.Response(status=500, text="receiver broken")
        if behaviour == "close":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)
        if behaviour == "slow":
            await asyncio.sleep(RECEIVER_SLOW_S)
        self.accepted[webhook_id] += 1
        return web.Response(status=204)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


# --- One scenario's system ---------------------------------------------------------------------


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@dataclass
class System:
    """Servers, carrier, receiver and `shipmon run` for one scenario, all started here."""

    folder: Path
    orders: int
    seed: int
    behaviour: Behaviour = always_ok
    embedded: EmbeddedServers = field(init=False)
    servers: Servers = field(init=False)
    carrier: CarrierSandbox = field(init=False)
    receiver: Receiver = field(init=False)
    env: dict[str, str] = field(init=False)
    codes: list[str] = field(default_factory=list)
    apikey: str = ""
    run: subprocess.Popen[bytes] | None = None
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)
    registered_at: float = 0.0
    crashes: list[str] = field(default_factory=list)
    api_port: int = 0

    @property
    def home(self) -> Path:
        return self.folder / "home"

    def start(self) -> None:
        self.embedded = EmbeddedServers(self.home)
        self.servers = self.embedded.acquire()
        self.carrier = CarrierSandbox(self.seed)
        self.receiver = Receiver(self.behaviour)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPMON_")}
        self.env.update(
            SHIPMON_HOME=str(self.home),
            SHIPMON_CARRIER_BASE_URL=self.carrier.base_url,
            SHIPMON_MAX_POLL_INTERVAL="1",
            SHIPMON_KEY_DAILY_QUOTA="100000000",
            SHIPMON_GLOBAL_DAILY_QUOTA="100000000",
            SHIPMON_WEBHOOK_ALLOW_PRIVATE="true",
            SHIPMON_LOG_LEVEL="WARNING",
            SHIPMON_API_PORT=str(self.api_port or free_port()),
        )
        self.apikey = f"FLT-{random.Random(self.seed).getrandbits(64):016x}"
        upgrade(self.servers.database_url)
        # The workers boot while the account and its endpoint are added.
        self.start_run()
        self.cli("account", "add", ACCOUNT, "--api-key", self.apikey)
        added = self.cli(
            "endpoint", "add", ACCOUNT, self.receiver.url,
            "--events", "shipment.status_changed", "--json",
        )  # fmt: skip
        self.receiver.secret = json.loads(added)["secret"]
        self.carrier.admin.post(
            "/_sandbox/accounts", json={"name": ACCOUNT, "apikey": self.apikey}
        ).raise_for_status()

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "worker", *args],
            env=self.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"shipmon {' '.join(args[:2])} failed: {done.stderr}")
        return done.stdout

    def start_run(self) -> None:
        with open(self.folder / "run.log", "ab") as output:
            self.run = subprocess.Popen(
                [sys.executable, "-m", "worker", "run", "--concurrency", "2"],
                env=self.env, stdout=output, stderr=output, start_new_session=True,
            )  # fmt: skip

    def start_beat(self) -> None:
        """A second beat, as a mistaken deployment would run it, with a schedule file of its own."""
        env = self.env | {
            "SHIPMON_DATABASE_URL": self.servers.database_url,
            "SHIPMON_REDIS_URL": self.servers.redis_url,
            "SHIPMON_SECRET_KEY": self.servers.secret_key,
            "SHIPMON_HOME": str(self.folder / "second-beat"),
        }
        argv = [sys.executable, "-m", "celery", "-A", "worker", "beat", "-l", "WARNING"]
        with open(self.folder / "beat2.log", "ab") as output:
            beat = subprocess.Popen(
                argv, env=env, stdout=output, stderr=output, start_new_session=True
            )
        self.extra.append(beat)

    def start_pushing(self, push: dict[str, Any]) -> None:
        """Have the carrier push to `shipmon run`'s HTTP API once it is ready."""
        api = f"http://127.0.0.1:{self.env['SHIPMON_API_PORT']}"

        def ready() -> bool:
            try:
                return httpx.get(f"{api}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        if not self.wait_until(ready, 60):
            raise RuntimeError(f"the HTTP API at {api} never became ready")
        self.carrier.set_push({"url": f"{api}/carrier/247/status", **push})

    def register(self) -> None:
        """Create the orders at the carrier and register them through the Celery task."""
        self.codes = [f"FLT{self.seed:03d}{i:05d}" for i in range(self.orders)]
        for code in self.codes:
            self.carrier.admin.post(
                "/_sandbox/orders", json={"apikey": self.apikey, "order_code": code}
            ).raise_for_status()
        client = Celery(broker=self.servers.redis_url, backend=self.servers.redis_url)
        try:
            answer = client.send_task("shipmon.register_orders", args=[ACCOUNT, self.codes])
            outcome = answer.get(timeout=120)
        finally:
            client.close()
        # A carrier push may have registered an order first.
        registered = outcome["registered"] + outcome["already_registered"]
        if len(registered) != self.orders:
            raise RuntimeError(f"only {len(registered)} of {self.orders} orders registered")
        self.registered_at = time.monotonic()

    # -- processes ------------------------------------------------------------------------------

    def workers(self) -> dict[str, psutil.Process]:
        """The Celery processes `shipmon run` started: polls, notify and beat, by name."""
        assert self.run is not None
        found = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.run.pid).children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    line = " ".join(child.cmdline())
                    for name in ("polls@", "notify@", " beat "):
                        if name in line:
                            found[name.strip(" @")] = child
        return found

    def check_alive(self) -> None:
        if self.run is not None and self.run.poll() is not None:
            self.crashes.append(f"shipmon run exited with status {self.run.returncode}")
            self.run = None

    # -- progress -------------------------------------------------------------------------------

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(
            libpq(self.servers.database_url), autocommit=True, connect_timeout=5
        ) as conn:
            return conn.execute(sql, params).fetchall()

    def open_work(self) -> int | None:
        """Shipments still open plus events not yet announced; None while PostgreSQL is down."""
        try:
            rows = self.query(
                """
                SELECT (SELECT count(*) FROM shipments WHERE active)
                     + (SELECT count(*) FROM outbox_events WHERE fanned_out_at IS NULL)
                     + (SELECT count(*) FROM deliveries WHERE state = 'pending')
                """
            )
        except psycopg.OperationalError:
            return None
        return int(rows[0][0])

    def wait_until(self, ready: Callable[[], bool], limit_s: float) -> bool:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            self.check_alive()
            if ready():
                return True
            time.sleep(0.5)
        return False

    def found_share(self) -> float:
        """The share of orders the carrier has answered for at least once."""
        try:
            rows = self.query("SELECT count(*) FROM shipments WHERE found_at IS NOT NULL")
        except psycopg.OperationalError:
            return 0.0
        return int(rows[0][0]) / max(1, self.orders)

    def settle(self) -> float | None:
        """Wait until nothing is open; when that happened (monotonic), or None on timeout."""
        if self.wait_until(lambda: self.open_work() == 0, SETTLE_DEADLINE_S):
            return time.monotonic()
        return None

    def first_progress_after(self, moment: datetime) -> datetime | None:
        """The first transition recorded at or after `moment`; if every transition had been
        recorded by then, the first webhook accepted after it."""
        rows = self.query(
            """
            SELECT (SELECT min(seen_at) FROM status_events WHERE seen_at >= %(at)s),
                   (SELECT min(completed_at) FROM deliveries
                    WHERE completed_at >= %(at)s AND state = 'succeeded')
            """,
            at=moment,
        )
        transition, webhook = rows[0]
        value = transition if transition is not None else webhook
        return value if isinstance(value, datetime) else None

    # -- stopping -------------------------------------------------------------------------------

    def stop(self) -> None:
        for process in [*self.extra, *([self.run] if self.run is not None else [])]:
            if process.poll() is None:
                process.terminate()  # `shipmon run` stops its own worker and beat processes
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        with contextlib.suppress(Exception):
            self.receiver.close()
        with contextlib.suppress(Exception):
            self.carrier.close()
        dispose_engines()
        self.embedded.release()
        self.embedded.stop()


# --- Faults --------------------------------------------------------------------------------------


@dataclass
class Fault:
    """What a scenario broke: when each fault ended, and anything it noticed."""

    ended: list[datetime] = field(default_factory=list)
    continuous: bool = False
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def no_fault(system: System, rng: random.Random) -> Fault:
    return Fault(continuous=True)


def sigkill_workers(system: System, rng: random.Random) -> Fault:
    """SIGKILL a random task-running worker process every one to three seconds."""
    fault = Fault()
    kinds: Counter[str] = Counter()
    until = time.monotonic() + 40
    while time.monotonic() < until and system.open_work() != 0:
        time.sleep(rng.uniform(1.0, 3.0))
        victims = []
        for name, worker in system.workers().items():
            if name != "beat":
                with contextlib.suppress(psutil.NoSuchProcess):
                    victims += [(name, child) for child in worker.children()]
        if not victims:
            continue
        name, victim = rng.choice(victims)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGKILL)
            kinds[name] += 1
            fault.ended.append(datetime.now(UTC))
    fault.notes.append(
        f"{sum(kinds.values())} SIGKILLs ({kinds['polls']} polls, {kinds['notify']} notify)"
    )
    return fault


def _server_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} did not stop")
        time.sleep(0.05)


def _midway(system: System) -> None:
    """Wait until the carrier has answered for a third of the orders: work is in flight."""
    system.wait_until(lambda: system.found_share() >= 1 / 3, 60)


def redis_wipe(system: System, rng: random.Random) -> Fault:
    """Stop Redis, delete its data (queued tasks, quota counters), start it again."""
    fault = Fault()
    _midway(system)
    redis_dir = system.embedded.redis_dir
    pid = _server_pid(redis_dir / "redis.pid")
    assert pid is not None, "embedded Redis is not running"
    before = dict(_quota_counters(system))
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid)
    for item in redis_dir.iterdir():
        if item.name not in ("port", "redis.log"):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    time.sleep(DOWNTIME_S)
    servers = system.embedded.acquire()
    fault.ended.append(datetime.now(UTC))
    if servers.redis_url != system.servers.redis_url:
        fault.problems.append(
            f"Redis came back at {servers.redis_url}, not {system.servers.redis_url}"
        )
    fault.notes.append(f"counters wiped: {sum(before.values())} lookups forgotten by Redis")
    return fault


def postgres_restart(system: System, rng: random.Random) -> Fault:
    """Stop PostgreSQL (a fast shutdown), leave it down a few seconds, start it again."""
    fault = Fault()
    _midway(system)
    pid = _server_pid(system.embedded.pgdata / "postmaster.pid")
    assert pid is not None, "embedded PostgreSQL is not running"
    os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
    _wait_gone(pid)
    time.sleep(DOWNTIME_S)
    servers = system.embedded.acquire()
    fault.ended.append(datetime.now(UTC))
    if servers.database_url != system.servers.database_url:
        fault.problems.append(
            f"PostgreSQL came back on another port: {servers.database_url}; "
            "the workers still have the old one"
        )
        system.servers = servers
    return fault


def carrier_faults(system: System, rng: random.Random) -> Fault:
    return Fault(continuous=True, notes=["faults on from the first lookup"])


def two_beats(system: System, rng: random.Random) -> Fault:
    return Fault(continuous=True, notes=["second beat from the start"])


def webhook_faults(system: System, rng: random.Random) -> Fault:
    return Fault(continuous=True)


def hostile(system: System, rng: random.Random) -> Fault:
    return Fault(continuous=True, notes=["hostile carrier answers from the first lookup"])


def pushes(system: System, rng: random.Random) -> Fault:
    return Fault(continuous=True, notes=["carrier pushes from the first status"])


@dataclass(frozen=True)
class Scenario:
    name: str
    inject: Callable[[System, random.Random], Fault]
    behaviour: Behaviour = always_ok
    before: Callable[[System], None] | None = None
    # Nothing kills a poll midway, so every lookup made must have been applied exactly once:
    # a lookup never applied means a shipment was polled twice under one lease.
    exact_polls: bool = True
    # The longest wait allowed from the fault's end to the next transition or webhook.
    max_recovery_s: float | None = None
    # Whether the carrier pushes (and the push figures are measured and judged).
    push: bool = False


SCENARIOS = [
    Scenario("baseline", no_fault),
    Scenario("sigkill-workers", sigkill_workers, exact_polls=False, max_recovery_s=30),
    Scenario("redis-wipe", redis_wipe, exact_polls=False, max_recovery_s=30),
    Scenario("postgres-restart", postgres_restart, exact_polls=False, max_recovery_s=30),
    Scenario("carrier-faults", carrier_faults, before=lambda s: s.carrier.set_faults(HEAVY_FAULTS)),
    Scenario("two-beats", two_beats, before=System.start_beat),
    Scenario("webhook-faults", webhook_faults, behaviour=troubled_first_attempts),
    Scenario("hostile", hostile, before=lambda s: s.carrier.set_faults(HOSTILE_FAULTS)),
    Scenario("push", pushes, before=lambda s: s.start_pushing(PUSH_FAULTS), push=True),
]


def judge(scenario: Scenario, result: Result) -> None:
    """The scenario's own promises, on top of the checks every scenario makes."""
    if scenario.exact_polls and result.lookups != result.applied:
        result.problems.append(
            f"{result.lookups - result.applied} lookups never applied: polled twice in a lease"
        )
    if result.hammering:
        result.problems.append(f"{result.hammering} lookups within {HAMMER_S} s of a failure")
    limit = scenario.max_recovery_s
    if limit is not None and (result.recovery_s is None or result.recovery_s > limit):
        result.problems.append(f"no progress within {limit:.0f} s of the fault's end")
    if scenario.push:
        if result.push_median_s is None:
            result.problems.append("no change came by push")
        elif result.push_median_s > PUSH_MEDIAN_LIMIT_S:
            result.problems.append(
                f"median pushed change to webhook {result.push_median_s:.2f} s "
                f"(limit {PUSH_MEDIAN_LIMIT_S:.0f} s)"
            )


# --- Measuring -----------------------------------------------------------------------------------


def _quota_counters(system: System) -> dict[str, int]:
    client: redis.Redis[bytes] = redis.Redis.from_url(system.servers.redis_url, socket_timeout=5)
    try:
        return {
            key.decode(): int(client.get(key) or 0)
            for key in client.scan_iter(match="shipmon:quota:????-??-??:key:*")
        }
    finally:
        client.close()


@dataclass
class Result:
    scenario: str
    transitions: int = 0
    recorded: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    recovery_s: float | None = None
    done_s: float | None = None
    lookups: int = 0
    applied: int = 0
    counted_pg: int = 0
    counted_redis: int = 0
    failed_lookups: int = 0
    hammering: int = 0
    min_gap_after_failure_s: float | None = None
    regressions: int = 0
    push_median_s: float | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def measure(system: System, fault: Fault, settled_at: float | None, result: Result) -> None:
    """Compare what shipmon recorded and delivered with the carrier's truth."""
    if settled_at is None:
        result.problems.append(f"not settled within {SETTLE_DEADLINE_S:.0f} s")
    recorded_rows: dict[str, list[tuple[str, datetime]]] = {}
    for code, status, at in system.query(
        "SELECT s.order_code, e.status, e.occurred_at FROM status_events e "
        "JOIN shipments s ON s.id = e.shipment_id ORDER BY e.occurred_at"
    ):
        recorded_rows.setdefault(code, []).append((status, at))
    announced: dict[str, list[tuple[str, str]]] = {}
    announced_times: dict[str, list[str]] = {}
    for code, event_id, data in system.query(
        "SELECT s.order_code, o.event_id, o.data FROM outbox_events o "
        "JOIN shipments s ON s.id = o.shipment_id "
        "WHERE o.type = 'shipment.status_changed' ORDER BY o.sequence"
    ):
        announced.setdefault(code, []).append((event_id, data["status"]["name"]))
        announced_times.setdefault(code, []).append(data["event_time"])

    corrupt = 0
    for code in system.codes:
        truth = system.carrier.truth(code)
        result.transitions += len(truth)
        recorded = recorded_rows.get(code, [])
        events = announced.get(code, [])
        corrupt += len(set(recorded) - set(truth))
        if [name for _, name in events] != [status for status, _ in truth]:
            corrupt += 1
        result.regressions += _regressions(announced_times.get(code, []))
        for index, entry in enumerate(truth):
            was_recorded = entry in recorded
            result.recorded += was_recorded
            event_id = events[index][0] if index < len(events) else None
            accepted = system.receiver.accepted[event_id] if event_id else 0
            result.delivered += accepted > 0
            result.duplicates += max(0, accepted - 1)
            result.lost += not (was_recorded and accepted > 0)
    if corrupt:
        result.problems.append(f"{corrupt} recorded rows or announcements differ from the truth")
    if result.regressions:
        result.problems.append(f"{result.regressions} announcements moved a shipment back")
    # Two different webhook-ids announcing one shipment's same event would be a duplicate the
    # receiver cannot recognise.
    keys = Counter(
        (b["data"]["order_code"], b["data"]["sequence"]) for b in system.receiver.bodies.values()
    )
    if any(n > 1 for n in keys.values()):
        result.problems.append("one event arrived under two webhook-ids")
    if system.receiver.rejected:
        result.problems.append(f"{system.receiver.rejected} webhooks failed verification")

    lookups = [lk for lk in system.carrier.lookups if lk.apikey == system.apikey]
    result.lookups = len(lookups)
    result.applied = int(system.query("SELECT coalesce(sum(polls_made), 0) FROM shipments")[0][0])
    result.counted_pg = int(system.query("SELECT coalesce(sum(used), 0) FROM quota_usage")[0][0])
    result.counted_redis = sum(_quota_counters(system).values())
    if result.counted_pg < result.lookups:
        result.problems.append("lookups the quota in PostgreSQL did not count")
    if result.counted_redis < result.lookups:
        result.problems.append("lookups the quota in Redis did not count")
    _pacing(lookups, result)

    if fault.ended:
        gaps = []
        for ended in fault.ended:
            progress = system.first_progress_after(ended)
            if progress is not None:
                gaps.append((progress - ended).total_seconds())
        result.recovery_s = max(gaps) if gaps else None
    start = (
        system.registered_at
        if not fault.ended
        else time.monotonic() - (datetime.now(UTC) - fault.ended[-1]).total_seconds()
    )
    if settled_at is not None:
        result.done_s = settled_at - start
    result.notes += fault.notes + system.crashes
    restarted = (system.folder / "run.log").read_text(errors="replace").count("; restarted")
    if restarted:
        result.notes.append(f"shipmon run restarted {restarted} exited worker or beat processes")
    result.problems += fault.problems
    if system.crashes:
        result.problems.append("a process exited")


def _regressions(event_times: list[str]) -> int:
    """Announcements, in their order, of a change older than the one announced before."""
    times = [datetime.fromisoformat(at) for at in event_times]
    return sum(later < earlier for earlier, later in itertools.pairwise(times))


def measure_pushes(system: System, result: Result) -> None:
    """What the carrier pushed, and how soon each pushed change reached the receiver."""
    pushed = system.carrier.admin.get("/_sandbox/stats").json()["pushes"]
    delays, received, sent = [], [], []
    sources: Counter[str] = Counter()
    for webhook_id, body in system.receiver.bodies.items():
        data = body["data"]
        sources[data["source"]] += 1
        if data["source"] == "push":
            happened = system.carrier.real_time(datetime.fromisoformat(data["event_time"]))
            seen = datetime.fromisoformat(data["seen_at"]).timestamp()
            arrived = system.receiver.first_arrival[webhook_id]
            delays.append(arrived - happened)
            received.append(seen - happened)
            sent.append(arrived - seen)
    if delays:
        result.push_median_s = statistics.median(delays)
        result.notes.append(
            f"carrier event to webhook for pushed changes: median {result.push_median_s:.3f} s, "
            f"p95 {_quantile(delays, 0.95):.3f} s (event to applied: median "
            f"{statistics.median(received):.3f} s, p95 {_quantile(received, 0.95):.3f} s; "
            f"applied to webhook: median {statistics.median(sent):.3f} s, "
            f"p95 {_quantile(sent, 0.95):.3f} s)"
        )
    result.notes.append(
        f"changes announced by push {sources['push']}, by poll {sources['poll']}; the carrier "
        f"pushed {pushed['sent']}, duplicated {pushed['duplicated']}, dropped "
        f"{pushed['dropped']}, retried {pushed['retried']}, gave up {pushed['given_up']}"
    )


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _pacing(lookups: list[Lookup], result: Result) -> None:
    """Count failed lookups and how soon the same order was asked again after each."""
    by_order: dict[str, list[Lookup]] = {}
    for lookup in lookups:
        by_order.setdefault(lookup.order_code, []).append(lookup)
    gaps = []
    for series in by_order.values():
        series.sort(key=lambda lk: lk.at)
        for failed, after in itertools.pairwise(series):
            if failed.failed:
                gaps.append(after.at - failed.at)
    result.failed_lookups = sum(lk.failed for lk in lookups)
    result.hammering = sum(gap < HAMMER_S for gap in gaps)
    result.min_gap_after_failure_s = min(gaps) if gaps else None


def run_scenario(scenario: Scenario, root: Path, orders: int, seed: int) -> Result:
    result = Result(scenario.name)
    folder = root / scenario.name
    folder.mkdir(parents=True)
    system = System(folder, orders, seed, scenario.behaviour)
    rng = random.Random(seed)
    log(f"{scenario.name}: starting")
    try:
        system.start()
        if scenario.before is not None:
            scenario.before(system)
        system.register()
        log(f"{scenario.name}: {orders} orders registered")
        fault = scenario.inject(system, rng)
        settled_at = system.settle()
        log(f"{scenario.name}: {'settled' if settled_at else 'NOT settled'}; measuring")
        measure(system, fault, settled_at, result)
        if scenario.push:
            measure_pushes(system, result)
        judge(scenario, result)
        if system.receiver.troubles:
            result.notes.append(f"receiver troubles: {dict(system.receiver.troubles)}")
    except Exception as error:  # a scenario that cannot finish is reported, not fatal
        result.problems.append(f"{type(error).__name__}: {error}")
        result.lost = result.transitions or -1
    finally:
        system.stop()
    log(f"{scenario.name}: {'ok' if not result.problems else '; '.join(result.problems)}")
    return result


# --- Report --------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def print_tables(results: list[Result]) -> None:
    head = ("scenario", "transitions", "recorded", "delivered", "lost", "duplicates",
            "recovery", "done")  # fmt: skip
    rows = [
        (r.scenario, str(r.transitions), str(r.recorded), str(r.delivered), str(r.lost),
         str(r.duplicates), _seconds(r.recovery_s), _seconds(r.done_s))
        for r in results
    ]  # fmt: skip
    _table(head, rows)
    print()
    head = ("scenario", "lookups", "applied", "counted pg", "counted redis", "failed",
            "re-asked <0.5 s", "min gap after failure")  # fmt: skip
    rows = [
        (r.scenario, str(r.lookups), str(r.applied), str(r.counted_pg), str(r.counted_redis),
         str(r.failed_lookups), str(r.hammering), _seconds(r.min_gap_after_failure_s))
        for r in results
    ]  # fmt: skip
    _table(head, rows)
    print()
    for r in results:
        verdict = "ok" if not r.problems else "FAILED: " + "; ".join(r.problems)
        notes = f" ({'; '.join(r.notes)})" if r.notes else ""
        print(f"{r.scenario}: {verdict}{notes}")


def _table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=100, help="orders per scenario")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--only", action="append", choices=[s.name for s in SCENARIOS], help="run only these"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scenarios' folders")
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so every server and process started here is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    root = Path(tempfile.mkdtemp(prefix="shipmon-faults-"))
    log(f"scenario folders (logs) under {root}")
    results = []
    try:
        for index, scenario in enumerate(chosen):
            results.append(run_scenario(scenario, root, args.orders, args.seed + index))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_tables(results)
    median_done = statistics.median([r.done_s for r in results if r.done_s is not None] or [0])
    print(f"\nmedian time to settle after a fault: {median_done:.1f} s")
    return 1 if any(r.problems or r.lost for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
