"""`shipmon quota`: how each API key is spending its carrier day."""

from __future__ import annotations

from typing import Annotated

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


def quota(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Show per key: used today, allowed by now, the last hour's pace, projected end of day,
    and whether it is paused and why; then the total of all keys."""
    import redis

    from worker.domain.pauses import until_words
    from worker.quota.limiter import QuotaLimiter

    client: redis.Redis[bytes] = redis.Redis.from_url(servers().redis_url)
    try:
        with session() as s:
            lines = QuotaLimiter(client, settings()).status(s)
    except redis.RedisError as exc:
        fail(f"cannot reach Redis: {exc}")
    finally:
        client.close()
    if as_json:
        print_json([line.as_dict() for line in lines])
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
        )
    print_table(table)
