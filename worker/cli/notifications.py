"""`shipmon endpoint`, `shipmon email` and `shipmon webhooks`: who hears about changes."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from worker.cli.common import (
    console,
    err_console,
    fail,
    parse_event_types,
    print_json,
    print_table,
    servers,
    session,
    settings,
    uncut_table,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.domain.models import WebhookEndpoint

endpoint_app = typer.Typer(help="Manage webhook endpoints.", no_args_is_help=True)
email_app = typer.Typer(help="Manage email recipients of events.", no_args_is_help=True)
webhooks_app = typer.Typer(help="Resend webhooks.", no_args_is_help=True)

EventsOption = Annotated[
    str | None,
    typer.Option(
        "--events",
        help="Comma-separated event types, e.g. shipment.status_changed,shipment.delayed "
        "[default: every type]",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
# No control characters: PostgreSQL refuses a NUL, and mail servers the rest.
ADDRESS = re.compile(
    r"[^@\s\x00-\x1f]+@[^@\s\x00-\x1f]+\.[^@\s\x00-\x1f]+|[^@\s\x00-\x1f]+@localhost"
)
MAX_EMAIL_LENGTH = 320  # the column's limit, the longest address SMTP allows
RELATIVE_TIME = re.compile(r"(\d+)([smhd])")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _now() -> datetime:
    return datetime.now(UTC)


def _endpoint(s: Session, endpoint_id: int) -> WebhookEndpoint:
    from worker.notify.webhooks.endpoints import UnknownEndpoint, get_endpoint

    try:
        return get_endpoint(s, endpoint_id)
    except UnknownEndpoint as exc:
        fail(str(exc))


# --- shipmon endpoint ------------------------------------------------------------------------


@endpoint_app.command("add")
def endpoint_add(
    account: Annotated[str, typer.Argument(help="The account whose events go there.")],
    url: Annotated[str, typer.Argument(help="The receiver's http:// or https:// URL.")],
    events: EventsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add a webhook endpoint and print its signing secret (shown only here)."""
    from worker.core.config import mask_url
    from worker.notify.webhooks.endpoints import add_endpoint
    from worker.notify.webhooks.guard import UnresolvedHost, UnsafeDestination
    from worker.tracking.intake import account_by_name

    event_types = parse_event_types(events)
    allow_private = settings().webhook_allow_private
    secret_key = servers().secret_key
    warning = None
    with session() as s:
        owner = account_by_name(s, account)
        try:
            endpoint, secret = add_endpoint(
                s, owner, url, event_types, secret_key=secret_key, allow_private=allow_private
            )
        except UnresolvedHost as exc:
            # A receiver whose DNS is not set up yet is normal at registration. Every delivery
            # checks the addresses the name resolves to then, so none is unchecked.
            warning = f"{exc}; added anyway: its address is checked at every delivery"
            endpoint, secret = add_endpoint(
                s, owner, url, event_types, secret_key=secret_key, allow_private=True
            )
        except UnsafeDestination as exc:
            fail(str(exc))
        endpoint_id = endpoint.id
    if warning is not None:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if as_json:
        print_json({"id": endpoint_id, "account": account, "url": mask_url(url), "secret": secret})
        return
    console.print(f"endpoint {endpoint_id} of {account} added: {mask_url(url)}", highlight=False)
    console.print("signing secret (verify webhooks with it; it is not shown again):")
    console.print(secret, highlight=False, soft_wrap=True)


@endpoint_app.command("list")
def endpoint_list(
    account: Annotated[str | None, typer.Option(help="Only this account's endpoints.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List endpoints with their undelivered and dead deliveries."""
    from sqlalchemy import and_, case, func, select

    from worker.core.config import mask_url
    from worker.domain.deliveries import DeliveryState
    from worker.domain.models import Account, Delivery, WebhookEndpoint
    from worker.tracking.intake import account_by_name

    pending = func.count(case((Delivery.state == DeliveryState.PENDING, 1)))
    dead = func.count(case((Delivery.state == DeliveryState.DEAD, 1)))
    query = (
        select(WebhookEndpoint, Account.name, pending, dead)
        .join(Account, Account.id == WebhookEndpoint.account_id)
        .outerjoin(
            Delivery,
            and_(
                Delivery.endpoint_id == WebhookEndpoint.id,
                Delivery.state.in_((DeliveryState.PENDING, DeliveryState.DEAD)),
            ),
        )
        .group_by(WebhookEndpoint.id, Account.name)
        .order_by(Account.name, WebhookEndpoint.id)
    )
    with session() as s:
        if account is not None:
            query = query.where(WebhookEndpoint.account_id == account_by_name(s, account).id)
        rows: list[dict[str, Any]] = [
            {
                "id": e.id,
                "account": name,
                "url": mask_url(e.url),
                "events": e.event_types,
                "enabled": e.enabled,
                "disabled_reason": e.disabled_reason,
                "failing_since": e.failing_since,
                "pending": n_pending,
                "dead": n_dead,
            }
            for e, name, n_pending, n_dead in s.execute(query).all()
        ]
    if as_json:
        print_json(rows)
        return
    table = uncut_table(
        "id", "account", "url", "events", "state", "pending", "dead",
        whole=("id", "pending", "dead"),
    )  # fmt: skip
    for r in rows:
        state = "enabled" if r["enabled"] else f"disabled: {r['disabled_reason'] or ''}"
        if r["enabled"] and r["failing_since"] is not None:
            state = f"failing since {r['failing_since']:%Y-%m-%d %H:%M} UTC"
        events = ", ".join(r["events"]) if r["events"] is not None else "all"
        table.add_row(
            str(r["id"]), r["account"], r["url"], events, state, str(r["pending"]), str(r["dead"])
        )
    print_table(table)


@endpoint_app.command("disable")
def endpoint_disable(
    endpoint_id: Annotated[int, typer.Argument(help="The endpoint's id.")],
    reason: Annotated[str, typer.Option(help="Why, for whoever lists endpoints.")] = (
        "disabled by an operator"
    ),
) -> None:
    """Stop sending to an endpoint; its events wait until it is enabled again."""
    from worker.notify.webhooks.endpoints import set_endpoint_enabled

    with session() as s:
        set_endpoint_enabled(s, _endpoint(s, endpoint_id), False, now=_now(), reason=reason)
    console.print(f"endpoint {endpoint_id} disabled")


@endpoint_app.command("enable")
def endpoint_enable(
    endpoint_id: Annotated[int, typer.Argument(help="The endpoint's id.")],
) -> None:
    """Send to an endpoint again, starting with the events it missed, oldest first."""
    from worker.notify.webhooks.endpoints import set_endpoint_enabled

    with session() as s:
        set_endpoint_enabled(s, _endpoint(s, endpoint_id), True, now=_now())
    console.print(f"endpoint {endpoint_id} enabled")


@endpoint_app.command("remove")
def endpoint_remove(
    endpoint_id: Annotated[int, typer.Argument(help="The endpoint's id.")],
) -> None:
    """Delete an endpoint; its pending deliveries are dropped with it."""
    with session() as s:
        s.delete(_endpoint(s, endpoint_id))
    console.print(f"endpoint {endpoint_id} removed")


@endpoint_app.command("rotate-secret")
def endpoint_rotate_secret(
    endpoint_id: Annotated[int, typer.Argument(help="The endpoint's id.")],
    as_json: JsonOption = False,
) -> None:
    """Give an endpoint a new secret; the old one also signs for 24 hours.

    Refused while a previous rotation's 24 hours are running.
    """
    from worker.notify.webhooks.endpoints import RotationInProgress, rotate_secret

    secret_key = servers().secret_key
    with session() as s:
        endpoint = _endpoint(s, endpoint_id)
        try:
            secret = rotate_secret(endpoint, secret_key=secret_key, now=_now())
        except RotationInProgress as exc:
            fail(str(exc))
        until = endpoint.previous_secret_expires_at
    if as_json:
        print_json({"id": endpoint_id, "secret": secret, "previous_secret_expires_at": until})
        return
    console.print(f"new signing secret of endpoint {endpoint_id} (not shown again):")
    console.print(secret, highlight=False, soft_wrap=True)
    console.print(f"the previous secret also signs until {until:%Y-%m-%d %H:%M} UTC")


@endpoint_app.command("test")
def endpoint_test(
    endpoint_id: Annotated[int, typer.Argument(help="The endpoint's id.")],
) -> None:
    """Send a signed sample event (marked "test": true) and show the answer."""
    import asyncio

    from worker.core.config import mask_url
    from worker.notify.webhooks.endpoints import sample_event
    from worker.notify.webhooks.sender import WebhookSender
    from worker.notify.webhooks.signing import signing_secrets

    allow_private = settings().webhook_allow_private
    secret_key = servers().secret_key
    now = _now()
    with session() as s:
        endpoint = _endpoint(s, endpoint_id)
        url, secrets = endpoint.url, signing_secrets(endpoint, secret_key, now)
    event_id, body = sample_event(now)

    async def send() -> Any:
        async with WebhookSender(allow_private=allow_private) as sender:
            return await sender.send(url, secrets, event_id, body)

    result = asyncio.run(send())
    answer = f"HTTP {result.status_code}" if result.status_code is not None else result.error
    console.print(f"{mask_url(url)}: {answer} in {result.duration_ms} ms", highlight=False)
    if result.response_excerpt:
        console.print(result.response_excerpt[:500], highlight=False, markup=False)
    if not result.succeeded:
        raise typer.Exit(1)


# --- shipmon email ---------------------------------------------------------------------------


@email_app.command("add")
def email_add(
    account: Annotated[str, typer.Argument(help="The account whose events are mailed.")],
    address: Annotated[str, typer.Argument(help="The recipient's email address.")],
    events: EventsOption = None,
) -> None:
    """Email one message per event of the chosen types to an address."""
    from sqlalchemy import select

    from worker.domain.models import EmailRecipient
    from worker.tracking.intake import account_by_name

    event_types = parse_event_types(events)
    if len(address) > MAX_EMAIL_LENGTH or not ADDRESS.fullmatch(address):
        fail(f"{address[:80]!r} is not an email address")
    with session() as s:
        owner = account_by_name(s, account)
        existing = s.scalar(
            select(EmailRecipient.id).where(
                EmailRecipient.account_id == owner.id, EmailRecipient.address == address
            )
        )
        if existing is not None:
            fail(f"{address} already gets {account}'s emails; remove it first to change its events")
        s.add(EmailRecipient(account_id=owner.id, address=address, event_types=event_types))
    if settings().smtp_url is None:
        console.print("note: email is off until SHIPMON_SMTP_URL is set")
    console.print(f"{address} will get {account}'s events", highlight=False)


@email_app.command("list")
def email_list(
    account: Annotated[str | None, typer.Option(help="Only this account's recipients.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List email recipients."""
    from sqlalchemy import select

    from worker.domain.models import Account, EmailRecipient
    from worker.tracking.intake import account_by_name

    query = (
        select(EmailRecipient, Account.name)
        .join(Account, Account.id == EmailRecipient.account_id)
        .order_by(Account.name, EmailRecipient.address)
    )
    with session() as s:
        if account is not None:
            query = query.where(EmailRecipient.account_id == account_by_name(s, account).id)
        rows: list[dict[str, Any]] = [
            {"id": r.id, "account": name, "address": r.address, "events": r.event_types}
            for r, name in s.execute(query).all()
        ]
    if as_json:
        print_json(rows)
        return
    table = uncut_table("id", "account", "address", "events", whole=("id",))
    for row in rows:
        events = ", ".join(row["events"]) if row["events"] is not None else "all"
        table.add_row(str(row["id"]), row["account"], row["address"], events)
    print_table(table)


@email_app.command("remove")
def email_remove(
    account: Annotated[str, typer.Argument(help="The account.")],
    address: Annotated[str, typer.Argument(help="The address to stop emailing.")],
) -> None:
    """Stop emailing an address; its unsent emails are dropped."""
    from sqlalchemy import delete

    from worker.domain.models import EmailRecipient
    from worker.tracking.intake import account_by_name

    with session() as s:
        owner = account_by_name(s, account)
        removed = s.execute(
            delete(EmailRecipient)
            .where(EmailRecipient.account_id == owner.id, EmailRecipient.address == address)
            .returning(EmailRecipient.id)
        ).first()
        if removed is None:
            fail(f"{address} gets no email from {account}; see: shipmon email list")
    console.print(f"{address} removed", highlight=False)


# --- shipmon webhooks ------------------------------------------------------------------------


def _parse_time(value: str) -> datetime:
    relative = RELATIVE_TIME.fullmatch(value.strip())
    if relative is not None:
        amount, unit = relative.groups()
        return _now() - timedelta(**{UNITS[unit]: int(amount)})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(
            f"{value!r} is not a time; give an ISO-8601 time like 2026-11-27T08:00 (UTC unless "
            "it has an offset) or an age like 30m, 6h or 2d"
        )
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@webhooks_app.command("replay")
def webhooks_replay(
    event_id: Annotated[
        str | None, typer.Argument(help="The event's id (evt_...), as in webhook-id.")
    ] = None,
    failed_since: Annotated[
        str | None,
        typer.Option(
            "--failed-since",
            help="Resend every webhook that failed since this time (ISO-8601, or an age "
            "like 6h) and has not been delivered.",
        ),
    ] = None,
    endpoint: Annotated[int | None, typer.Option("--endpoint", help="Only this endpoint.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Resend webhooks once each, with their original webhook-id."""
    from worker.core.config import mask_url
    from worker.core.db import session_factory
    from worker.notify.replay import replay

    if (event_id is None) == (failed_since is None):
        fail("give either an event id or --failed-since TIME")
    since = _parse_time(failed_since) if failed_since is not None else None
    current = settings()
    found = servers()
    outcomes = replay(
        session_factory(found.database_url),
        current,
        secret_key=found.secret_key,
        event_id=event_id,
        failed_since=since,
        endpoint_id=endpoint,
    )
    rows: list[dict[str, Any]] = [
        {
            "event_id": o.event_id,
            "endpoint": o.endpoint_id,
            "url": mask_url(o.url),
            "delivered": o.result.succeeded,
            "status_code": o.result.status_code,
            "error": o.result.error,
            "duration_ms": o.result.duration_ms,
        }
        for o in outcomes
    ]
    if as_json:
        print_json(rows)
    elif not rows:
        console.print("nothing to resend (disabled endpoints are left out; enable them first)")
    else:
        table = uncut_table(
            "event", "endpoint", "url", "answer", "ms", whole=("event", "endpoint", "ms")
        )
        for r in rows:
            answer = f"HTTP {r['status_code']}" if r["status_code"] is not None else r["error"]
            table.add_row(
                r["event_id"], str(r["endpoint"]), r["url"], answer, str(r["duration_ms"])
            )
        print_table(table)
    if not all(r["delivered"] for r in rows):
        raise typer.Exit(1)
