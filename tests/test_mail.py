"""Email: one message per event with a plain-text and an HTML part, sent to a real SMTP server
(aiosmtpd on loopback) and parsed back; STARTTLS and login; retries; template overrides."""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import Select, select

from tests import test_outbox
from tests.test_outbox import T0, Receiver, World, always
from worker.core import metrics
from worker.core.config import Settings
from worker.domain.models import Delivery, EmailRecipient, TrackingEvent
from worker.domain.vocabulary import EventType, delay_reason
from worker.notify.mail import MailError, send_message, send_ops_alert, smtp_server

# The outbox tests' committed world and webhook receivers.
world = test_outbox.world
receivers = test_outbox.receivers

# --- A real SMTP server ----------------------------------------------------------------------


@dataclass
class Mailbox:
    """What an SMTP server received, parsed; `refuse` makes it answer DATA with an error."""

    messages: list[EmailMessage] = field(default_factory=list)
    recipients: list[list[str]] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)
    refuse: str | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        if self.refuse is not None:
            return self.refuse
        assert isinstance(envelope.content, bytes)
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 OK"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append((data.login.decode(), data.password.decode()))
        return AuthResult(success=data.password == b"p@ss word")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[Callable[..., tuple[Mailbox, int]]]:
    """Starts SMTP servers on loopback (options go to aiosmtpd) and stops them afterwards."""
    started: list[Controller] = []

    def start(**options: Any) -> tuple[Mailbox, int]:
        mailbox = Mailbox()
        port = free_port()
        controller = Controller(
            mailbox, hostname="127.0.0.1", port=port,
            authenticator=mailbox.authenticate, **options,
        )  # fmt: skip
        controller.start()
        started.append(controller)
        return mailbox, port

    yield start
    for controller in started:
        controller.stop()


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh self-signed certificate for 127.0.0.1, and a client
    context that trusts exactly that certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


def plain_message(to: str = "ops@shop.example") -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = "hello"
    message["From"] = "shipmon@shop.example"
    message["To"] = to
    message.set_content("body")
    return message


def parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert isinstance(text, EmailMessage) and isinstance(html, EmailMessage)
    return text.get_content(), html.get_content()


# --- Settings --------------------------------------------------------------------------------


def test_the_smtp_url_gives_host_port_tls_and_login() -> None:
    def server(**values: Any) -> Any:
        return smtp_server(Settings(**values))

    assert server() is None
    plain = server(smtp_url="smtp://mail.example")
    assert (plain.host, plain.port, plain.implicit_tls, plain.user) == (
        "mail.example", 25, False, None,
    )  # fmt: skip
    secure = server(smtp_url="smtps://bob:p%40ss@mail.example")
    assert (secure.port, secure.implicit_tls, secure.user, secure.password) == (
        465, True, "bob", "p@ss",
    )  # fmt: skip
    separate = server(
        smtp_url="smtp://mail.example:587", smtp_user="ann", smtp_password=SecretStr("pw")
    )
    assert (separate.port, separate.user, separate.password) == (587, "ann", "pw")
    assert "pw" not in repr(separate)


# --- Sending ---------------------------------------------------------------------------------


def test_starttls_protects_the_login(
    smtp: Callable[..., tuple[Mailbox, int]], tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_context, client_context = tls
    mailbox, port = smtp(tls_context=server_context, require_starttls=True)

    settings = Settings(smtp_url=f"smtp://bob:p%40ss%20word@127.0.0.1:{port}")
    send_message(settings, plain_message(), ssl_context=client_context)
    assert mailbox.logins == [("bob", "p@ss word")]
    assert len(mailbox.messages) == 1

    separate = Settings(
        smtp_url=f"smtp://127.0.0.1:{port}",
        smtp_user="ann",
        smtp_password=SecretStr("p@ss word"),
    )
    send_message(separate, plain_message(), ssl_context=client_context)
    assert mailbox.logins[-1] == ("ann", "p@ss word")
    assert len(mailbox.messages) == 2


def test_a_refusal_carries_the_servers_reply_code(
    smtp: Callable[..., tuple[Mailbox, int]],
) -> None:
    mailbox, port = smtp()
    mailbox.refuse = "554 5.7.1 Message rejected"
    with pytest.raises(MailError, match="Message rejected") as refused:
        send_message(Settings(smtp_url=f"smtp://127.0.0.1:{port}"), plain_message())
    assert refused.value.code == 554


def test_a_password_never_travels_without_tls(smtp: Callable[..., tuple[Mailbox, int]]) -> None:
    mailbox, port = smtp(auth_require_tls=False)
    settings = Settings(smtp_url=f"smtp://bob:secret@127.0.0.1:{port}")
    with pytest.raises(MailError, match="STARTTLS"):
        send_message(settings, plain_message())
    assert mailbox.logins == []
    assert mailbox.messages == []


def test_emails_sent_and_failed_are_counted(smtp: Callable[..., tuple[Mailbox, int]]) -> None:
    def counted() -> dict[str, float]:
        return {
            s.labels["result"]: s.value
            for family in text_string_to_metric_families(metrics.exposition().decode())
            if family.name == "shipmon_emails"
            for s in family.samples
            if s.name == "shipmon_emails_total"
        }

    before = counted()
    mailbox, port = smtp()
    settings = Settings(smtp_url=f"smtp://127.0.0.1:{port}")
    send_message(settings, plain_message())
    mailbox.refuse = "554 5.7.1 Message rejected"
    for _ in range(2):
        with pytest.raises(MailError):
            send_message(settings, plain_message())

    after = counted()
    assert after["sent"] - before.get("sent", 0) == 1
    assert after["failed"] - before.get("failed", 0) == 2


def test_an_unreachable_server_is_a_mail_error() -> None:
    settings = Settings(smtp_url=f"smtp://127.0.0.1:{free_port()}")
    with pytest.raises(MailError, match="cannot send through"):
        send_message(settings, plain_message(), timeout=5)


def test_ops_alerts_are_mailed_or_logged_when_email_is_off(
    smtp: Callable[..., tuple[Mailbox, int]], caplog: pytest.LogCaptureFixture
) -> None:
    mailbox, port = smtp()
    settings = Settings(smtp_url=f"smtp://127.0.0.1:{port}", email_from="alerts@shop.example")
    send_ops_alert(settings, "ops@shop.example", "API key paused", "The key of shop-a is paused.")
    (message,) = mailbox.messages
    assert message["Subject"] == "API key paused"
    assert message["From"] == "alerts@shop.example"
    assert message.get_content().strip() == "The key of shop-a is paused."

    with caplog.at_level(logging.WARNING, logger="worker.notify.mail"):
        send_ops_alert(Settings(), "ops@shop.example", "API key paused", "body")
    assert "email is off" in caplog.text


# --- Event emails through the outbox ---------------------------------------------------------


def add_scans(world: World, shipment_id: int) -> None:
    with world.sessions.begin() as s:
        for hour, office in enumerate(["Bưu cục Quận 1", "Kho Tân Bình", "Bưu cục Thủ Đức"]):
            s.add(
                TrackingEvent(
                    shipment_id=shipment_id, fingerprint=f"scan-{hour}",
                    status_name="Đang vận chuyển", post_office_name=office,
                    province_name="Hồ Chí Minh", occurred_at=T0 + timedelta(hours=hour),
                )
            )  # fmt: skip


def recipient(world: World, account: int, address: str, events: list[str] | None = None) -> None:
    with world.sessions.begin() as s:
        s.add(EmailRecipient(account_id=account, address=address, event_types=events))


def mail_world(world: World, port: int | None, **settings: Any) -> None:
    """Point the world's settings at the SMTP server on `port` (None: email off)."""
    smtp_url = SecretStr(f"smtp://127.0.0.1:{port}") if port is not None else None
    world.settings = world.settings.model_copy(update={"smtp_url": smtp_url, **settings})


def select_deliveries(account: int) -> Select[tuple[Delivery]]:
    return (
        select(Delivery)
        .join(EmailRecipient, EmailRecipient.id == Delivery.recipient_id)
        .where(EmailRecipient.account_id == account)
        .order_by(Delivery.sequence)
    )


def test_one_email_per_event_with_everything_a_merchant_needs(
    world: World, smtp: Callable[..., tuple[Mailbox, int]]
) -> None:
    mailbox, port = smtp()
    mail_world(world, port, email_from="shipmon@shop.example")
    account = world.account()
    shipment, code = world.shipment(account)
    add_scans(world, shipment)
    recipient(world, account, "ops@shop.example")
    recipient(world, account, "boss@shop.example", events=[EventType.STALLED])
    _, first = world.event(shipment, delay={"code": 2, "reason": delay_reason(2), "note": "<b>"})
    _, second = world.event(shipment, EventType.DELAYED)

    world.deliver(T0)

    assert mailbox.recipients == [["ops@shop.example"], ["ops@shop.example"]]
    message = mailbox.messages[0]
    assert message["Subject"] == f"{code}: status changed (DELIVERING)"
    assert message["From"] == "shipmon@shop.example"
    assert message["Message-ID"].startswith(f"<{first}.")
    text, html = parts(message)
    for body in (text, html):
        assert code in body
        assert "IN_TRANSIT" in body and "DELIVERING" in body
        assert "Đang đi phát" in body
        assert "The recipient is not at the address" in body
        assert "Bưu cục Thủ Đức" in body and "Kho Tân Bình" in body
    assert "IN_TRANSIT -> DELIVERING" in text
    assert "Note: <b>" in text
    assert "&lt;b&gt;" in html and "<b>" not in html
    assert text.index("Bưu cục Thủ Đức") < text.index("Bưu cục Quận 1")  # newest scan first
    assert mailbox.messages[1]["Message-ID"].startswith(f"<{second}.")


def test_a_refused_email_is_retried_and_every_attempt_recorded(
    world: World, smtp: Callable[..., tuple[Mailbox, int]]
) -> None:
    mailbox, port = smtp()
    mailbox.refuse = "451 Try again later"
    mail_world(world, port)
    account = world.account()
    shipment, _ = world.shipment(account)
    recipient(world, account, "ops@shop.example")
    world.event(shipment)

    world.deliver(T0)
    mailbox.refuse = None
    world.deliver(T0 + timedelta(seconds=7))

    assert len(mailbox.messages) == 1
    with world.sessions() as s:
        delivery = s.scalars(select_deliveries(account)).one()
        attempts = [(a.status_code, a.error is None) for a in world.attempts(delivery.id)]
    assert delivery.state == "succeeded"
    assert attempts == [(451, False), (250, True)]


def test_with_email_off_emails_are_skipped_and_webhooks_still_go(
    world: World, receivers: Callable[..., Receiver]
) -> None:
    mail_world(world, None)
    receiver = receivers()
    account = world.account()
    world.endpoint(account, receiver)
    shipment, code = world.shipment(account)
    recipient(world, account, "ops@shop.example")
    world.event(shipment)
    world.event(shipment)

    world.deliver(T0)

    assert receiver.sequences(code) == [1, 2]
    with world.sessions() as s:
        states = [d.state for d in s.scalars(select_deliveries(account))]
    assert states == ["skipped", "skipped"]


def test_a_deployment_can_replace_a_template(
    world: World, smtp: Callable[..., tuple[Mailbox, int]], tmp_path: Path
) -> None:
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "event.subject.j2").write_text(
        "[{{ email.account }}] {{ email.order_code }} is {{ email.new_status }}"
    )
    mailbox, port = smtp()
    mail_world(world, port, templates_dir=tmp_path)
    account = world.account()
    shipment, code = world.shipment(account)
    recipient(world, account, "ops@shop.example")
    world.event(shipment)

    world.deliver(T0)

    (message,) = mailbox.messages
    assert message["Subject"].endswith(f"] {code} is DELIVERING")
    text, _ = parts(message)
    assert "IN_TRANSIT -> DELIVERING" in text  # the built-in body is still used


def test_a_disabled_endpoint_is_reported_to_the_account_by_email(
    world: World, smtp: Callable[..., tuple[Mailbox, int]], receivers: Callable[..., Receiver]
) -> None:
    mailbox, port = smtp()
    mail_world(world, port)
    receiver = receivers(always(410))
    account = world.account(ops_email="ops@shop.example")
    endpoint = world.endpoint(account, receiver)
    shipment, _ = world.shipment(account)
    world.event(shipment)

    world.deliver(T0)

    (alert,) = mailbox.messages
    assert mailbox.recipients == [["ops@shop.example"]]
    assert f"webhook endpoint {endpoint}" in alert["Subject"]
    body = alert.get_content()
    assert "410 Gone" in body
    assert f"shipmon endpoint enable {endpoint}" in body
