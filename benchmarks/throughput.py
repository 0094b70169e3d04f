"""Polls applied per second end to end: PostgreSQL, Redis, Celery workers and the sandbox.

Everything runs on this machine. The sandbox (speed 1, faults off) holds --orders orders spread
over --accounts carrier keys, each created in a status of its own, so none moves during the run
and every lookup is a full tracking body. The same orders are registered with shipmon, whose
quota limits are lifted and whose longest poll interval is one second, so shipments keep coming
due. Then `shipmon run --concurrency WORKERS` polls them: after every shipment has been polled
once (the first pass writes its history and events), polls applied per second are read from
PostgreSQL (the sum of the shipments' poll counters) over a window of --seconds. Dispatch
grants one key at most worker.tracking.dispatch.MAX_PER_TICK polls per beat tick (1000 every
2 s, 500/s), so the orders are spread over several keys, as a deployment serving several
merchants would be.

Other work on a shared machine slows every figure down, so the CPU each process spent per poll
is printed too, with what the same cost per poll would give with every core to this run alone.

The baseline, measured in the same run against the same sandbox process, is the sandbox alone:
lookups per second with 32 in flight from a plain aiohttp client (benchmarks/sandbox_throughput).
With --profile-seconds, shipmon's own dispatch and poll tasks then run in this process under
cProfile, and the phases they spend their time in are printed.

    uv run python benchmarks/throughput.py [--orders 4000] [--accounts 3] [--workers 2] \
        [--seconds 30] [--profile-seconds 10] [--database-url URL --redis-url URL]

Without URLs, PostgreSQL and Redis are embedded ones under a temporary SHIPMON_HOME, stopped at
the end. With URLs, a database of its own is created on that PostgreSQL and dropped at the end,
and the given Redis database receives the broker's and the quota limiter's keys. The last line
printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from celery.exceptions import AlwaysEagerIgnored
from sandbox_throughput import (
    APIKEY,
    SANDBOX,
    STATUSES,
    TRACKING_PATH,
    measure,
    server,
    server_url,
)

from worker.carrier.client import CarrierClient
from worker.core.crypto import encrypt
from worker.core.db import dispose_engines, transaction, upgrade
from worker.core.servers import EmbeddedServers
from worker.domain.models import Account
from worker.tracking.intake import register_orders

ROOT = Path(__file__).resolve().parents[1]
TARGET_POLLS_PER_S = 500
# Quotas so large that neither the pace line nor the per-second ceiling ever holds a poll back.
UNLIMITED_QUOTA = 1_000_000_000
BASELINE_INFLIGHT = 32
# The first pass over every shipment must end within this long, or the run is reported as is.
FIRST_PASS_LIMIT_S = 300.0


@dataclass(frozen=True)
class Servers:
    """The servers under test, and the processes to charge their CPU time to (when known)."""

    database_url: str
    redis_url: str
    secret_key: str
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def libpq_url(self) -> str:
        return self.database_url.replace("postgresql+psycopg://", "postgresql://")


@contextlib.contextmanager
def embedded_servers(home: Path) -> Iterator[Servers]:
    """PostgreSQL and Redis under `home`, stopped on exit."""
    embedded = EmbeddedServers(home)
    found = embedded.acquire()
    try:
        postmaster = int((home / "postgres" / "postmaster.pid").read_text().split()[0])
        redis_pid = int((home / "redis" / "redis.pid").read_text().strip())
        yield Servers(
            found.database_url,
            found.redis_url,
            found.secret_key,
            {"postgres": postmaster, "redis": redis_pid},
        )
    finally:
        dispose_engines()
        embedded.release()


@contextlib.contextmanager
def given_servers(database_url: str, redis_url: str) -> Iterator[Servers]:
    """A throwaway database on the given PostgreSQL, dropped on exit, and the given Redis."""
    # libpq's form for psycopg, SQLAlchemy's (driver named) for shipmon.
    libpq_url = "postgresql://" + database_url.split("://", 1)[1]
    name = f"shipmon_bench_{secrets.token_hex(4)}"
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        base = libpq_url.rpartition("/")[0].replace("postgresql://", "postgresql+psycopg://")
        yield Servers(f"{base}/{name}", redis_url, secrets.token_urlsafe(48))
    finally:
        dispose_engines()
        with psycopg.connect(libpq_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def api_key(account: int) -> str:
    """The first account's key is the one the sandbox baseline looks orders up with."""
    return APIKEY if account == 0 else f"{account:04d}-2222-2222-2222-222222222"


async def load_orders(base_url: str, accounts: int, orders: int) -> dict[str, list[str]]:
    """Carrier accounts with unbounded quotas and their orders, through the admin API.

    Orders are spread evenly over the accounts, each in one of assorted open statuses.
    """
    rng = random.Random(1)
    codes = {api_key(a): [f"BENCH{a}{n:07d}" for n in range(a, orders, accounts)]
             for a in range(accounts)}  # fmt: skip
    async with aiohttp.ClientSession(base_url) as session:
        async with session.put("/_sandbox/faults", json={}) as response:
            response.raise_for_status()
        for a, key in enumerate(codes):
            body = {"name": f"bench-{a}", "apikey": key, "daily_quota": UNLIMITED_QUOTA}
            async with session.post("/_sandbox/accounts", json=body) as response:
                response.raise_for_status()
        gate = asyncio.Semaphore(16)

        async def add(key: str, code: str) -> None:
            body = {"apikey": key, "order_code": code, "status": rng.choice(STATUSES)}
            async with gate, session.post("/_sandbox/orders", json=body) as response:
                response.raise_for_status()

        await asyncio.gather(*(add(key, code) for key in codes for code in codes[key]))
    return codes


def register(servers: Servers, codes: dict[str, list[str]]) -> None:
    """The same accounts and orders in shipmon, as `shipmon account add` and `track` do."""
    with transaction(servers.database_url) as session:
        for a, key in enumerate(codes):
            session.add(
                Account(
                    name=f"bench-{a}",
                    api_key_encrypted=encrypt(key, servers.secret_key),
                    api_key_hint=key[-4:],
                )
            )
        session.flush()
        for a, key in enumerate(codes):
            result = register_orders(session, f"bench-{a}", codes[key])
            assert len(result.registered) == len(codes[key]), result.refused


def shipmon_env(servers: Servers, home: Path, carrier_url: str) -> dict[str, str]:
    """The environment of shipmon's processes: these servers, the sandbox, no quota limits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPMON_")}
    env.update(
        SHIPMON_HOME=str(home),
        SHIPMON_DATABASE_URL=servers.database_url,
        SHIPMON_REDIS_URL=servers.redis_url,
        SHIPMON_SECRET_KEY=servers.secret_key,
        SHIPMON_CARRIER_BASE_URL=carrier_url,
        SHIPMON_KEY_DAILY_QUOTA=str(UNLIMITED_QUOTA),
        SHIPMON_GLOBAL_DAILY_QUOTA=str(UNLIMITED_QUOTA),
        SHIPMON_MAX_POLL_INTERVAL="1",
        SHIPMON_LOG_LEVEL="WARNING",
    )
    return env


# --- CPU accounting, from /proc ---


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used) of a live process; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process and its live descendants.

    A descendant that is itself named is charged to its own name only.
    """
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    named = set(roots.values())
    used = {}
    for name, root in roots.items():
        total, pending = 0.0, [root]
        while pending:
            pid = pending.pop()
            total += stats[pid][1] if pid in stats else 0.0
            pending.extend(child for child in children.get(pid, []) if child not in named)
        used[name] = total
    return used


def machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle and iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def shipmon_roots(run_pid: int) -> dict[str, int]:
    """`shipmon run`'s children by role: the polls worker, the notify worker and the beat."""
    roots = {"shipmon run": run_pid}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (stat := _proc_stat(int(entry.name))) is None:
            continue
        if stat[0] != run_pid:
            continue
        argv = (entry / "cmdline").read_bytes().split(b"\0")
        role = ("polls worker" if b"polls@%h" in argv else "notify worker"
                if b"notify@%h" in argv else "beat" if b"beat" in argv else None)  # fmt: skip
        if role is not None:
            roots[role] = int(entry.name)
    return roots


# --- the end-to-end run ---


@dataclass
class Window:
    """What a measured window saw."""

    polls: int
    seconds: float
    lookups: int
    cpu: dict[str, float]
    busy: float
    first_pass_s: float | None
    loadavg: tuple[float, float, float]

    @property
    def polls_per_s(self) -> float:
        return self.polls / self.seconds


def poll_counts(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(polls applied in total, shipments polled at least once)."""
    row = conn.execute(
        "SELECT coalesce(sum(polls_made), 0), count(*) FILTER (WHERE polls_made > 0) FROM shipments"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def sandbox_lookups(base_url: str) -> int:
    """Tracking lookups the sandbox has answered today."""
    import httpx

    return int(httpx.get(f"{base_url}/_sandbox/stats").json()["requests"]["total"])


@contextlib.contextmanager
def shipmon_running(env: dict[str, str], workers: int, log: Path) -> Iterator[int]:
    """`shipmon run --concurrency workers`, stopped (warm) on exit; yields its pid."""
    with log.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--concurrency", str(workers)],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )  # fmt: skip
        try:
            yield process.pid
        finally:
            process.send_signal(signal.SIGTERM)  # it stops its workers and beat itself
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    errors = logged_errors(log)
    if errors:
        print(f"shipmon logged {sum(errors.values())} errors:")
        for message, count in errors.most_common(5):
            print(f"  {count} x {message[:300]}")


def logged_errors(log: Path) -> Counter[str]:
    """The messages of the errors in a log of JSON lines, counted."""
    errors: Counter[str] = Counter()
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = {"level": "ERROR" if "Traceback" in line else "", "message": line}
        if isinstance(record, dict) and record.get("level") in ("ERROR", "CRITICAL"):
            errors[str(record.get("message"))] += 1
    return errors


def run_window(
    servers: Servers, sandbox_pid: int, base_url: str, run_pid: int, orders: int, seconds: float
) -> Window:
    """Wait for the first pass over every shipment, then measure polls applied per second."""
    with psycopg.connect(servers.libpq_url, autocommit=True) as conn:
        started = time.monotonic()
        first_pass_s: float | None = None
        while time.monotonic() - started < FIRST_PASS_LIMIT_S:
            _, polled = poll_counts(conn)
            if polled >= orders:
                first_pass_s = time.monotonic() - started
                break
            time.sleep(0.5)
        print(f"first pass over {orders} shipments: "
              + (f"{first_pass_s:.1f} s" if first_pass_s else "not finished"))  # fmt: skip
        # A few seconds more, so the first pass's last batches and their events are behind us.
        time.sleep(3)
        roots = {**shipmon_roots(run_pid), "sandbox": sandbox_pid, **servers.pids}
        cpu0, busy0, lookups0 = tree_cpu(roots), machine_busy(), sandbox_lookups(base_url)
        polls0, _ = poll_counts(conn)
        t0 = time.monotonic()
        last, last_t = polls0, t0
        while (now := time.monotonic()) < t0 + seconds:
            time.sleep(min(5.0, t0 + seconds - now))
            polls, _ = poll_counts(conn)
            now = time.monotonic()
            print(f"  t={now - t0:5.1f} s  {(polls - last) / (now - last_t):7.0f} polls/s")
            last, last_t = polls, now
        cpu1, busy1, lookups1 = tree_cpu(roots), machine_busy(), sandbox_lookups(base_url)
        elapsed = time.monotonic() - t0
    return Window(
        polls=last - polls0,
        seconds=last_t - t0,
        lookups=lookups1 - lookups0,
        cpu={name: (cpu1[name] - cpu0[name]) / elapsed for name in roots},
        busy=(busy1 - busy0) / elapsed,
        first_pass_s=first_pass_s,
        loadavg=os.getloadavg(),
    )


# --- the profile of one worker process ---

# Where a poll's CPU time goes: (file suffix, function) pairs, summed, per phase. Nested phases
# are indented under the one that contains them.
PHASES: dict[str, list[tuple[str, str]]] = {
    "dispatch: count, grant, claim": [("worker/tracking/dispatch.py", "dispatch")],
    "poll a batch": [("worker/tracking/poller.py", "poll_claim")],
    "  carrier lookups (HTTP client)": [("worker/carrier/client.py", "track")],
    "  lock the shipments": [("worker/tracking/record.py", "lock_shipments")],
    "  apply the answers": [("worker/tracking/record.py", "apply_outcome")],
    "    insert history and scans": [
        ("worker/tracking/record.py", "_record_statuses"),
        ("worker/tracking/record.py", "_record_scans"),
    ],
    "  commit": [("sqlalchemy/orm/session.py", "commit")],
    "anywhere: compile SQL": [("sqlalchemy/sql/elements.py", "_compiler")],
    "anywhere: psycopg execute": [("psycopg/cursor.py", "execute")],
}


def profile_worker(servers: Servers, env: dict[str, str], seconds: float) -> tuple[float, str]:
    """Dispatch ticks and their polls in this process under cProfile: polls/s and a report.

    Celery runs tasks eagerly here, so `shipmon.dispatch` polls its batches inline through the
    very code a worker runs. The profile counts CPU time, so other work on the machine does
    not distort the shares.
    """
    os.environ.update(env)
    import worker.tracking.dispatch
    from worker.runtime.celery import app
    from worker.runtime.tasks import dispatch, process

    app.conf.task_always_eager = True
    # One batch per key per tick, so a profiled tick stays short however slow polling is.
    worker.tracking.dispatch.MAX_PER_TICK = worker.tracking.dispatch.BATCH_SIZE
    profiler = cProfile.Profile(time.process_time)
    with psycopg.connect(servers.libpq_url, autocommit=True) as conn:
        before, _ = poll_counts(conn)
        started, cpu = time.monotonic(), time.process_time()
        while time.monotonic() - started < seconds:
            with warnings.catch_warnings():
                # Eager mode cannot run `send_task` inline; those deliveries wait in Redis.
                warnings.simplefilter("ignore", AlwaysEagerIgnored)
                profiler.runcall(dispatch)
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
        polls = poll_counts(conn)[0] - before
    worker_process = process()
    worker_process.runner.run(worker_process.carrier.aclose())
    worker_process.runner.close()
    entries = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    lines = [f"{polls} polls, {1000 * cpu / polls:.2f} CPU ms per poll (with the profiler's own)",
             f"{'phase':<34} {'CPU ms per poll':>15}"]  # fmt: skip
    for phase, functions in PHASES.items():
        spent = sum(
            ct for (path, _, name), (_, _, _, ct, _) in entries.items()
            if any(path.endswith(suffix) and name == func for suffix, func in functions)
        )  # fmt: skip
        lines.append(f"{phase:<34} {1000 * spent / polls:15.2f}")
    return polls / elapsed, "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    cores = len(os.sched_getaffinity(0))
    transport = CarrierClient("http://127.0.0.1").transport_name
    print(
        f"{cores} cores; load average {os.getloadavg()[0]:.2f}; carrier client: httpx "
        f"{version('httpx')} over {transport} (httpx-aiohttp {version('httpx-aiohttp')})"
    )
    with contextlib.ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shipmon-bench-")))
        servers = stack.enter_context(
            given_servers(args.database_url, args.redis_url)
            if args.database_url
            else embedded_servers(home / "servers")
        )
        upgrade(servers.database_url)
        sandbox = stack.enter_context(server(SANDBOX, None))
        base_url = server_url(sandbox)

        started = time.monotonic()
        codes = asyncio.run(load_orders(base_url, args.accounts, args.orders))
        register(servers, codes)
        print(
            f"{args.orders} orders over {args.accounts} keys loaded into the sandbox and "
            f"registered in {time.monotonic() - started:.1f} s"
        )
        alone, per_cpu_s, outcomes = asyncio.run(
            measure(
                sandbox.pid, base_url + TRACKING_PATH, codes[APIKEY], args.seconds,
                BASELINE_INFLIGHT,
            )
        )  # fmt: skip
        print(
            f"sandbox alone: {alone:.0f} lookups/s ({per_cpu_s:.0f} per sandbox CPU-second); "
            f"answers {dict(outcomes)}"
        )

        env = shipmon_env(servers, home / "shipmon", base_url)
        with shipmon_running(env, args.workers, home / "shipmon-run.log") as run_pid:
            window = run_window(servers, sandbox.pid, base_url, run_pid, args.orders, args.seconds)
        figures = report(args, window, alone, transport, cores)
        if args.profile_seconds:
            rate, phases = profile_worker(servers, env, args.profile_seconds)
            print(f"\none process polling in-line under cProfile: {rate:.0f} polls/s")
            print(phases)
    print(json.dumps(figures))


def report(
    args: argparse.Namespace, window: Window, alone: float, transport: str, cores: int
) -> dict[str, Any]:
    """Print the figures as tables; returns them for the closing JSON line."""
    rate = window.polls_per_s
    print(f"\n{'':<34} {'per second':>10}")
    print(f"{'polls applied, end to end':<34} {rate:10.0f}")
    print(f"{'sandbox lookups meanwhile':<34} {window.lookups / window.seconds:10.0f}")
    print(f"{'sandbox alone (baseline)':<34} {alone:10.0f}")
    print(f"{'end to end / sandbox alone':<34} {rate / alone:10.2f}")

    def per_poll(cores_used: float) -> float:
        return 1000 * cores_used / rate if rate else float("nan")

    print(f"\n{'CPU during the window':<34} {'cores':>6} {'ms per poll':>12}")
    for name, used in sorted(window.cpu.items(), key=lambda item: -item[1]):
        print(f"{name:<34} {used:6.2f} {per_poll(used):12.2f}")
    ours = sum(window.cpu.values())
    shipmon = ours - window.cpu["sandbox"]
    print(f"{'shipmon and its servers':<34} {shipmon:6.2f} {per_poll(shipmon):12.2f}")
    print(f"{'... and the sandbox too':<34} {ours:6.2f} {per_poll(ours):12.2f}")
    if "postgres" not in window.cpu:
        print("(given servers: PostgreSQL's and Redis's CPU is not counted)")
    print(f"{'whole machine (all users)':<34} {window.busy:6.2f}")
    print(f"{'others on this machine':<34} {max(0.0, window.busy - ours):6.2f}")
    # What the same CPU cost per poll would give with every core to this run alone.
    estimate = cores * rate / ours if ours else float("nan")
    print(f"\npolls/s if this run had all {cores} cores to itself (same CPU per poll): "
          f"{estimate:.0f}")  # fmt: skip
    load = " ".join(f"{value:.2f}" for value in window.loadavg)
    print(
        f"load average {load}; transport {transport}; "
        f"{args.workers} worker processes, {args.accounts} keys"
    )
    print(f"target >= {TARGET_POLLS_PER_S} polls/s: "
          f"{'met' if rate >= TARGET_POLLS_PER_S else 'NOT met'}")  # fmt: skip
    return {
        "polls_per_s": round(rate, 1),
        "sandbox_alone_req_per_s": round(alone, 1),
        "transport": transport,
        "workers": args.workers,
        "accounts": args.accounts,
        "orders": args.orders,
        "window_s": round(window.seconds, 1),
        "first_pass_s": round(window.first_pass_s, 1) if window.first_pass_s else None,
        "shipmon_cpu_ms_per_poll": round(per_poll(shipmon), 2),
        "polls_per_s_with_all_cores": round(estimate, 1),
        "loadavg_1m": round(window.loadavg[0], 2),
        "target_met": rate >= TARGET_POLLS_PER_S,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=4000)
    parser.add_argument("--accounts", type=int, default=3, help="carrier keys")
    parser.add_argument("--workers", type=int, default=2, help="polling worker processes")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window")
    parser.add_argument("--profile-seconds", type=float, default=0.0)
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    if bool(args.database_url) != bool(args.redis_url):
        parser.error("give --database-url and --redis-url together")
    # A SIGTERM (from `timeout`, say) unwinds like Ctrl-C, so every server started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main(args)
