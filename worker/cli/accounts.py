"""`shipmon db` and `shipmon account`: the schema and the merchants' carrier accounts."""

from __future__ import annotations

import getpass
import re
import sys
from datetime import datetime
from typing import Annotated

import typer

from worker.cli.common import console, fail, print_json, print_table, servers, session, uncut_table

db_app = typer.Typer(help="Manage the database schema.", no_args_is_help=True)
account_app = typer.Typer(help="Manage carrier accounts (one API key each).", no_args_is_help=True)

ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
API_KEY = re.compile(r"[!-~]{1,200}")  # printable ASCII, no spaces
# The columns' limits: a PostgreSQL integer, and the longest address SMTP allows.
MAX_DAILY_QUOTA = 2**31 - 1
MAX_EMAIL_LENGTH = 320
# A key's last four characters tell keys apart; of a shorter key they would be most of it.
MIN_HINTED_KEY_LENGTH = 12
API_KEY_ENV = "SHIPMON_API_KEY"

ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar=API_KEY_ENV,
        show_envvar=True,
        help="The carrier API key (stored encrypted); '-' reads it from standard input. "
        "Prefer '-' or the environment variable: a key on the command line shows in `ps` "
        "and in shell history.",
    ),
]


def _api_key(given: str | None) -> str:
    """The API key given as an option, on standard input (`-`) or in SHIPMON_API_KEY."""
    if given is None:
        fail(
            "give the API key on standard input with --api-key - (e.g. from a password "
            f"manager) or in {API_KEY_ENV}"
        )
    if given != "-":
        key = given
    elif sys.stdin.isatty():
        key = getpass.getpass("carrier API key (not shown): ").strip()
    else:
        # One line, bounded: a key is at most 200 characters.
        key = sys.stdin.readline(1024).strip()
    if not API_KEY.fullmatch(key):
        fail("the API key must be 1-200 printable characters without spaces")
    return key


def _key_hint(api_key: str) -> str:
    """What `account list` shows of a key: its last four characters, if it is long enough."""
    return api_key[-4:] if len(api_key) >= MIN_HINTED_KEY_LENGTH else ""


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the newest schema (safe to run again)."""
    from worker.core.db import upgrade

    upgrade(servers().database_url)
    console.print("database is at the newest schema")


@account_app.command("add")
def account_add(
    name: Annotated[str, typer.Argument(help="A short name for the account, e.g. shop-a.")],
    api_key: ApiKeyOption = None,
    daily_quota: Annotated[
        int | None,
        typer.Option(
            help="Lookups per carrier day for this key [default: SHIPMON_KEY_DAILY_QUOTA]"
        ),
    ] = None,
    ops_email: Annotated[
        str | None, typer.Option(help="Who to tell when the key is refused or paused.")
    ] = None,
) -> None:
    """Add a carrier account with its API key."""
    from sqlalchemy import select

    from worker.core.crypto import encrypt, keyed_digest
    from worker.domain.models import Account

    if not ACCOUNT_NAME.fullmatch(name):
        fail("an account name is 1-100 letters, digits, '.', '_' or '-', starting with a letter")
    key = _api_key(api_key)
    if daily_quota is not None and not 0 < daily_quota <= MAX_DAILY_QUOTA:
        fail(f"--daily-quota must be a positive number of lookups, at most {MAX_DAILY_QUOTA}")
    if ops_email is not None and (
        "@" not in ops_email or len(ops_email) > MAX_EMAIL_LENGTH or not ops_email.isprintable()
    ):
        fail(f"{ops_email[:80]!r} is not an email address")
    secret_key = servers().secret_key
    with session() as s:
        if s.scalar(select(Account.id).where(Account.name == name)) is not None:
            fail(f"an account named {name!r} already exists; choose another name")
        s.add(
            Account(
                name=name,
                api_key_encrypted=encrypt(key, secret_key),
                api_key_hint=_key_hint(key),
                api_key_digest=keyed_digest(key, secret_key),
                daily_quota=daily_quota,
                ops_email=ops_email,
            )
        )
    console.print(f"account [bold]{name}[/] added")


@account_app.command("list")
def account_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """List accounts (keys of 12+ characters are shown by their last four, others not at all)."""
    from sqlalchemy import select

    from worker.domain.models import Account
    from worker.domain.pauses import until_words

    with session() as s:
        accounts = s.scalars(select(Account).order_by(Account.name)).all()
        rows = [
            {
                "name": a.name,
                "api_key": f"…{a.api_key_hint}" if a.api_key_hint else "(hidden)",
                "daily_quota": a.daily_quota,
                "paused_until": a.paused_until,
                "pause_reason": a.pause_reason,
            }
            for a in accounts
        ]
    if as_json:
        print_json(rows)
        return
    table = uncut_table(
        "name", "api key", "daily quota", "paused until", "why",
        whole=("api key", "daily quota", "paused until"),
    )  # fmt: skip
    for r in rows:
        until = r["paused_until"]
        r["paused_until"] = until_words(until) if isinstance(until, datetime) else None
        table.add_row(*(str(v) if v is not None else "" for v in r.values()))
    print_table(table)


@account_app.command("set-key")
def account_set_key(
    name: Annotated[str, typer.Argument(help="The account's name.")],
    api_key: ApiKeyOption = None,
) -> None:
    """Replace an account's API key; an account paused for a refused key resumes polling."""
    from worker.core.crypto import encrypt, keyed_digest
    from worker.tracking.accounts import paused_until_fixed, resume
    from worker.tracking.intake import account_by_name

    key = _api_key(api_key)
    secret_key = servers().secret_key
    with session() as s:
        account = account_by_name(s, name)
        account.api_key_encrypted = encrypt(key, secret_key)
        account.api_key_hint = _key_hint(key)
        account.api_key_digest = keyed_digest(key, secret_key)
        if paused_until_fixed(account):
            resume(account)
    console.print(f"account [bold]{name}[/] has a new API key")


# Basic auth passwords the carrier sends with each push; long enough to resist guessing.
MIN_PUSH_PASSWORD_LENGTH = 16
MAX_PUSH_PASSWORD_LENGTH = 200


@account_app.command("set-push-auth")
def account_set_push_auth(name: Annotated[str, typer.Argument(help="The account's name.")]) -> None:
    """Set the Basic auth password 247Express may push with (user: the account's name).

    Reads the password from standard input, or asks for it; it is stored hashed.
    """
    if sys.stdin.isatty():
        password = getpass.getpass("push password (not shown): ")
    else:
        password = sys.stdin.readline(MAX_PUSH_PASSWORD_LENGTH + 2).rstrip("\r\n")
    if not MIN_PUSH_PASSWORD_LENGTH <= len(password) <= MAX_PUSH_PASSWORD_LENGTH:
        fail(
            f"the push password must be {MIN_PUSH_PASSWORD_LENGTH}-{MAX_PUSH_PASSWORD_LENGTH} "
            "characters; generate one, e.g. with `openssl rand -hex 16`"
        )
    from worker.core.crypto import hash_password
    from worker.tracking.intake import account_by_name

    with session() as s:
        account_by_name(s, name).push_password_hash = hash_password(password)
    console.print(f"pushes to /carrier/247/status may now use Basic auth as [bold]{name}[/]")


@account_app.command("resume")
def account_resume(name: Annotated[str, typer.Argument(help="The account's name.")]) -> None:
    """Resume polling for a paused account now."""
    from worker.tracking.accounts import resume
    from worker.tracking.intake import account_by_name

    with session() as s:
        resume(account_by_name(s, name))
    console.print(f"account [bold]{name}[/] resumed")


@account_app.command("remove")
def account_remove(
    name: Annotated[str, typer.Argument(help="The account's name.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete an account with its shipments, history, endpoints and tokens (no undo)."""
    from worker.tracking.intake import remove_account

    if not yes:
        typer.confirm(
            f"delete account {name!r} and all its shipments, events and endpoints?", abort=True
        )
    with session() as s:
        remove_account(s, name)
    console.print(f"account [bold]{name}[/] removed")
