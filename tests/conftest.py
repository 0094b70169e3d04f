"""Tests run on real servers: the ones named by SHIPMON_TEST_DATABASE_URL and
SHIPMON_TEST_REDIS_URL when set (CI sets them to the machine's own), else the embedded ones.

Each run gets a database of its own, migrated to head once; each test runs inside a
transaction that is rolled back at the end. Each run also claims a Redis database index of
its own, so runs on one machine do not see each other's keys.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import Connection, create_engine
from sqlalchemy.orm import Session

from worker.core.config import Settings
from worker.core.crypto import encrypt
from worker.core.db import dispose_engines, upgrade
from worker.core.servers import EmbeddedServers
from worker.domain.models import Account

ROOT = Path(__file__).resolve().parent.parent
TEST_SECRET_KEY = "test-secret-key-0123456789-abcdefghijklmnop"
REDIS_CLAIM_KEY = "shipmon:test-run-claim"


@dataclass(frozen=True)
class RunServers:
    database_url: str  # SQLAlchemy form, postgresql+psycopg://
    redis_url: str
    secret_key: str

    @property
    def libpq_url(self) -> str:
        return self.database_url.replace("postgresql+psycopg://", "postgresql://")

    def settings(self, **overrides: object) -> Settings:
        """Settings pointing at the test servers."""
        values: dict[str, object] = {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "secret_key": self.secret_key,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    def env(self, **extra: str) -> dict[str, str]:
        """An environment for subprocesses (worker, beat, CLI) that uses the test servers."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPMON_")}
        env.update(
            SHIPMON_DATABASE_URL=self.database_url,
            SHIPMON_REDIS_URL=self.redis_url,
            SHIPMON_SECRET_KEY=self.secret_key,
            # Any free port: runs on one machine must not race for the API's default one.
            SHIPMON_API_PORT="0",
        )
        env.update(extra)
        return env


def _server_urls() -> tuple[str, str]:
    db = os.environ.get("SHIPMON_TEST_DATABASE_URL")
    rd = os.environ.get("SHIPMON_TEST_REDIS_URL")
    if db and rd:
        return db, rd
    embedded = EmbeddedServers(ROOT / ".shipmon" / "test-servers").acquire()
    return db or embedded.database_url, rd or embedded.redis_url


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def _claim_redis_db(url: str) -> tuple[str, redis.Redis[bytes]]:
    base = url.rsplit("/", 1)[0] if url.count("/") > 2 else url
    for index in range(1, 16):
        client: redis.Redis[bytes] = redis.Redis.from_url(f"{base}/{index}")
        if client.set(REDIS_CLAIM_KEY, os.getpid(), nx=True, ex=3600):
            client.flushdb()
            client.set(REDIS_CLAIM_KEY, os.getpid(), ex=3600)
            return f"{base}/{index}", client
        client.close()
    raise RuntimeError("every Redis database index 1-15 is claimed by another test run")


@pytest.fixture(scope="session")
def servers() -> Iterator[RunServers]:
    db_url, redis_url = _server_urls()
    name = f"shipmon_test_{uuid.uuid4().hex[:10]}"
    admin_url = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    test_db = _with_database(db_url, name)
    if test_db.startswith("postgresql://"):
        test_db = "postgresql+psycopg://" + test_db.removeprefix("postgresql://")
    upgrade(test_db)
    test_redis, claim = _claim_redis_db(redis_url)
    try:
        yield RunServers(test_db, test_redis, TEST_SECRET_KEY)
    finally:
        dispose_engines()
        claim.flushdb()
        claim.close()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def connection_engine(servers: RunServers):  # type: ignore[no-untyped-def]
    engine = create_engine(servers.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def connection(connection_engine) -> Iterator[Connection]:  # type: ignore[no-untyped-def]
    with connection_engine.connect() as conn:
        outer = conn.begin()
        yield conn
        outer.rollback()


@pytest.fixture
def session(connection: Connection) -> Iterator[Session]:
    """A session whose commits become savepoints of a transaction rolled back after the test."""
    with Session(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    ) as s:
        yield s


@pytest.fixture
def redis_client(servers: RunServers) -> Iterator[redis.Redis[bytes]]:
    client: redis.Redis[bytes] = redis.Redis.from_url(servers.redis_url)
    yield client
    # Leave the run's claim; drop everything else the test wrote.
    for key in client.scan_iter():
        if key != REDIS_CLAIM_KEY.encode():
            client.delete(key)
    client.close()


def make_account(
    session: Session,
    name: str | None = None,
    api_key: str | None = None,
    daily_quota: int | None = None,
) -> Account:
    """An account row, flushed, with its key encrypted under the test secret key."""
    api_key = api_key or f"key-{secrets.token_hex(8)}"
    account = Account(
        name=name or f"shop-{secrets.token_hex(4)}",
        api_key_encrypted=encrypt(api_key, TEST_SECRET_KEY),
        api_key_hint=api_key[-4:],
        daily_quota=daily_quota,
    )
    session.add(account)
    session.flush()
    return account
