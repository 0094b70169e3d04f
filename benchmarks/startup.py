"""How long `shipmon` commands take to start, as a user on the embedded default sees them.

Prints the median wall time of N runs of: `--help`, `--version`, `quota` and `stats` against
embedded servers already up (warm), and `quota` when they are down (cold: it starts them). The
baselines, measured in the same run on the same machine: a bare interpreter, and importing the
libraries `--help` used to load (what every command paid before they were imported lazily).

Runs in a home of its own under a temporary folder, with the bytecode cache in that folder too
(as an installed package has it), and stops its embedded servers at the end.

    uv run python benchmarks/startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from worker.core.servers import WATCHER_PID, EmbeddedServers

EAGER_IMPORTS = "import sqlalchemy, redis, alembic, httpx, aiohttp, numpy, psycopg, typer"


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Seconds one run of `argv` takes; a failing run stops the benchmark."""
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed


def median(
    argv: list[str], env: dict[str, str], runs: int, before: Callable[[], None] | None = None
) -> float:
    """The median of `runs` runs, each after `before` (e.g. stopping the servers)."""
    times = []
    for _ in range(runs):
        if before is not None:
            before()
        times.append(timed(argv, env))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (median)")
    runs = parser.parse_args().runs

    folder = Path(tempfile.mkdtemp(prefix="shipmon-startup-"))
    home = folder / "home"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SHIPMON_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(
        SHIPMON_HOME=str(home),
        SHIPMON_EMBEDDED_IDLE_TIMEOUT="120",
        PYTHONPYCACHEPREFIX=str(folder / "pycache"),
    )
    shipmon = [sys.executable, "-m", "worker"]
    embedded = EmbeddedServers(home)
    try:
        first = timed([*shipmon, "db", "upgrade"], env)
        timed([*shipmon, "--help"], env)  # fills the bytecode cache
        figures = {
            "python -c pass (baseline)": median([sys.executable, "-c", "pass"], env, runs),
            "eager imports (baseline)": median([sys.executable, "-c", EAGER_IMPORTS], env, runs),
            "shipmon --help": median([*shipmon, "--help"], env, runs),
            "shipmon --version": median([*shipmon, "--version"], env, runs),
            "shipmon quota (warm)": median([*shipmon, "quota"], env, runs),
            "shipmon stats (warm)": median([*shipmon, "stats"], env, runs),
            "shipmon quota (cold)": median([*shipmon, "quota"], env, runs, before=embedded.stop),
        }
    finally:
        embedded.stop()
        # The idle watcher the commands started would wait out its timeout for nothing.
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((home / WATCHER_PID).read_text()), signal.SIGTERM)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"first `shipmon db upgrade` on a fresh home (initdb included): {first:.2f} s")
    print(f"median of {runs} runs, load average {os.getloadavg()[0]:.1f}:")
    for name, seconds in figures.items():
        print(f"  {name:28} {seconds:6.3f} s")


if __name__ == "__main__":
    main()
