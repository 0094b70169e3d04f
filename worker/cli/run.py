"""`shipmon run` and `shipmon sandbox`: the whole system and an emulated carrier, locally."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from worker.cli.common import console, err_console, fail, servers, settings
from worker.db import upgrade
from worker.embedded import Servers
from worker.supervisor import Supervisor


def system_env(found: Servers) -> dict[str, str]:
    """The environment for child processes: the servers as URLs, so none starts its own."""
    env = dict(os.environ)
    env.update(
        SHIPMON_DATABASE_URL=found.database_url,
        SHIPMON_REDIS_URL=found.redis_url,
        SHIPMON_BROKER_URL=found.broker_url,
        SHIPMON_SECRET_KEY=found.secret_key,
        SHIPMON_HOME=str(settings().home.resolve()),
    )
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


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(
    concurrency: Annotated[
        int, typer.Option(help="Worker processes polling the carrier.", min=1)
    ] = 2,
) -> None:
    """Run the whole system on this machine: workers and beat (embedded servers if unset)."""
    found = servers()
    upgrade(found.database_url)
    supervisor = Supervisor(system_env(found))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    start_system(supervisor, concurrency, settings().log_level)
    console.print("shipmon is running; press Ctrl-C to stop")
    try:
        name, code = supervisor.wait_any()
        err_console.print(f"[red]the {name} process exited with status {code}; stopping[/]")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        supervisor.stop()


def sandbox(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free port).")] = 8247,
    workload: Annotated[
        Path | None, typer.Option(help="A workload file describing the order population.")
    ] = None,
    speed: Annotated[float, typer.Option(help="How many times faster than real time.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for a reproducible carrier.")] = None,
    populate: Annotated[
        bool, typer.Option(help="Open the workload's accounts and let its orders arrive.")
    ] = False,
) -> None:
    """Serve an emulated 247Express tracking API, faults included, for tests and demos."""
    from worker.sandbox import run_sandbox
    from worker.workload import WorkloadError

    if speed <= 0:
        fail("--speed must be positive")
    try:
        run_sandbox(port=port, workload=workload, speed=speed, seed=seed, populate=populate)
    except (WorkloadError, OSError) as exc:
        fail(str(exc))
