"""The embedded servers: started once per home, shared, and stopped by the last holder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import redis

from worker.embedded import EmbeddedServers


def test_embedded_servers_are_shared_and_stopped_by_the_last_holder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = EmbeddedServers(home)
    servers = first.acquire()
    try:
        with psycopg.connect(servers.database_url.replace("+psycopg", "")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert redis.Redis.from_url(servers.redis_url).ping()
        # Another process with the same home reuses them and, leaving, does not stop them.
        child = subprocess.run(
            [sys.executable, "-c",
             "import sys; from pathlib import Path; from worker.embedded import EmbeddedServers;"
             "e = EmbeddedServers(Path(sys.argv[1])); print(e.acquire().database_url);"
             "e.release()", str(home)],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        assert child.stdout.strip() == servers.database_url
        with psycopg.connect(servers.database_url.replace("+psycopg", "")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert len((home / "secret_key").read_text().strip()) >= 32
    finally:
        first.release()
    assert first._postgres_port() is None
    assert first._redis_pid() is None
