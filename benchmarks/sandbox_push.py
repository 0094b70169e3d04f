"""Whether the sandbox's pushing slows its tracking endpoint: lookups/s with pushing off and on.

The sandbox runs in a subprocess pinned to one core at `--speed` times real time, so its orders
keep changing status; the lookups are the same as in sandbox_throughput.py. The baseline is the
same sandbox in the same run with pushing off, measured before and after the run with pushing on
(so a drift of the world, orders ending, shows); pushing goes to a loopback receiver answering
`{"IsError": false}` at once, with 5 % duplicates and a spread of delays.

    uv run python benchmarks/sandbox_push.py [--orders 5000] [--seconds 5] [--speed 3600]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import aiohttp
from sandbox_throughput import (  # the lookup load of the sandbox's own benchmark
    TRACKING_PATH,
    load_orders,
    measure,
    server,
    server_url,
)

RECEIVER = """
import asyncio
from aiohttp import web
async def receive(request):
    await request.read()
    return web.json_response({"IsError": False, "ErrorMessage": ""})
async def main():
    app = web.Application()
    app.router.add_post("/carrier/247/status", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print("Receiver on http://127.0.0.1:%d" % runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def set_push(base_url: str, settings: dict[str, object]) -> None:
    async with (
        aiohttp.ClientSession(base_url) as session,
        session.put("/_sandbox/push", json=settings) as response,
    ):
        response.raise_for_status()


async def push_counts(base_url: str) -> dict[str, int]:
    async with (
        aiohttp.ClientSession(base_url) as session,
        session.get("/_sandbox/stats") as response,
    ):
        stats = await response.json()
    counts: dict[str, int] = stats["pushes"]
    return counts


async def main(orders: int, seconds: float, inflight: int, speed: float) -> None:
    cores = sorted(os.sched_getaffinity(0))
    server_core = cores[0] if len(cores) > 1 else None
    if server_core is not None:
        os.sched_setaffinity(0, set(cores[1:]))
    print(f"sandbox pinned to core {server_core} at {speed:g}x; {inflight} lookups in flight, "
          f"{seconds:g} s per run")  # fmt: skip
    sandbox = (
        f"from worker.sim.sandbox import run_sandbox; run_sandbox(port=0, seed=1, speed={speed})"
    )
    with server(RECEIVER, None) as receiver, server(sandbox, server_core) as process:
        receiver_url = server_url(receiver) + "/carrier/247/status"
        base_url = server_url(process)
        codes = await load_orders(base_url, orders)
        url = base_url + TRACKING_PATH
        off_before = await measure(process.pid, url, codes, seconds, inflight)
        await set_push(base_url, {"url": receiver_url, "duplicate": 0.05, "delay_s": [60, 900]})
        before = await push_counts(base_url)
        started = time.monotonic()
        on = await measure(process.pid, url, codes, seconds, inflight)
        after = await push_counts(base_url)
        elapsed = time.monotonic() - started
        await set_push(base_url, {"url": None})
        off_after = await measure(process.pid, url, codes, seconds, inflight)

    sent = after["sent"] - before["sent"]
    print("                         lookups/s   lookups per sandbox CPU-second")
    for name, (rate, capacity, _) in (
        ("pushing off (before)", off_before),
        ("pushing on", on),
        ("pushing off (after)", off_after),
    ):
        print(f"{name:<24} {rate:9.0f}   {capacity:9.0f}")
    baseline = (off_before[0] + off_after[0]) / 2
    print(f"pushing on / off         {on[0] / baseline:9.2f}")
    print(f"pushes taken while on: {sent} ({sent / elapsed:.0f}/s), failed: "
          f"{after['failed'] - before['failed']}, answers while on: {dict(on[2])}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--speed", type=float, default=3600.0)
    args = parser.parse_args()
    asyncio.run(main(args.orders, args.seconds, args.inflight, args.speed))
