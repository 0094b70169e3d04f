"""Carrier pushes applied per second through a real `shipmon api` on 127.0.0.1 and PostgreSQL.

Target: >= 800 pushes/s on a 2-core machine. Each push is a new status (a fresh TransactionId,
a later time, a status drawn from the non-terminal ones) for one of `--rows` registered orders,
authenticated by the account's API key, so each one is verified, recorded, turned into outbox
events and committed. The baseline, measured in the same run with the same load generator and
worker count, is FastAPI on uvicorn reading the same bodies and answering `{"IsError": false}`
without applying them: the ceiling the receiver is compared with.

    uv run python benchmarks/push.py --database-url postgresql://postgres@127.0.0.1:5432/postgres \
        --redis-url redis://127.0.0.1:6379/14 --rows 10000 --workers 2 --seconds 15

The load generator is an aiohttp client at 32 connections in a process of its own. The last
line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from api import ROOT, database, free_port, serve  # benchmarks/api.py: the same servers
from fastapi import FastAPI, Request

CONNECTIONS = 32
PATH = "/carrier/247/status"
STATUSES = ["21", "23", "24", "25", "16", "27"]
OK = {"IsError": False, "ErrorMessage": ""}

baseline = FastAPI()


@baseline.post(PATH)
async def answer_only(request: Request) -> dict[str, Any]:
    await request.body()
    return OK


@baseline.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def fill(database_url: str, secret_key: str, api_key: str, rows: int) -> None:
    """An account whose API key pushes authenticate with, and `rows` registered shipments."""
    from worker.core.crypto import encrypt, keyed_digest
    from worker.core.db import dispose_engines, transaction, upgrade
    from worker.domain.models import Account

    upgrade(database_url)
    with transaction(database_url) as s:
        s.add(
            Account(
                name="bench",
                api_key_encrypted=encrypt(api_key, secret_key),
                api_key_hint=api_key[-4:],
                api_key_digest=keyed_digest(api_key, secret_key),
            )
        )
    libpq = "postgresql://" + database_url.split("://", 1)[1]
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO shipments (account_id, order_code)"
            " SELECT (SELECT id FROM accounts WHERE name = 'bench'),"
            " 'BENCH' || lpad(g::text, 8, '0') FROM generate_series(1, %s) g",
            (rows,),
        )
        conn.execute("ANALYZE shipments")
    dispose_engines()


# --- the load generator, run as a process of its own ---


async def _load(url: str, api_key: str, rows: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(1)
    clock = datetime(2026, 12, 1, tzinfo=UTC)
    sent = 0
    refused = 0

    def body() -> bytes:
        nonlocal clock
        clock += timedelta(milliseconds=1)  # every push is later than the last
        local = (clock + timedelta(hours=7)).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0+07:00"
        push = {
            "ApiKey": api_key,
            "OrderCode": f"BENCH{rng.randint(1, rows):08d}",
            "Status": rng.choice(STATUSES),
            "Description": "Change order status",
            "DelayCode": 0,
            "TransactionId": str(uuid.uuid4()),
            "Time": local,
        }
        return json.dumps(push).encode()

    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one_connection(until: float, record: bool) -> None:
            nonlocal sent, refused
            while time.perf_counter() < until:
                async with session.post(url, data=body()) as response:
                    await response.read()
                    if record:
                        sent += 1
                        refused += response.status != 200

        warm = time.perf_counter() + 2
        await asyncio.gather(*(one_connection(warm, False) for _ in range(CONNECTIONS)))
        began = time.perf_counter()
        await asyncio.gather(*(one_connection(began + seconds, True) for _ in range(CONNECTIONS)))
        elapsed = time.perf_counter() - began
    return {"pushes_per_s": round(sent / elapsed), "pushes": sent, "non_200": refused}


def load(url: str, api_key: str, rows: int, seconds: float) -> dict[str, Any]:
    """Run the load generator in another process, so it never shares a core's time with ours."""
    spec = json.dumps({"url": url, "api_key": api_key, "rows": rows, "seconds": seconds})
    done = subprocess.run(
        [sys.executable, __file__, "--load-generator", spec],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def applied(database_url: str) -> dict[str, int]:
    libpq = "postgresql://" + database_url.split("://", 1)[1]
    with psycopg.connect(libpq) as conn:
        counts = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            for table in ("push_receipts", "status_events", "outbox_events")
        }
    return counts


def main(args: argparse.Namespace) -> None:
    secret_key = secrets.token_urlsafe(48)
    api_key = secrets.token_urlsafe(24)
    with database(args.database_url) as database_url:
        fill(database_url, secret_key, api_key, args.rows)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPMON_")}
        env.update(
            SHIPMON_DATABASE_URL=database_url,
            SHIPMON_REDIS_URL=args.redis_url,
            SHIPMON_SECRET_KEY=secret_key,
            SHIPMON_LOG_LEVEL="WARNING",
        )
        figures: dict[str, Any] = {"rows": args.rows, "workers": args.workers}

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = [sys.executable, "-m", "uvicorn", "--app-dir", "benchmarks", "push:baseline"]
        server += ["--port", str(port), "--workers", str(args.workers), "--log-level", "warning"]
        with serve(server, env, f"{base}/healthz"):
            figures["baseline"] = load(base + PATH, api_key, args.rows, args.seconds)
        print("baseline (answer only)", figures["baseline"], flush=True)

        port = free_port()
        api = f"http://127.0.0.1:{port}"
        shipmon = [sys.executable, "-m", "worker", "api", "--port", str(port)]
        shipmon += ["--workers", str(args.workers)]
        with serve(shipmon, env, f"{api}/healthz"):
            figures["receiver"] = load(api + PATH, api_key, args.rows, args.seconds)
        print("shipmon api (verify, apply, commit)", figures["receiver"], flush=True)
        figures["stored"] = applied(database_url)
        rate = figures["receiver"]["pushes_per_s"]
        figures["share_of_baseline"] = round(rate / figures["baseline"]["pushes_per_s"], 2)
        figures["target_pushes_per_s"] = 800
        figures["load_average"] = [round(x, 2) for x in os.getloadavg()]
        figures["cores"] = os.cpu_count()
    print(json.dumps(figures))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("SHIPMON_DATABASE_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("SHIPMON_REDIS_URL"))
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--load-generator", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_generator:
        spec = json.loads(args.load_generator)
        figures = asyncio.run(_load(spec["url"], spec["api_key"], spec["rows"], spec["seconds"]))
        print(json.dumps(figures))
    else:
        main(args)
