"""`shipmon quota`: how each API key is spending its carrier day, and what pushes spare it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from worker.cli.common import (
    fail,
    pace_bar,
    print_json,
    print_table,
    servers,
    session,
    settings,
    uncut_table,
)

if TYPE_CHECKING:
    from worker.scheduling.coverage import PushCoverage


def push_cells(coverage: PushCoverage) -> tuple[str, str]:
    """A coverage as table cells: the share of transitions by push, and their median delay."""
    overall = coverage.overall
    if not overall.transitions:
        return "", ""
    share = f"{overall.share:.0%} of {overall.transitions:,}"
    median = overall.median_delay_s
    return share, "" if median is None else f"{median:,.1f} s"


def quota(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Show per key: used today, allowed by now, the last hour's pace, projected end of day,
    whether it is paused and why, and the share of the last days' transitions the carrier's
    pushes reported first (the lookups they spare); then the total of all keys."""
    import redis

    from worker.domain.pauses import until_words
    from worker.quota.limiter import QuotaLimiter
    from worker.scheduling.coverage import NO_PUSHES, account_coverage

    client: redis.Redis[bytes] = redis.Redis.from_url(servers().redis_url)
    try:
        with session() as s:
            lines = QuotaLimiter(client, settings()).status(s)
            coverage = dict(account_coverage(s, datetime.now(UTC)))
    except redis.RedisError as exc:
        fail(f"cannot reach Redis: {exc}")
    finally:
        client.close()
    if as_json:
        print_json(
            [
                line.as_dict() | {"push_coverage": coverage.get(line.account, NO_PUSHES).to_json()}
                for line in lines
            ]
        )
        return
    table = uncut_table(
        "account",
        "api key",
        "used today",
        "allowed by now",
        "daily quota",
        "use, │ pace",
        "last hour",
        "projected",
        "paused until",
        "why",
        "by push",
        "push delay (median)",
        whole=(
            "used today",
            "allowed by now",
            "daily quota",
            "use, │ pace",
            "last hour",
            "projected",
        ),
    )
    for line in lines:
        row = line.as_dict()
        table.add_row(
            row["account"] or "[bold]all keys[/]",
            row["api_key"] or "",
            f"{line.used_today:,}",
            f"{line.allowed_now:,}",
            f"{line.daily_quota:,}",
            pace_bar(line.used_today, line.allowed_now, line.daily_quota),
            f"{line.last_hour:,}",
            f"{line.projected:,}",
            until_words(line.paused_until) if line.paused_until else "",
            line.pause_reason or "",
            *push_cells(coverage.get(line.account, NO_PUSHES)),
        )
    print_table(table)
