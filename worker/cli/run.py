"""`shipmon run` and `shipmon sandbox`: the whole system and an emulated carrier, locally."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import typer

from worker.cli.common import announce, console, err_console, fail, servers, settings

if TYPE_CHECKING:
    from worker.core.servers import EmbeddedServers, Servers
    from worker.runtime.supervisor import Supervisor


def system_env(found: Servers, home: Path | None = None) -> dict[str, str]:
    """The environment for child processes: the servers as URLs, so none starts its own.

    `home`: the state folder they use [default: SHIPMON_HOME].
    """
    home = (home or settings().home).resolve()
    env = dict(os.environ)
    env.update(
        SHIPMON_DATABASE_URL=found.database_url,
        SHIPMON_REDIS_URL=found.redis_url,
        SHIPMON_BROKER_URL=found.broker_url,
        SHIPMON_SECRET_KEY=found.secret_key,
        SHIPMON_HOME=str(home),
    )
    # Prefork workers write their metrics here; `shipmon metrics` serves the sum.
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(home / "metrics"))
    return env


def start_system(supervisor: Supervisor, concurrency: int, loglevel: str) -> None:
    """A worker for polls, a worker for notifications, and the beat."""
    supervisor.celery(
        "worker", "worker", "-Q", "celery,shipmon.polls", "-c", str(concurrency),
        "-n", "polls@%h", "--loglevel", loglevel,
    )  # fmt: skip
    supervisor.celery(
        "notify", "worker", "-Q", "shipmon.notify", "-c", "2", "-n", "notify@%h",
        "--loglevel", loglevel,
    )  # fmt: skip
    supervisor.celery("beat", "beat", "--loglevel", loglevel)


def start_api(supervisor: Supervisor, port: int) -> None:
    """The HTTP API on loopback, beside the workers."""
    supervisor.start("api", [sys.executable, "-m", "worker", "api", "--port", str(port)])


def demo_servers(home: Path) -> tuple[EmbeddedServers, Servers]:
    """The demo's own embedded servers in `home`, emptied of the last demo's state.

    Never the configured servers nor SHIPMON_HOME's own: the demo's accounts and fake keys
    must not meet a real account, and a later `shipmon run` must not find them.
    """
    import redis
    from sqlalchemy import text

    from worker.core.db import get_engine
    from worker.core.servers import EmbeddedServerError, EmbeddedServers

    # Up a while after the demo, like SHIPMON_HOME's, for a look at what it left.
    embedded = EmbeddedServers(
        home, idle_timeout_s=settings().embedded_idle_timeout, announce=announce
    )
    try:
        found = embedded.acquire()
    except EmbeddedServerError as exc:
        fail(str(exc))
    with get_engine(found.database_url).begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    with redis.Redis.from_url(found.redis_url) as client:
        client.flushdb()
    return embedded, found


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(
    concurrency: Annotated[
        int, typer.Option(help="Worker processes polling the carrier.", min=1)
    ] = 2,
) -> None:
    """Run the whole system on this machine: workers and beat (embedded servers if unset)."""
    from worker.core.db import upgrade
    from worker.runtime.supervisor import Supervisor

    found = servers()
    upgrade(found.database_url)
    supervisor = Supervisor(system_env(found))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    start_system(supervisor, concurrency, settings().log_level)
    start_api(supervisor, settings().api_port)
    console.print(
        f"shipmon is running, its HTTP API on http://127.0.0.1:{settings().api_port}/docs; "
        "press Ctrl-C to stop"
    )
    try:
        while True:
            name, code = supervisor.wait_any()
            if not supervisor.restart(name):
                err_console.print(f"[red]the {name} process keeps exiting ({code}); stopping[/]")
                raise typer.Exit(1)
            err_console.print(f"[yellow]the {name} process exited with status {code}; restarted[/]")
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        supervisor.stop()


def sandbox(
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8247,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 inside a container.")
    ] = "127.0.0.1",
    workload: Annotated[
        Path | None, typer.Option(help="A workload file describing the order population.")
    ] = None,
    speed: Annotated[float, typer.Option(help="How many times faster than real time.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for a reproducible carrier.")] = None,
    populate: Annotated[
        bool, typer.Option(help="Open the workload's accounts and let its orders arrive.")
    ] = False,
    start: Annotated[
        str | None,
        typer.Option(
            help="When the carrier's clock starts, ISO 8601 with an offset "
            "(2026-12-03T07:00+07:00) [default: now]."
        ),
    ] = None,
) -> None:
    """Serve an emulated 247Express tracking API, faults included, for tests and demos."""
    from datetime import datetime

    from worker.sim.sandbox import run_sandbox
    from worker.sim.workload import WorkloadError

    if speed <= 0:
        fail("--speed must be positive")
    starts_at = None
    if start is not None:
        try:
            starts_at = datetime.fromisoformat(start)
        except ValueError:
            fail(f"--start {start!r} is not an ISO 8601 time; write it as 2026-12-03T07:00+07:00")
        if starts_at.tzinfo is None:
            fail(f"--start {start!r} has no UTC offset; add one, as in 2026-12-03T07:00+07:00")
    try:
        run_sandbox(
            host=host, port=port, workload=workload, speed=speed, seed=seed,
            populate=populate, start=starts_at,
        )  # fmt: skip
    except (WorkloadError, OSError) as exc:
        fail(str(exc))


def demo(
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds [default: Ctrl-C]")
    ] = None,
    orders: Annotated[int, typer.Option(help="Sample orders per demo account.", min=1)] = 150,
    speed: Annotated[
        float, typer.Option(help="How many times faster the carrier's clock runs.")
    ] = 1200.0,
) -> None:
    """Watch the whole system live: a carrier, sample orders, polls, transitions, webhooks."""
    from datetime import UTC, datetime

    from worker.core.db import dispose_engines, session_factory, upgrade
    from worker.runtime.supervisor import Supervisor
    from worker.sim.demo import (
        Chart,
        DemoView,
        Receiver,
        api_example,
        carrier_morning,
        free_port,
        seed_orders,
        start_pushing,
        start_sandbox,
        watch,
    )
    from worker.sim.workload import default_workload

    home = settings().home / "demo"
    embedded, found = demo_servers(home)
    console.print("starting: the sandbox carrier, a webhook receiver, workers and beat…")
    upgrade(found.database_url)
    morning = carrier_morning(datetime.now(UTC), default_workload().zone)
    sandbox_process, sandbox_url = start_sandbox(speed, seed=247, start=morning)
    receiver = Receiver()
    receiver.start()
    sessions = session_factory(found.database_url)
    env = system_env(found, home) | {
        "SHIPMON_CARRIER_BASE_URL": sandbox_url,
        "SHIPMON_WEBHOOK_ALLOW_PRIVATE": "true",
        # The carrier's clock runs fast; poll often enough to see it move.
        "SHIPMON_MAX_POLL_INTERVAL": "3",
        "SHIPMON_LOG_LEVEL": "WARNING",
    }
    log = home / "demo.log"
    supervisor = Supervisor(env, log=log)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    console.print(f"workers and beat log to {log}")
    try:
        # The workers boot while the sample orders are placed.
        start_system(supervisor, 2, "WARNING")
        api_port = free_port()
        start_api(supervisor, api_port)
        codes = seed_orders(sessions, sandbox_url, receiver, found.secret_key, orders)
        refusal = start_pushing(sandbox_url, api_port)
        if refusal is not None:
            console.print(f"[yellow]{refusal}[/]")
        curl = api_example(sessions, api_port, codes[0])
        console.print(
            f"the HTTP API: http://127.0.0.1:{api_port}/docs; try, while the demo runs:\n  {curl}",
            highlight=False,
            soft_wrap=True,
        )
        view = DemoView(sessions, receiver, sandbox_url=sandbox_url, chart=Chart(speed=speed))
        watch(view, duration)
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.stop()
        sandbox_process.terminate()
        sandbox_process.wait(10)
        dispose_engines()
        embedded.release()
    # Not the URL: its password would stay in the terminal's scrollback. psql asks for it.
    db = urlsplit(found.database_url)
    psql = f"psql -h {db.hostname} -p {db.port} -U {db.username} {db.path.lstrip('/')}"
    example = "SELECT order_code, status, delay_reason, polls_made FROM shipment_overview;"
    # The demo's commands name its home and nothing else: they must not reach the user's servers.
    own = f"SHIPMON_HOME={home}"
    if settings().database_url is not None:
        own = f"env -u SHIPMON_DATABASE_URL -u SHIPMON_REDIS_URL {own}"
    console.print(
        f"\n[bold]What to try next[/] (the demo's state stays in {home} until the next demo)\n"
        f"  query its shipments:   {psql}\n"
        f"    (the password is in {home / 'postgres_password'}; its servers stop "
        f"{settings().embedded_idle_timeout:.0f} s after the last command)\n"
        f"    {example}\n"
        f"  one shipment's story:  {own} uv run shipmon show <ORDER CODE>\n"
        f"  the numbers:           {own} uv run shipmon stats\n"
        "  your own account:      README.md, 'Your own account'\n",
        highlight=False,
        soft_wrap=True,
    )
