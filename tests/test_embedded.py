"""The embedded servers: started once per home, shared, stopped by the last holder, and
closed to anyone without the passwords in the home."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest
import redis

from worker.core import servers as embedded_servers
from worker.core.servers import WATCHER_PID, EmbeddedServerError, EmbeddedServers


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
             "import sys; from pathlib import Path;"
             "from worker.core.servers import EmbeddedServers;"
             "e = EmbeddedServers(Path(sys.argv[1])); print(e.acquire().database_url);"
             "e.release()", str(home)],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        assert child.stdout.strip() == servers.database_url
        with psycopg.connect(servers.database_url.replace("+psycopg", "")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert len((home / "secret_key").read_text().strip()) >= 32
        for name in ("secret_key", "postgres_password", "redis_password"):
            assert stat.S_IMODE((home / name).stat().st_mode) == 0o600
        # Without the password, neither server lets a local user in.
        port = first._postgres_port()
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=first._redis_port() or 0).ping()
    finally:
        first.release()
    assert first._postgres_port() is None
    assert first._redis_pid() is None


def test_with_an_idle_timeout_the_servers_outlive_the_last_holder_then_stop(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    started: list[str] = []
    first = EmbeddedServers(home, idle_timeout_s=2.0, announce=started.append)
    try:
        servers = first.acquire()
        # A cold start says what it starts while the user waits.
        assert [what.split()[1] for what in started] == ["embedded", "embedded"]
        assert "PostgreSQL" in started[0] and "Redis" in started[1]
        first.release()
        # The next command finds them up: it starts nothing and gets the same servers.
        restarted: list[str] = []
        again = EmbeddedServers(home, idle_timeout_s=2.0, announce=restarted.append)
        assert again.acquire() == servers
        assert restarted == []
        with psycopg.connect(servers.database_url.replace("+psycopg", "")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        again.release()
        # Once nobody has held them for the timeout, the watcher stops them and leaves.
        watcher = embedded_servers._watchers[-1]
        assert watcher.pid == int((home / WATCHER_PID).read_text())
        assert watcher.wait(timeout=60) == 0
        assert again._postgres_port() is None
        assert again._redis_pid() is None
        assert not (home / WATCHER_PID).exists()
    finally:
        EmbeddedServers(home).stop()


def _read_key_at_once(
    servers: EmbeddedServers, barrier: threading.Barrier, keys: list[str]
) -> None:
    barrier.wait()
    keys.append(servers._private_value("secret_key"))


def test_concurrent_starters_on_fresh_homes_agree_on_one_key(tmp_path: Path) -> None:
    # Each home's files are made by racing threads, without the lock: whoever loses the race
    # reads the winner's file, never a half-written or second one.
    for n in range(20):
        home = tmp_path / f"home{n}"
        home.mkdir()
        starters = [EmbeddedServers(home) for _ in range(8)]
        barrier = threading.Barrier(len(starters))
        keys: list[str] = []
        threads = [
            threading.Thread(target=_read_key_at_once, args=(s, barrier, keys)) for s in starters
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) >= 32
        assert [p.name for p in home.iterdir()] == ["secret_key"]


def test_two_processes_starting_one_fresh_home_share_its_servers_and_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    script = (
        "import json, sys; from pathlib import Path;"
        "from worker.core.servers import EmbeddedServers;"
        "e = EmbeddedServers(Path(sys.argv[1])); s = e.acquire();"
        "print(json.dumps([s.secret_key, s.database_url, s.redis_url])); e.release()"
    )
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(home)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [json.loads(p.communicate(timeout=120)[0]) for p in starters]
    assert all(p.returncode == 0 for p in starters)
    assert outputs[0][0] == outputs[1][0] == (home / "secret_key").read_text()
    assert EmbeddedServers(home)._postgres_port() is None


def test_a_key_file_cut_short_is_refused_with_what_to_do(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret_key").write_text("\n")
    with pytest.raises(EmbeddedServerError, match="delete the file") as info:
        EmbeddedServers(home).acquire()
    assert "secret_key" in str(info.value)
    assert not (home / "postgres").exists()  # refused before any server was started


def test_a_home_made_with_trust_auth_gets_a_password_in_place(tmp_path: Path) -> None:
    home = tmp_path / "home"
    embedded = EmbeddedServers(home)
    found = embedded.acquire()
    with psycopg.connect(found.database_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
    embedded.release()
    # As earlier versions left a home: every local connection trusted, no password file.
    (home / "postgres" / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"
    )
    (home / "postgres_password").unlink()
    again = EmbeddedServers(home)
    upgraded = again.acquire()
    try:
        assert upgraded.database_url != found.database_url  # a new password
        with psycopg.connect(upgraded.database_url.replace("+psycopg", "")) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)
        port = again._postgres_port()
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=5)
    finally:
        again.release()


def test_servers_left_running_open_by_an_earlier_version_are_closed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = EmbeddedServers(home)
    found = first.acquire()
    try:
        # As an earlier version left them running: trust auth, no Redis password.
        (home / "postgres" / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        first._pg_ctl("reload")
        redis.Redis.from_url(found.redis_url).config_set("requirepass", "")
        port, redis_port = first._postgres_port(), first._redis_port() or 0
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres").close()
        assert redis.Redis(port=redis_port).ping()

        # The next start in this home, as by a new shipmon process, closes them.
        assert first.acquire() == found
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port).ping()
        assert redis.Redis.from_url(found.redis_url).ping()
    finally:
        first.release()
