"""The HTTP API under load: `GET /v1/shipments/{code}` at 32 connections, and `POST
/v1/shipments` with 10,000 codes, against a real `shipmon api` on 127.0.0.1.

Targets: reads at >= 1,500 requests/s with p95 <= 30 ms and at least half the baseline's rate;
a 10,000-code registration in <= 1 s. The baseline, measured in the same run with the same
load generator and worker count, is the same framework (FastAPI on uvicorn) answering a
constant JSON body of about the same size: the ceiling the API is compared with.

    uv run python benchmarks/api.py --database-url postgresql://postgres@127.0.0.1:5432/postgres \
        --redis-url redis://127.0.0.1:6379/14 --rows 1000000 --workers 2 --seconds 15

A throwaway database is created on the given PostgreSQL (dropped at the end), filled with
`--rows` shipments of one account. The load generator is an aiohttp client in a process of its
own, or wrk (C) when it is installed (`apt-get install wrk`). The last line printed is one JSON
object with the figures. `--fuzz N --rows 1000` instead runs schemathesis against the API's own
OpenAPI with N examples per operation (the test suite runs 30).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
from fastapi import FastAPI, Header, Response

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 32
CODES_PER_POST = 10_000

# The baseline: the framework alone, answering a constant body the size of a show document.
baseline = FastAPI()
CONSTANT: dict[str, Any] = {
    "account": "bench",
    "order_code": "BENCH00000001",
    "current": {f"field_{i}": f"value number {i}" for i in range(40)},
    "statuses": [],
    "scans": [],
    "delays": [],
    "notifications": [],
}


@baseline.get("/constant")
async def constant() -> dict[str, Any]:
    return CONSTANT


def threadpool_variant() -> FastAPI:
    """The alternative design, for comparison: the same statement and the same Redis rate
    counter, on the synchronous engine in FastAPI's threadpool instead of the event loop."""
    import hashlib

    import redis

    from worker.core.db import get_engine
    from worker.ops.document import READ_BY_TOKEN

    engine = get_engine(os.environ["SHIPMON_DATABASE_URL"])

    counter = redis.Redis.from_url(os.environ["SHIPMON_REDIS_URL"])
    app = FastAPI()

    @app.get("/v1/shipments/{order_code}")
    def read(order_code: str, authorization: str = Header()) -> Response:
        digest = hashlib.sha256(authorization.removeprefix("Bearer ").encode()).hexdigest()
        key = f"shipmon:api:rate:{digest[:32]}:{int(time.time())}"
        counter.pipeline(transaction=False).incr(key).expire(key, 2).execute()
        with engine.connect() as conn:
            found = conn.exec_driver_sql(
                READ_BY_TOKEN, {"token_hash": digest, "order_code": order_code}
            ).one()
        return Response(found[1], media_type="application/json")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def database(url: str) -> Iterator[str]:
    """A throwaway database on the given PostgreSQL, dropped on exit; its SQLAlchemy URL."""
    libpq = "postgresql://" + url.split("://", 1)[1]
    name = f"shipmon_apibench_{secrets.token_hex(4)}"
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield (
            libpq.rpartition("/")[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
        )
    finally:
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def fill(database_url: str, secret_key: str, rows: int) -> tuple[str, str]:
    """An account with `rows` shipments and a token; the account name and the token."""
    from worker.api.tokens import create_token
    from worker.core.crypto import encrypt
    from worker.core.db import dispose_engines, transaction, upgrade
    from worker.domain.models import Account

    upgrade(database_url)
    with transaction(database_url) as s:
        s.add(Account(name="bench", api_key_encrypted=encrypt("k", secret_key), api_key_hint="k"))
        s.flush()
        _, token = create_token(s, "bench", "bench")
    libpq = "postgresql://" + database_url.split("://", 1)[1]
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO shipments (account_id, order_code, status, status_id, status_code)"
            " SELECT (SELECT id FROM accounts WHERE name = 'bench'),"
            " 'BENCH' || lpad(g::text, 8, '0'), 'IN_TRANSIT', 24, 'DANGVANCHUYEN'"
            " FROM generate_series(1, %s) g",
            (rows,),
        )
        conn.execute("ANALYZE shipments")
    dispose_engines()
    return "bench", token


def give_history(database_url: str, codes: list[str]) -> None:
    """The codes read get what a poll records: three statuses and two scans each."""
    libpq = "postgresql://" + database_url.split("://", 1)[1]
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO status_events (shipment_id, status, status_id, occurred_at)"
            " SELECT s.id, h.status, h.status_id, now() - h.age FROM shipments s,"
            " (VALUES ('ACCEPTED', 3, interval '3 days'), ('PICKED_UP', 10, interval '2 days'),"
            "  ('IN_TRANSIT', 24, interval '1 day')) h (status, status_id, age)"
            " WHERE s.order_code = ANY(%s) ON CONFLICT DO NOTHING",
            (codes,),
        )
        conn.execute(
            "INSERT INTO tracking_events (shipment_id, fingerprint, status_id, status_name,"
            " post_office_name, province_name, occurred_at)"
            " SELECT s.id, md5(s.id::text || n), 24, 'Đang vận chuyển', 'Bưu cục ' || n,"
            " 'Hồ Chí Minh', now() - n * interval '1 hour'"
            " FROM shipments s, generate_series(1, 2) n"
            " WHERE s.order_code = ANY(%s) ON CONFLICT DO NOTHING",
            (codes,),
        )


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server at {url} exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} did not start")


@contextlib.contextmanager
def serve(argv: list[str], env: dict[str, str], ready_url: str) -> Iterator[None]:
    """A server process, stopped by its own pid at the end."""
    process = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_ready(ready_url, process)
        yield
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the load generator, run as a process of its own ---


async def _load(urls: list[str], headers: dict[str, str], seconds: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        rng = random.Random(1)

        async def one_connection(until: float, record: bool) -> None:
            nonlocal errors
            while time.perf_counter() < until:
                started = time.perf_counter()
                async with session.get(rng.choice(urls)) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                if record:
                    latencies.append(time.perf_counter() - started)

        warm = time.perf_counter() + 2
        await asyncio.gather(*(one_connection(warm, False) for _ in range(CONNECTIONS)))
        began = time.perf_counter()
        await asyncio.gather(*(one_connection(began + seconds, True) for _ in range(CONNECTIONS)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {
        "requests_per_s": round(len(latencies) / elapsed),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
        "non_200": errors,
        "requests": len(latencies),
    }


def load(urls: list[str], headers: dict[str, str], seconds: float) -> dict[str, Any]:
    """Run the load generator in another process, so it never shares a core's time with ours."""
    if shutil.which("wrk"):
        return wrk(urls, headers, seconds)
    spec = json.dumps({"urls": urls, "headers": headers, "seconds": seconds})
    done = subprocess.run(
        [sys.executable, __file__, "--load-generator", spec],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_generator"] = "aiohttp, one process"
    return result


def wrk(urls: list[str], headers: dict[str, str], seconds: float) -> dict[str, Any]:
    """wrk (C), two threads, each request for a path drawn from `urls`."""
    base = urls[0].split("/", 3)
    paths = ", ".join(json.dumps("/" + u.split("/", 3)[3]) for u in urls)
    script = ROOT / ".shipmon" / f"wrk-{os.getpid()}.lua"
    script.parent.mkdir(exist_ok=True)
    script.write_text(
        f"local paths = {{{paths}}}\n"
        "request = function() return wrk.format('GET', paths[math.random(#paths)]) end\n"
        "done = function(summary, latency, requests)\n"
        "  for _, p in ipairs({50, 95, 99}) do\n"
        "    io.write(string.format('P%d %d\\n', p, latency:percentile(p)))\n"
        "  end\n"
        "end\n"
    )
    args = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{int(seconds)}s", "-s", str(script)]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    try:
        out = subprocess.run(
            [*args, "/".join(base[:3])], capture_output=True, text=True, check=True
        ).stdout
    finally:
        script.unlink()
    figures: dict[str, Any] = {"load_generator": "wrk -t2"}
    for line in out.splitlines():
        words = line.split()
        if line.strip().startswith("Requests/sec:"):
            figures["requests_per_s"] = round(float(words[-1]))
        elif len(words) == 2 and words[0] in ("P50", "P95", "P99"):
            figures[f"p{words[0][1:]}_ms"] = round(int(words[1]) / 1000, 2)  # from microseconds
        elif "Non-2xx" in line:
            figures["non_200"] = int(words[-1])
    return figures


def post_codes(api: str, token: str, calls: int) -> list[float]:
    """Seconds per POST of 10,000 new codes."""
    seconds = []
    with httpx.Client(
        base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as client:
        for call in range(calls):
            codes = [f"POST{call:02d}{i:07d}" for i in range(CODES_PER_POST)]
            started = time.perf_counter()
            response = client.post("/v1/shipments", json={"order_codes": codes})
            seconds.append(round(time.perf_counter() - started, 3))
            assert response.status_code == 200, response.text
            assert len(response.json()["registered"]) == CODES_PER_POST
    return seconds


# What the suite's bounded property test checks, here with many more examples.
FUZZ_CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,"
FUZZ_CHECKS += "response_schema_conformance"


def fuzz(api: str, token: str, examples: int) -> int:
    """schemathesis over every operation of the API's own OpenAPI; its exit status."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "schemathesis.cli", "run", f"{api}/openapi.json"),
            *("--max-examples", str(examples), "--checks", FUZZ_CHECKS),
            *("--header", f"Authorization: Bearer {token}", "--phases", "examples,fuzzing"),
        ],
        cwd=ROOT,
        check=False,
    ).returncode


def main(args: argparse.Namespace) -> None:
    secret_key = secrets.token_urlsafe(48)
    with database(args.database_url) as database_url:
        started = time.perf_counter()
        _, token = fill(database_url, secret_key, args.rows)
        print(f"{args.rows:,} shipments in {time.perf_counter() - started:.1f} s", flush=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPMON_")}
        env.update(
            SHIPMON_DATABASE_URL=database_url,
            SHIPMON_REDIS_URL=args.redis_url,
            SHIPMON_SECRET_KEY=secret_key,
            SHIPMON_API_RATE_LIMIT=str(10**9),
            SHIPMON_LOG_LEVEL="WARNING",
        )
        if args.fuzz:
            port = free_port()
            api = f"http://127.0.0.1:{port}"
            shipmon = [sys.executable, "-m", "worker", "api", "--port", str(port)]
            with serve(shipmon, env, f"{api}/healthz"):
                raise SystemExit(fuzz(api, token, args.fuzz))
        codes = [f"BENCH{random.randint(1, args.rows):08d}" for _ in range(1000)]
        give_history(database_url, codes)
        figures: dict[str, Any] = {"rows": args.rows, "workers": args.workers}

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = [sys.executable, "-m", "uvicorn", "--app-dir", "benchmarks", "api:baseline"]
        server += ["--port", str(port), "--workers", str(args.workers), "--log-level", "warning"]
        with serve(server, env, f"{base}/constant"):
            figures["baseline"] = load([f"{base}/constant"], {}, args.seconds)
        print("baseline", figures["baseline"], flush=True)

        port = free_port()
        api = f"http://127.0.0.1:{port}"
        shipmon = [sys.executable, "-m", "worker", "api", "--port", str(port)]
        shipmon += ["--workers", str(args.workers)]
        with serve(shipmon, env, f"{api}/healthz"):
            headers = {"Authorization": f"Bearer {token}"}
            urls = [f"{api}/v1/shipments/{code}" for code in codes]
            figures["get_shipment"] = load(urls, headers, args.seconds)
            print("GET /v1/shipments/{code}", figures["get_shipment"], flush=True)
            figures["post_10000_codes_s"] = post_codes(api, token, args.posts)
            print("POST 10,000 codes, seconds per call", figures["post_10000_codes_s"])
        port = free_port()
        variant = f"http://127.0.0.1:{port}"
        server = [sys.executable, "-m", "uvicorn", "--app-dir", "benchmarks", "--factory"]
        server += ["api:threadpool_variant", "--port", str(port), "--workers", str(args.workers)]
        with serve([*server, "--log-level", "warning"], env, f"{variant}/healthz"):
            urls = [f"{variant}/v1/shipments/{code}" for code in codes]
            figures["get_shipment_threadpool"] = load(urls, headers, args.seconds)
            print("the same in the threadpool", figures["get_shipment_threadpool"], flush=True)
        rate = figures["get_shipment"]["requests_per_s"]
        figures["share_of_baseline"] = round(rate / figures["baseline"]["requests_per_s"], 2)
        figures["load_average"] = [round(x, 2) for x in os.getloadavg()]
        figures["cores"] = os.cpu_count()
        figures["database"] = "shipmon api: one statement on psycopg's async pool, on the loop"
    print(json.dumps(figures))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("SHIPMON_DATABASE_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("SHIPMON_REDIS_URL"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--posts", type=int, default=3)
    parser.add_argument(
        "--fuzz", type=int, metavar="N", help="Instead: schemathesis, N examples per operation."
    )
    parser.add_argument("--load-generator", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.load_generator:
        spec = json.loads(parsed.load_generator)
        print(json.dumps(asyncio.run(_load(spec["urls"], spec["headers"], spec["seconds"]))))
    elif not parsed.database_url or not parsed.redis_url:
        parser.error("give --database-url and --redis-url (or set SHIPMON_DATABASE_URL/REDIS_URL)")
    else:
        main(parsed)
