"""How many tracking lookups per second the sandbox serves on one core, against a baseline.

The sandbox runs in a subprocess pinned to one core, with faults off; this process loads
orders through the admin API, then keeps a fixed number of lookups in flight with an aiohttp
client for a fixed time. The baseline, measured the same way in the same run, is a trivial
aiohttp server answering a fixed 2 KB JSON body: the ceiling of the web stack itself.

    uv run python benchmarks/sandbox_throughput.py [--orders 5000] [--seconds 10] [--inflight 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp

from worker.sim.workload import Carrier, default_workload, generate_orders

ROOT = Path(__file__).resolve().parents[1]
TRACKING_PATH = "/api/Order/v1/Tracking"
APIKEY = "1111-1111-1111-1111-111111111"
STATUSES = ["ACCEPTED", "PICKED_UP", "IN_TRANSIT", "DELIVERING", "PENDING_FOR_PROCEED"]

SANDBOX = "from worker.sim.sandbox import run_sandbox; run_sandbox(port=0, seed=1)"
# A fixed answer the size of a real tracking body, served by the same web stack.
BASELINE = f"""
import asyncio
from aiohttp import web
body = b'{{"errorCode":null,"padding":"' + b"x" * 2000 + b'"}}'
async def track(request):
    return web.Response(body=body, content_type="application/json", charset="utf-8")
async def main():
    app = web.Application()
    app.router.add_get("{TRACKING_PATH}", track)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print("Baseline on http://127.0.0.1:%d" % runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@contextlib.contextmanager
def server(code: str, core: int | None) -> Iterator[subprocess.Popen[str]]:
    """A server subprocess, pinned to one core when the machine has more than one."""
    with subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as process:
        try:
            if core is not None:
                os.sched_setaffinity(process.pid, {core})
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    pid: int, url: str, codes: list[str], seconds: float, inflight: int
) -> tuple[float, float, Counter[str]]:
    """Requests/s, and the server's requests per CPU-second (its one-core capacity)."""
    await hammer(url, codes, 1.0, inflight)  # warm up: connections, caches
    cpu = cpu_seconds(pid)
    rate, outcomes = await hammer(url, codes, seconds, inflight)
    used = cpu_seconds(pid) - cpu
    return rate, sum(outcomes.values()) / used, outcomes


def server_url(process: subprocess.Popen[str]) -> str:
    """The base URL a server printed on its first line."""
    assert process.stdout is not None
    banner = process.stdout.readline()
    return banner.split("on ", 1)[1].split()[0]


async def load_orders(base_url: str, count: int) -> list[str]:
    """An account and `count` orders in assorted statuses, through the admin API."""
    rng = random.Random(1)
    codes = [f"BENCH{n:08d}" for n in range(count)]
    async with aiohttp.ClientSession(base_url) as session:
        async with session.put("/_sandbox/faults", json={}) as response:
            response.raise_for_status()
        account = {"name": "bench", "apikey": APIKEY}
        async with session.post("/_sandbox/accounts", json=account) as response:
            response.raise_for_status()
        semaphore = asyncio.Semaphore(16)

        async def add(code: str) -> None:
            body = {"apikey": APIKEY, "order_code": code, "status": rng.choice(STATUSES)}
            async with semaphore, session.post("/_sandbox/orders", json=body) as response:
                response.raise_for_status()

        await asyncio.gather(*(add(code) for code in codes))
    return codes


async def hammer(
    url: str, codes: list[str], seconds: float, inflight: int
) -> tuple[float, Counter[str]]:
    """Lookups per second with `inflight` requests outstanding, and how the answers went."""
    outcomes: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=inflight)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.monotonic() + seconds

        async def worker(offset: int) -> None:
            n = offset
            while time.monotonic() < deadline:
                params = {"ordercode": codes[n % len(codes)], "apikey": APIKEY}
                n += inflight
                async with session.get(url, params=params) as response:
                    body = await response.json()
                    outcomes["ok" if response.status == 200 and not body["errorCode"] else (
                        f"{response.status} {body.get('errorCode')}"
                    )] += 1  # fmt: skip

        started = time.monotonic()
        await asyncio.gather(*(worker(n) for n in range(inflight)))
        elapsed = time.monotonic() - started
    return sum(outcomes.values()) / elapsed, outcomes


def engine_costs(count: int) -> None:
    """CPU cost of the in-process engine: drawing lifecycles, then first and cached bodies."""
    world = Carrier(default_workload(), seed=1)
    world.add_account("bench", APIKEY)
    start = datetime(2026, 3, 2, tzinfo=world.workload.zone)
    arrivals = list(generate_orders(world.workload, start, orders_per_day=count, days=1))
    later = start + timedelta(days=4)
    began = time.process_time()
    for at, _, code in arrivals:
        world.add_order(APIKEY, code, at)
    created = time.process_time()
    for _, _, code in arrivals:
        world.tracking_body(code, later)
    built = time.process_time()
    for _, _, code in arrivals:
        world.tracking_body(code, later)
    cached = time.process_time()
    per = 1e6 / len(arrivals)
    print(f"engine, {len(arrivals)} orders (CPU µs per order): draw lifecycle "
          f"{(created - began) * per:.0f}, first body {(built - created) * per:.0f}, "
          f"cached body {(cached - built) * per:.1f}")  # fmt: skip


async def main(orders: int, seconds: float, inflight: int) -> None:
    cores = sorted(os.sched_getaffinity(0))
    server_core = cores[0] if len(cores) > 1 else None
    if server_core is not None:
        os.sched_setaffinity(0, set(cores[1:]))
    print(f"servers pinned to core {server_core}; client: aiohttp {aiohttp.__version__}, "
          f"{inflight} in flight, {seconds:g} s per run")  # fmt: skip

    engine_costs(orders * 4)
    with server(SANDBOX, server_core) as process:
        base_url = server_url(process)
        started = time.monotonic()
        codes = await load_orders(base_url, orders)
        print(f"loaded {orders} orders through the admin API in {time.monotonic() - started:.1f} s")
        sandbox = await measure(process.pid, base_url + TRACKING_PATH, codes, seconds, inflight)

    with server(BASELINE, server_core) as process:
        baseline = await measure(
            process.pid, server_url(process) + TRACKING_PATH, codes, seconds, inflight
        )

    print("                           req/s   req per server CPU-second (one-core capacity)")
    for name, (rate, capacity, _) in (("sandbox lookups", sandbox), ("baseline 2 KB", baseline)):
        print(f"{name:<24} {rate:8.0f}   {capacity:8.0f}")
    print(
        f"sandbox / baseline       {sandbox[0] / baseline[0]:8.2f}"
        f"   {sandbox[1] / baseline[1]:8.2f}"
    )
    print(f"sandbox answers: {dict(sandbox[2])}")
    print(f"target >= 2000 req/s on one core: {'met' if sandbox[1] >= 2000 else 'NOT met'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--inflight", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.orders, args.seconds, args.inflight))
