"""What every command needs: settings, servers, a database session, and readable failures.

`shipmon --help` imports every command module, so nothing here or in a command module
imports SQLAlchemy, Redis, alembic, httpx, aiohttp, numpy, psycopg or pydantic at module
level: each command imports what it uses when it runs.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from collections.abc import Collection

    from rich.table import Table
    from sqlalchemy.orm import Session

    from worker.core.config import Settings
    from worker.core.servers import Servers

console = Console()
err_console = Console(stderr=True)
# Wider than any terminal: a table is never made wider than this to keep its columns whole.
MAX_TABLE_WIDTH = 1000


def fail(message: str, code: int = 2) -> NoReturn:
    """Print an actionable error and exit."""
    # soft_wrap: a terminal-wide line break must not split the command the message suggests.
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings() -> Settings:
    from worker.core.config import ConfigError, get_settings

    try:
        return get_settings()
    except ConfigError as exc:
        fail(str(exc))


def announce(what: str) -> None:
    """Tell the user what a cold start is waiting for, while it waits."""
    err_console.print(f"starting {what}…", highlight=False)


def servers() -> Servers:
    from worker.core.config import ConfigError
    from worker.core.servers import EmbeddedServerError, resolve

    try:
        return resolve(settings(), announce=announce)
    except (ConfigError, EmbeddedServerError) as exc:
        fail(str(exc))


@contextmanager
def session() -> Iterator[Session]:
    """A transaction on the configured database; known failures become readable errors."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from worker.core.crypto import SecretKeyMismatch
    from worker.core.db import transaction
    from worker.domain.models import UnknownAccount

    try:
        with transaction(servers().database_url) as s:
            yield s
    except UnknownAccount as exc:
        fail(str(exc))
    except SecretKeyMismatch as exc:
        fail(str(exc))
    except ProgrammingError as exc:
        if "does not exist" in str(exc.orig):
            fail("the database has no shipmon tables yet; run: shipmon db upgrade")
        raise
    except OperationalError as exc:
        fail(f"cannot reach PostgreSQL: {str(exc.orig).strip()}")


def uncut_table(*headers: str, whole: Collection[str] = (), **options: Any) -> Table:
    """A table that never cuts its text with an ellipsis: columns too narrow fold their text.

    The `whole` columns (ids, numbers, times) do not wrap either, so that `webhooks replay`
    gets the event id it needs and `167,9…` is never read as a quota.
    """
    from rich.table import Table

    shown = Table(**options)
    for header in headers:
        shown.add_column(header, overflow="fold", no_wrap=header in whole)
    return shown


def pace_bar(used: int, allowed_now: int, daily_quota: int, width: int = 24) -> str:
    """The day's use as a bar against the daily quota, with the pace line marked `│`.

    Green while the use is within the pace line, red once it is ahead of it (the quota would
    run out before the carrier day ends).
    """
    if daily_quota <= 0:
        return ""
    filled = min(width, round(used / daily_quota * width))
    pace = min(width - 1, round(allowed_now / daily_quota * width))
    cells = ["█" if i < filled else "·" for i in range(width)]
    cells[pace] = "│"
    colour = "green" if used <= allowed_now else "red"
    return f"[{colour}]{''.join(cells[:filled])}[/]{''.join(cells[filled:])}"


_LEVELS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None]) -> str:
    """`values` as one character each, from `▁` to `█` by their share of the largest; an
    empty or missing one is `·`, so a quiet period never reads as a small one."""
    top = max((v for v in values if v is not None), default=0.0)
    levels = len(_LEVELS)
    return "".join(
        "·" if v is None or v <= 0 else _LEVELS[min(levels - 1, math.ceil(v / top * levels) - 1)]
        for v in values
    )


def print_table(shown: Table) -> None:
    """Print a table; wider than the terminal if its `whole` columns would not fit otherwise."""
    from rich.measure import Measurement

    needed = Measurement.get(console, console.options.update_width(MAX_TABLE_WIDTH), shown)
    terminal = console.width
    # Rich would crop columns that may not wrap to fit the terminal: the line wraps instead.
    console.width = min(max(terminal, needed.minimum), MAX_TABLE_WIDTH)
    try:
        console.print(shown)
    finally:
        console.width = terminal


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


def parse_event_types(value: str | None) -> list[str] | None:
    """A comma-separated list of event types, checked against the known ones."""
    from worker.domain.vocabulary import EventType

    if value is None:
        return None
    types = [t.strip() for t in value.split(",") if t.strip()]
    known = {t.value for t in EventType}
    unknown = [t for t in types if t not in known]
    if unknown or not types:
        fail(
            f"unknown event type(s): {', '.join(unknown) or '(none given)'}; "
            f"choose from: {', '.join(sorted(known))}"
        )
    return types
