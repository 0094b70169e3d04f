"""No secret leaks: after a full run at DEBUG, no API key, webhook secret or SMTP password
appears in any log line, exception, command output, metric, webhook or email.

`shipmon run` (real worker and beat processes, DEBUG logs captured) polls a sandbox carrier that
fails now and then, delivers signed webhooks to a real receiver and emails through a real SMTP
server that takes a password over STARTTLS. Every output is then scanned for each secret in
every form it could be written in (as is, URL-encoded, JSON-escaped, the secret's base64 body).
The run is checked to have used each secret, so a scan of nothing cannot pass.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword
from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import Engine, create_engine, text
from typer.testing import CliRunner

from tests import test_mail
from tests.conftest import RunServers
from tests.test_e2e import WORKLOAD
from tests.test_outbox import Receiver
from worker.cli import app
from worker.core.config import get_settings
from worker.sim.sandbox import running_sandbox
from worker.sim.workload import Faults, load_workload

pytestmark = pytest.mark.e2e

tls = test_mail.tls
free_port = test_mail.free_port

ORDERS = 5
SPEED = 20_000.0
DEADLINE_S = 120.0
SMTP_USER = "shipmon-mailer"


def forms(secret: str) -> set[str]:
    """Every way a secret could be written out: as is, URL-encoded, JSON-escaped, its body."""
    found = {secret, quote(secret, safe=""), json.dumps(secret)[1:-1]}
    if secret.startswith("whsec_"):
        found.add(secret.removeprefix("whsec_"))
    return found


@dataclass
class Mailbox:
    """An SMTP server's inbox that accepts one login: SMTP_USER with `password`."""

    password: str
    raw: list[bytes] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.raw.append(envelope.content)
        return "250 OK"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login = (data.login.decode(), data.password.decode())
        self.logins.append(login)
        return AuthResult(success=login == (SMTP_USER, self.password))


class RawReceiver(Receiver):
    """The outbox tests' verifying receiver, keeping every request's headers and body too."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        super().__init__()

    async def _handle(self, request: web.Request) -> web.Response:
        self.raw.append(repr(dict(request.headers)).encode() + await request.read())
        return await super()._handle(request)


@pytest.fixture
def receiver() -> Iterator[RawReceiver]:
    started = RawReceiver()
    yield started
    started.close()


@pytest.fixture
def mailbox(tls: Any) -> Iterator[tuple[Mailbox, int]]:
    server_context, _ = tls
    box = Mailbox(password=f"smtp p@ss {secrets.token_urlsafe(12)}")
    port = free_port()
    controller = Controller(
        box, hostname="127.0.0.1", port=port, authenticator=box.authenticate,
        tls_context=server_context, require_starttls=True,
    )  # fmt: skip
    controller.start()
    yield box, port
    controller.stop()


@dataclass
class Outputs:
    """Everything the run wrote that a person or a machine could read, by where it came from."""

    parts: dict[str, str] = field(default_factory=dict)

    def add(self, where: str, content: str | bytes) -> None:
        if isinstance(content, bytes):
            content = content.decode(errors="replace")
        self.parts[where] = self.parts.get(where, "") + content

    def leaks(self, secret: str) -> list[str]:
        return sorted(
            where
            for where, content in self.parts.items()
            if any(f in content for f in forms(secret))
        )


def open_shipments(engine: Engine, account: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text(
                    "SELECT (SELECT count(*) FROM shipments s"
                    " JOIN accounts a ON a.id = s.account_id"
                    "        WHERE a.name = :n AND s.active)"
                    "     + (SELECT count(*) FROM deliveries d JOIN outbox_events o"
                    "        ON o.id = d.event_id JOIN accounts a ON a.id = o.account_id"
                    "        WHERE a.name = :n AND d.state = 'pending')"
                    "     + (SELECT count(*) FROM outbox_events o JOIN accounts a"
                    "        ON a.id = o.account_id WHERE a.name = :n AND o.fanned_out_at IS NULL)"
                ),
                {"n": account},
            )
            or 0
        )


def stored_text(engine: Engine, account: str) -> str:
    """What the database keeps that people read: errors, excerpts, pauses, event payloads."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT concat_ws(' ', da.error, da.response_excerpt) FROM delivery_attempts da"
                " JOIN deliveries d ON d.id = da.delivery_id JOIN outbox_events o"
                " ON o.id = d.event_id JOIN accounts a ON a.id = o.account_id WHERE a.name = :n"
                " UNION ALL SELECT o.data::text FROM outbox_events o JOIN accounts a"
                " ON a.id = o.account_id WHERE a.name = :n"
                " UNION ALL SELECT concat_ws(' ', s.last_error_code, s.stopped_reason)"
                " FROM shipments s JOIN accounts a ON a.id = s.account_id WHERE a.name = :n"
                " UNION ALL SELECT concat_ws(' ', a.pause_reason, a.api_key_hint)"
                " FROM accounts a WHERE a.name = :n"
            ),
            {"n": account},
        ).scalars()
        return "\n".join(r or "" for r in rows)


def test_no_secret_appears_in_any_output_of_a_full_run(
    servers: RunServers,
    tmp_path: Path,
    receiver: RawReceiver,
    mailbox: tuple[Mailbox, int],
    request: pytest.FixtureRequest,
) -> None:
    box, smtp_port = mailbox
    name = f"secrets-{secrets.token_hex(3)}"
    api_key = f"SECRET-APIKEY-{secrets.token_hex(10)}"
    outputs = Outputs()
    metrics_dir = tmp_path / "metrics"
    env = {
        "SHIPMON_HOME": str(tmp_path / "home"),
        "SHIPMON_LOG_LEVEL": "DEBUG",
        "SHIPMON_MAX_POLL_INTERVAL": "1",
        "SHIPMON_KEY_DAILY_QUOTA": "100000000",
        "SHIPMON_GLOBAL_DAILY_QUOTA": "100000000",
        "SHIPMON_WEBHOOK_ALLOW_PRIVATE": "true",
        "SHIPMON_SMTP_URL": f"smtp://{SMTP_USER}:{quote(box.password, safe='')}@127.0.0.1:"
        f"{smtp_port}",
        "SHIPMON_EMAIL_FROM": "shipmon@shop.example",
        # The worker trusts the test SMTP server's self-signed certificate, and no other.
        "SSL_CERT_FILE": str(tmp_path / "cert.pem"),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    runner = CliRunner()

    def shipmon(*args: str) -> str:
        get_settings.cache_clear()
        try:
            result = runner.invoke(app, list(args), env=servers.env(**env))
        finally:
            get_settings.cache_clear()
        outputs.add(f"shipmon {' '.join(args[:2])}", result.output + repr(result.exception))
        assert result.exit_code in (0, 1), result.output
        return result.output

    workload = load_workload(WORKLOAD)
    faults = Faults(http_500=0.1, malformed=0.05, carrier_exception=0.05)
    with running_sandbox(workload=workload, seed=5, speed=SPEED, faults=faults) as carrier:
        env["SHIPMON_CARRIER_BASE_URL"] = carrier.base_url
        shipmon("account", "add", name, "--api-key", api_key, "--ops-email", "ops@shop.example")
        created = json.loads(shipmon("endpoint", "add", name, receiver.url, "--json"))
        whsec = created["secret"]
        receiver.secret = whsec
        # The one output that must show the secret: the command that creates it, once.
        del outputs.parts["shipmon endpoint add"]
        shipmon("email", "add", name, "ops@shop.example", "--events", "shipment.status_changed")
        carrier.add_account(name, api_key)
        codes = [f"SEC{secrets.token_hex(3).upper()}{i:02d}" for i in range(ORDERS)]
        for code in codes:
            carrier.add_order(api_key, code)

        log_file = tmp_path / "run.log"
        with open(log_file, "wb") as log:
            run = subprocess.Popen(
                [sys.executable, "-m", "worker", "run", "--concurrency", "1"],
                env=servers.env(**env), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        request.addfinalizer(lambda: (run.terminate(), run.wait(60)))
        client = Celery(broker=servers.redis_url, backend=servers.redis_url)
        answer = client.send_task(
            "shipmon.register_orders", args=[name, [*codes, "BAD", "SPX'12345"]]
        ).get(timeout=60)
        client.close()
        assert answer["registered"] == codes
        assert [r["error"] for r in answer["refused"]] == [
            "ORDERCODE_MIN_LENGTH",
            "ORDERCODE_FORMAT_EXCEPTION",
        ]

        engine = create_engine(servers.database_url)
        request.addfinalizer(engine.dispose)
        deadline = time.monotonic() + DEADLINE_S
        while open_shipments(engine, name):
            assert run.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not finish its orders in time"
            time.sleep(1)
        used = carrier.stats()["faults"]

        for command in (
            ["account", "list"], ["account", "list", "--json"], ["endpoint", "list", "--json"],
            ["endpoint", "list"], ["email", "list"], ["quota", "--json"], ["quota"],
            ["track", "--account", name, *codes[:2], "NOPE"],
            ["webhooks", "replay", receiver.received[0].event_id],
            ["endpoint", "test", str(created["id"])],
        ):  # fmt: skip
            shipmon(*command)
        run.terminate()
        run.wait(60)

    outputs.add("run log", log_file.read_bytes())
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
    outputs.add("metrics", generate_latest(registry))
    outputs.add("webhooks", b"\n".join(receiver.raw))
    outputs.add("emails", b"\n".join(box.raw))
    outputs.add("database", stored_text(engine, name))

    # The run used every secret: the key at the carrier, the secret to sign, the password to log
    # in; it logged at DEBUG and failed now and then, so error paths were taken too.
    run_log = outputs.parts["run log"]
    assert '"level": "DEBUG"' in run_log
    assert sum(used.values()) > 0
    assert receiver.received and not receiver.rejected
    assert box.raw and (SMTP_USER, box.password) in box.logins
    assert "shipmon_polls" in outputs.parts["metrics"]
    assert [message_from_bytes(raw, policy=policy.default)["To"] for raw in box.raw].count(
        "ops@shop.example"
    ) >= ORDERS
    for secret in (api_key, whsec, box.password):
        assert outputs.leaks(secret) == [], secret
