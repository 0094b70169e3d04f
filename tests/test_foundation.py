"""The schema, migrations, settings, encryption and order intake."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from tests.conftest import ROOT, RunServers, make_account
from worker.cli.common import pace_bar
from worker.cli.ops import _timeline
from worker.core.config import ConfigError, Settings, load_settings, mask_url
from worker.core.crypto import SecretKeyMismatch, decrypt, encrypt
from worker.core.db import alembic_config, migrations_folder, upgrade
from worker.core.logs import QUIET_LIBRARIES, configure_logging
from worker.domain.models import Base, Shipment, StatusEvent
from worker.domain.vocabulary import ErrorCode
from worker.ops.heartbeat import HEARTBEAT_KEY, last_tick, record_tick, silence
from worker.tracking.intake import UnknownAccount, register_orders


def test_models_and_migrations_do_not_drift(servers: RunServers) -> None:
    engine = create_engine(servers.database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_migrations_downgrade_to_base_and_back(servers: RunServers) -> None:
    from alembic import command

    name = f"shipmon_mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(servers.libpq_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = servers.database_url.rsplit("/", 1)[0] + "/" + name
    try:
        upgrade(url)
        command.downgrade(alembic_config(url), "base")
        engine = create_engine(url)
        with engine.connect() as conn:
            tables = conn.scalar(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"))
        engine.dispose()
        assert tables == 1  # only alembic_version is left
        upgrade(url)
    finally:
        with psycopg.connect(servers.libpq_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_plain_sql_insert_gives_a_shipment_due_at_once(session: Session) -> None:
    account = make_account(session)
    session.execute(
        text("INSERT INTO shipments (account_id, order_code) VALUES (:a, 'SPX-2024_001')"),
        {"a": account.id},
    )
    row = session.execute(
        text(
            "SELECT active, next_poll_at <= now() AS due, polls_made FROM shipments "
            "WHERE account_id = :a"
        ),
        {"a": account.id},
    ).one()
    assert row.active is True
    assert row.due is True
    assert row.polls_made == 0


@pytest.mark.parametrize(
    "code", ["ABCD", "A" * 21, "ABC DE", "ĐƠNHÀNG1", "ABC'1;--", "ABCDE\x00", "📦📦📦📦📦", ""]
)
def test_database_refuses_malformed_order_codes(session: Session, code: str) -> None:
    account = make_account(session)
    with pytest.raises((IntegrityError, DataError, ValueError)), session.begin_nested():
        session.execute(
            text("INSERT INTO shipments (account_id, order_code) VALUES (:a, :c)"),
            {"a": account.id, "c": code},
        )
    assert session.scalar(select(func.count()).where(Shipment.account_id == account.id)) == 0


def test_recording_the_same_status_history_twice_is_refused(session: Session) -> None:
    account = make_account(session)
    shipment = Shipment(account_id=account.id, order_code="ORDER001")
    session.add(shipment)
    session.flush()
    at = session.scalar(select(func.now()))
    session.add(StatusEvent(shipment_id=shipment.id, status="ACCEPTED", occurred_at=at))
    session.flush()
    with pytest.raises(IntegrityError), session.begin_nested():
        session.add(StatusEvent(shipment_id=shipment.id, status="ACCEPTED", occurred_at=at))
        session.flush()


def test_register_orders_validates_and_is_idempotent(session: Session) -> None:
    account = make_account(session)
    first = register_orders(session, account.name, ["GOOD0001", "BAD", "GOOD0001", "bad code"])
    assert first.registered == ["GOOD0001"]
    assert [(r.order_code, r.error) for r in first.refused] == [
        ("BAD", ErrorCode.ORDERCODE_MIN_LENGTH),
        ("bad code", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ]
    again = register_orders(session, account.name, ["GOOD0001", "GOOD0002"])
    assert again.registered == ["GOOD0002"]
    assert again.already_registered == ["GOOD0001"]
    assert session.scalar(select(func.count()).where(Shipment.account_id == account.id)) == 2


def test_register_orders_for_an_unknown_account_says_how_to_create_it(session: Session) -> None:
    with pytest.raises(UnknownAccount, match="shipmon account add nobody"):
        register_orders(session, "nobody", ["GOOD0001"])


def test_settings_report_every_bad_value_with_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHIPMON_DATABASE_URL", "mysql://db/x")
    monkeypatch.setenv("SHIPMON_QUOTA_TIMEZONE", "Mars/Olympus")
    monkeypatch.setenv("SHIPMON_KEY_DAILY_QUOTA", "-5")
    monkeypatch.setenv("SHIPMON_SMTP_URL", "http://user:hunter2@mail")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    for variable in ("DATABASE_URL", "QUOTA_TIMEZONE", "KEY_DAILY_QUOTA", "SMTP_URL"):
        assert f"SHIPMON_{variable}" in message
    assert "hunter2" not in message


def test_settings_normalise_database_urls_for_psycopg() -> None:
    settings = Settings(
        database_url="postgresql://u@h/db", redis_url="redis://h/0", secret_key="k" * 32
    )
    assert settings.database_url == "postgresql+psycopg://u@h/db"


def test_bad_server_urls_are_reported_without_their_passwords(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHIPMON_DATABASE_URL", "mysql://shipmon:hunter2@db/x")
    monkeypatch.setenv("SHIPMON_REDIS_URL", "http://:swordfish@redis:6379/0")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "hunter2" not in message and "swordfish" not in message
    assert "mysql://***@db/x" in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pa55@hooks.example/in?x=1", "https://***@hooks.example/in?x=1"),
        ("https://token@hooks.example:8443/in", "https://***@hooks.example:8443/in"),
        ("postgresql+psycopg://postgres:pw@127.0.0.1:5432/db", "postgresql+psycopg://***@127.0.0.1:5432/db"),
        ("https://hooks.example/in", "https://hooks.example/in"),
        ("https://user:pw@[::1/in", "(unreadable URL)"),
    ],
)  # fmt: skip
def test_urls_are_shown_without_their_credentials(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize("only", ["SHIPMON_DATABASE_URL", "SHIPMON_REDIS_URL"])
def test_one_server_url_without_the_other_is_refused(
    monkeypatch: pytest.MonkeyPatch, only: str
) -> None:
    monkeypatch.setenv(only, "postgresql://db/x" if "DATABASE" in only else "redis://r/0")
    monkeypatch.setenv("SHIPMON_SECRET_KEY", "k" * 32)
    with pytest.raises(ConfigError, match="set both SHIPMON_DATABASE_URL and SHIPMON_REDIS_URL"):
        load_settings()


def test_an_old_secret_key_shorter_than_a_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPMON_OLD_SECRET_KEYS", "k" * 32 + ",short")
    with pytest.raises(ConfigError, match="SHIPMON_OLD_SECRET_KEYS"):
        load_settings()


def test_secrets_round_trip_and_refuse_a_different_key() -> None:
    token = encrypt("api-key-123", "k" * 32)
    assert "api-key-123" not in token
    assert decrypt(token, "k" * 32) == "api-key-123"
    with pytest.raises(SecretKeyMismatch, match="SHIPMON_SECRET_KEY"):
        decrypt(token, "x" * 32)
    assert decrypt(token, "x" * 32, ["k" * 32]) == "api-key-123"


@pytest.mark.parametrize("key", ["", "short", "k" * 31])
def test_a_short_secret_key_is_refused_before_anything_is_encrypted(key: str) -> None:
    with pytest.raises(ValueError, match="SHIPMON_SECRET_KEY"):
        encrypt("api-key-123", key)


def _shipmon(
    servers: RunServers, *args: str, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=servers.env(**env),
        timeout=60,
    )


def test_cli_adds_an_account_and_tracks_orders(servers: RunServers) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    added = _shipmon(servers, "account", "add", name, "--api-key", "SECRET-KEY-9876")
    assert added.returncode == 0, added.stderr
    duplicate = _shipmon(servers, "account", "add", name, "--api-key", "x")
    assert duplicate.returncode == 2
    assert "already exists" in duplicate.stderr
    tracked = _shipmon(servers, "track", "--account", name, "-", stdin="CLI00001\nNO\nCLI00002\n")
    assert tracked.returncode == 1
    assert "'NO'\tORDERCODE_MIN_LENGTH" in tracked.stdout
    assert "2 registered" in tracked.stderr
    listed = _shipmon(servers, "account", "list", "--json")
    assert "SECRET-KEY-9876" not in listed.stdout
    assert "…9876" in listed.stdout
    rekeyed = _shipmon(servers, "account", "set-key", name, "--api-key", "NEW-KEY-5555")
    assert rekeyed.returncode == 0, rekeyed.stderr
    assert "…5555" in _shipmon(servers, "account", "list", "--json").stdout


def _api_key_shown(servers: RunServers, name: str) -> str:
    listed = json.loads(_shipmon(servers, "account", "list", "--json").stdout)
    return str(next(a["api_key"] for a in listed if a["name"] == name))


def test_api_keys_come_from_standard_input_or_the_environment(servers: RunServers) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    added = _shipmon(servers, "account", "add", name, "--api-key", "-", stdin="STDIN-KEY-4321\n")
    assert added.returncode == 0, added.stderr
    assert _api_key_shown(servers, name) == "…4321"
    env = servers.env(SHIPMON_API_KEY="ENVIRON-KEY-8765")
    rekeyed = subprocess.run(
        [sys.executable, "-m", "worker", "account", "set-key", name],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert rekeyed.returncode == 0, rekeyed.stderr
    assert _api_key_shown(servers, name) == "…8765"
    missing = _shipmon(servers, "account", "set-key", name)
    assert missing.returncode == 2
    assert "--api-key -" in missing.stderr and "SHIPMON_API_KEY" in missing.stderr


def test_a_short_api_key_is_not_hinted_at(servers: RunServers) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    added = _shipmon(servers, "account", "add", name, "--api-key", "-", stdin="SHORT-9876\n")
    assert added.returncode == 0, added.stderr
    shown = _api_key_shown(servers, name)
    assert shown == "(hidden)"


def test_secret_key_is_required_with_configured_servers(servers: RunServers) -> None:
    env = servers.env()
    del env["SHIPMON_SECRET_KEY"]
    result = subprocess.run(
        [sys.executable, "-m", "worker", "account", "list"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "SHIPMON_SECRET_KEY is required" in result.stderr


HEAVY_LIBRARIES = ("sqlalchemy", "redis", "alembic", "httpx", "aiohttp", "numpy", "psycopg")


@pytest.mark.parametrize("option", ["--help", "--version"])
def test_help_and_version_load_no_database_or_network_library(option: str) -> None:
    probe = (
        "import sys\n"
        "from worker.cli import app\n"
        "try:\n"
        f"    app([{option!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print([m for m in {HEAVY_LIBRARIES!r} if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"
    if option == "--version":
        from importlib.metadata import version

        assert result.stdout.startswith(f"shipmon {version('shipmon')}\n")


def test_show_and_stats_say_when_nothing_is_polling(
    servers: RunServers, redis_client: redis.Redis[bytes]
) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    assert _shipmon(servers, "account", "add", name, "--api-key", "KEY-FOR-POLLING").returncode == 0
    assert _shipmon(servers, "track", "--account", name, "IDLE00001").returncode == 0
    redis_client.delete(HEARTBEAT_KEY)
    shown = _shipmon(servers, "show", "IDLE00001")
    assert shown.returncode == 0, shown.stderr
    assert f"IDLE00001 of {name}: not looked up at the carrier yet" in shown.stdout
    assert "nothing is polling: no dispatcher has run yet; start it with `shipmon run`" in (
        shown.stdout
    )
    stats = _shipmon(servers, "stats", "--json")
    assert json.loads(stats.stdout)["polling"] == {"last_dispatch": None, "active": False}

    ticked = datetime.now(UTC)
    record_tick(redis_client, ticked)
    assert "nothing is polling" not in _shipmon(servers, "show", "IDLE00001").stdout
    assert "nothing is polling" not in _shipmon(servers, "stats").stdout
    stats = _shipmon(servers, "stats", "--json")
    assert json.loads(stats.stdout)["polling"] == {
        "last_dispatch": ticked.isoformat(),
        "active": True,
    }


def test_a_dispatcher_silent_for_a_minute_is_reported_and_a_garbled_tick_is_none(
    redis_client: redis.Redis[bytes],
) -> None:
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    assert silence(now - timedelta(seconds=50), now) is None
    note = silence(now - timedelta(minutes=12), now)
    assert note is not None
    assert note.startswith("nothing is polling: the dispatcher last ran 12 min ago")
    for garbled in (b"yesterday", b"2026-12-02T12:00:00", b"9" * 500):
        redis_client.set(HEARTBEAT_KEY, garbled)
        assert last_tick(redis_client) is None


def test_narrow_tables_fold_text_and_never_cut_an_id_or_a_number(servers: RunServers) -> None:
    name = f"cli-narrow-{uuid.uuid4().hex[:6]}"
    added = _shipmon(
        servers,
        "account",
        "add",
        name,
        "--api-key",
        "KEY-NARROW-123456",
        "--daily-quota",
        "2000000",
    )
    assert added.returncode == 0, added.stderr
    for command in ("quota", "stats"):
        shown = _shipmon(servers, command, COLUMNS="60")
        assert shown.returncode == 0, shown.stderr
        # Rich cuts a cell with an ellipsis at its end (a key hint starts with one).
        assert re.search(r"…\s*[│┃]", shown.stdout) is None, shown.stdout
    assert "2,000,000" in _shipmon(servers, "quota", COLUMNS="60").stdout
    assert "2000000" in _shipmon(servers, "account", "list", COLUMNS="60").stdout


def test_help_keeps_no_line_break_of_its_source_and_errors_keep_commands_whole(
    servers: RunServers,
) -> None:
    shown = _shipmon(servers, "untrack", "--help", COLUMNS="200")
    # The docstring breaks this sentence across two source lines.
    assert "polling ends and `shipment.polling_stopped` goes out, with reason" in shown.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "worker", "webhooks", "replay"],
        capture_output=True, text=True, env=servers.env(COLUMNS="40"), timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "give either an event id or --failed-since TIME" in refused.stderr


def test_a_checkout_migrates_from_its_own_migrations_folder() -> None:
    assert migrations_folder() == ROOT / "migrations"


@pytest.mark.skipif(shutil.which("uv") is None, reason="building a wheel needs uv")
def test_an_installed_wheel_carries_its_migrations_and_finds_them(tmp_path: Path) -> None:
    built = subprocess.run(
        ["uv", "build", "--wheel", "--offline", "-o", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("shipmon-*.whl")
    installed = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(installed)
    for migration in (ROOT / "migrations" / "versions").glob("*.py"):
        assert f"worker/migrations/versions/{migration.name}" in names
    # Imported from the unpacked wheel alone, as from site-packages: it finds its own copy.
    found = subprocess.run(
        [sys.executable, "-c",
         "from worker.core.db import migrations_folder; print(migrations_folder())"],
        capture_output=True, text=True, check=True, timeout=60, cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(installed)},
    )  # fmt: skip
    assert Path(found.stdout.strip()) == installed / "worker" / "migrations"


def _json_log_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """The logging setup a test changes, put back afterwards."""
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in QUIET_LIBRARIES}
    handlers, level = root.handlers[:], root.level
    yield
    logging.captureWarnings(False)
    root.handlers[:], root.level = handlers, level
    for name, quiet_level in saved.items():
        logging.getLogger(name).setLevel(quiet_level)


@pytest.mark.usefixtures("restored_logging")
def test_celerys_numeric_loglevel_is_honoured_and_request_lines_are_silenced(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(logging.INFO)  # as Celery passes `--loglevel INFO`
    logging.getLogger("worker.test").debug("below the level")
    logging.getLogger("worker.test").info("polled")
    logging.getLogger("httpx").info('HTTP Request: GET https://carrier/ "HTTP/1.1 200 OK"')
    logging.getLogger("httpx").warning("the carrier's certificate expires soon")
    logging.getLogger("uvicorn.error").info("Application startup complete.")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a deprecated setting", DeprecationWarning, stacklevel=1)
    lines = _json_log_lines(capsys)
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("worker.test", "INFO"),
        ("httpx", "WARNING"),
        ("uvicorn.error", "INFO"),
        ("py.warnings", "WARNING"),
    ]
    assert "a deprecated setting" in lines[-1]["message"]


@pytest.mark.usefixtures("restored_logging")
def test_a_loglevel_of_warning_keeps_info_lines_out(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING")
    logging.getLogger("worker.test").info("not shown")
    logging.getLogger("worker.test").warning("shown")
    assert [line["message"] for line in _json_log_lines(capsys)] == ["shown"]


def test_the_pace_bar_marks_the_pace_line_and_turns_red_ahead_of_it() -> None:
    within = pace_bar(30, 50, 100, width=10)
    assert within == "[green]███[/]··│····"
    ahead = pace_bar(70, 50, 100, width=10)
    assert ahead == "[red]█████│█[/]···"
    assert pace_bar(5, 0, 0) == ""


def test_show_draws_the_statuses_as_a_timeline_with_the_time_spent_in_each() -> None:
    start = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    statuses = [
        {"status": "ACCEPTED", "occurred_at": start.isoformat()},
        {"status": "PICKED_UP", "occurred_at": (start + timedelta(hours=2)).isoformat()},
        {"status": "IN_TRANSIT", "occurred_at": (start + timedelta(days=1, hours=5)).isoformat()},
    ]
    now = start + timedelta(days=1, hours=5, minutes=40)
    assert _timeline(statuses, True, now) == (
        "ACCEPTED [dim]2h 0m[/] → PICKED_UP [dim]1d 3h[/] → IN_TRANSIT [dim]40m[/]"
    )
    assert _timeline(statuses, False, now).endswith("→ IN_TRANSIT")
