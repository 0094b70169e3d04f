"""Email: one message per event from overridable Jinja2 templates, sent over SMTP.

Sending uses the standard library's `smtplib` (blocking: call it from a thread inside an event
loop). `smtps://` speaks TLS from the first byte; `smtp://` upgrades with STARTTLS whenever the
server offers it, and refuses to send a password over a connection that stays unencrypted.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

import jinja2

from worker.core import metrics
from worker.core.config import Settings
from worker.domain.events import EventData
from worker.domain.models import OutboxEvent, Shipment, TrackingEvent
from worker.domain.vocabulary import EventType, delay_reason

__all__ = [
    "SMTP_TIMEOUT",
    "EventEmail",
    "MailError",
    "Scan",
    "SmtpServer",
    "event_email",
    "event_message",
    "render_event_email",
    "send_message",
    "send_ops_alert",
    "smtp_server",
]

log = logging.getLogger(__name__)

SMTP_TIMEOUT = 15.0
BUILTIN_TEMPLATES = Path(__file__).resolve().parent / "templates"
# How many of a shipment's latest scans an email shows.
SCANS_SHOWN = 5

EVENT_HEADLINES: dict[str, str] = {
    EventType.STATUS_CHANGED: "status changed",
    EventType.DELAYED: "delivery delayed",
    EventType.TRACKING_EVENT: "new tracking scan",
    EventType.NOT_FOUND: "not found at the carrier",
    EventType.STALLED: "no movement for a while",
    EventType.POLLING_STOPPED: "no longer tracked",
}


class MailError(Exception):
    """An email could not be sent; `code` is the SMTP reply code when the server gave one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SmtpServer:
    """Where and how to send mail, from SHIPMON_SMTP_URL and the separate login variables."""

    host: str
    port: int
    implicit_tls: bool
    user: str | None
    password: str | None

    def __repr__(self) -> str:
        # Never show the password, even in a traceback's locals.
        return f"SmtpServer(host={self.host!r}, port={self.port}, user={self.user!r})"


def smtp_server(settings: Settings) -> SmtpServer | None:
    """The configured SMTP server, or None when email is off."""
    if settings.smtp_url is None:
        return None
    parts = urlsplit(settings.smtp_url.get_secret_value())
    implicit_tls = parts.scheme == "smtps"
    user = unquote(parts.username) if parts.username else settings.smtp_user
    if parts.password is not None:
        password: str | None = unquote(parts.password)
    elif settings.smtp_password is not None:
        password = settings.smtp_password.get_secret_value()
    else:
        password = None
    return SmtpServer(
        host=parts.hostname or "",
        port=parts.port or (465 if implicit_tls else 25),
        implicit_tls=implicit_tls,
        user=user,
        password=password,
    )


@metrics.counting_emails
def send_message(
    settings: Settings,
    message: EmailMessage,
    *,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = SMTP_TIMEOUT,
) -> None:
    """Send one message through the configured server; raises MailError on any failure."""
    server = smtp_server(settings)
    if server is None:
        raise MailError("email is off; set SHIPMON_SMTP_URL to send mail")
    context = ssl_context or ssl.create_default_context()
    try:
        client = (
            smtplib.SMTP_SSL(server.host, server.port, timeout=timeout, context=context)
            if server.implicit_tls
            else smtplib.SMTP(server.host, server.port, timeout=timeout)
        )
        with client:
            client.ehlo()
            if not server.implicit_tls:
                if client.has_extn("starttls"):
                    client.starttls(context=context)
                    client.ehlo()
                elif server.user is not None:
                    raise MailError(
                        f"{server.host} offers no STARTTLS, and the SMTP password must not "
                        "travel unencrypted; use smtps:// or a server that offers STARTTLS"
                    )
            if server.user is not None:
                client.login(server.user, server.password or "")
            client.send_message(message)
    except smtplib.SMTPResponseException as error:
        reply = error.smtp_error
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
        raise MailError(
            f"{server.host} refused: {error.smtp_code} {text}", error.smtp_code
        ) from None
    except smtplib.SMTPRecipientsRefused as error:
        code, reply = next(iter(error.recipients.values()))
        text = reply.decode(errors="replace")
        raise MailError(f"{server.host} refused the recipient: {code} {text}", code) from None
    except (smtplib.SMTPException, OSError) as error:
        raise MailError(f"cannot send through {server.host}:{server.port}: {error}") from None


# --- Event emails ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scan:
    """One carrier scan as an email shows it."""

    occurred_at: datetime | None
    status_name: str | None
    post_office_name: str | None
    province_name: str | None
    notes: str | None


@dataclass(frozen=True)
class EventEmail:
    """Everything an event email's templates may show."""

    event_id: str
    event_type: str
    headline: str
    occurred_at: datetime
    order_code: str
    account: str | None
    previous_status: str | None
    new_status: str | None
    tracking_name: str | None
    delay_code: int | None
    delay_text: str | None
    delay_note: str | None
    scans: Sequence[Scan]


def event_email(
    event: OutboxEvent, shipment: Shipment, scans: Sequence[TrackingEvent]
) -> EventEmail:
    """The email view of an event: its own data first, the shipment's record where it is silent.

    The event's word on the delay, "none" included, outranks the shipment's now. `scans` are
    the shipment's latest scans, newest first.
    """
    data = EventData.from_json(event.data)
    delay = data.delay
    delay_code = delay.code if delay else None
    return EventEmail(
        event_id=event.event_id,
        event_type=event.type,
        headline=EVENT_HEADLINES.get(event.type, event.type),
        occurred_at=event.created_at.astimezone(UTC),
        order_code=data.order_code or shipment.order_code,
        account=data.account,
        previous_status=data.previous_status.name if data.previous_status else None,
        new_status=data.status.name or shipment.status,
        tracking_name=data.status.tracking_name or shipment.tracking_name,
        delay_code=delay_code,
        delay_text=(delay.reason if delay else None) or delay_reason(delay_code),
        delay_note=delay.note if delay else None,
        scans=[
            Scan(
                s.occurred_at.astimezone(UTC) if s.occurred_at else None,
                s.status_name,
                s.post_office_name,
                s.province_name,
                s.notes,
            )
            for s in scans[:SCANS_SHOWN]
        ],
    )


@lru_cache(maxsize=4)
def _templates(override: Path | None) -> jinja2.Environment:
    folders = [BUILTIN_TEMPLATES] if override is None else [override, BUILTIN_TEMPLATES]
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(folders),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
        # A deployment's template that names a missing field should fail loudly, not go blank.
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render_event_email(settings: Settings, email: EventEmail) -> tuple[str, str, str]:
    """The subject, plain-text and HTML bodies of an event email."""
    env = _templates(settings.templates_dir)
    context = {"email": email}
    subject = env.get_template("email/event.subject.j2").render(context)
    text = env.get_template("email/event.txt.j2").render(context)
    html = env.get_template("email/event.html.j2").render(context)
    return " ".join(subject.split()), text, html


def event_message(
    settings: Settings, to: str, email: EventEmail, *, message_id: str
) -> EmailMessage:
    """The message for one recipient; `message_id` stays the same across retries."""
    subject, text, html = render_event_email(settings, email)
    message = _message(settings, to, subject, message_id)
    # Quoted-printable keeps Vietnamese text intact through servers without 8BITMIME.
    message.set_content(text, cte="quoted-printable")
    message.add_alternative(html, subtype="html", cte="quoted-printable")
    return message


def _message(settings: Settings, to: str, subject: str, message_id: str) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = settings.email_from
    message["To"] = to
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = message_id
    # Tells mail servers and autoresponders that no person wrote this (RFC 3834).
    message["Auto-Submitted"] = "auto-generated"
    return message


def send_ops_alert(settings: Settings, to: str, subject: str, body: str) -> None:
    """Send a plain-text operational alert; with email off it is only logged.

    Raises MailError when the server cannot take it.
    """
    if settings.smtp_url is None:
        log.warning("email is off; ops alert to %s not sent: %s", to, subject)
        return
    domain = settings.email_from.rpartition("@")[2] or "localhost"
    message = _message(settings, to, subject, make_msgid(domain=domain))
    message.set_content(body, cte="quoted-printable")
    send_message(settings, message)
