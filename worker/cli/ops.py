"""`shipmon show`, `shipmon stats` and `shipmon metrics`: the ops views."""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from worker.cli.common import (
    console,
    fail,
    pace_bar,
    print_json,
    print_table,
    servers,
    session,
    settings,
    sparkline,
    uncut_table,
)

if TYPE_CHECKING:
    import redis

    from worker.ops.views import ShipmentStory, Stats
    from worker.scheduling.coverage import PushCoverage

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]


def _when(value: str | None) -> str:
    """An ISO-8601 UTC time from `as_dict`, shortened for a table."""
    if value is None:
        return ""
    return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _polling(client: redis.Redis[bytes], now: datetime) -> tuple[dict[str, Any], str | None]:
    """Whether the dispatcher ticked lately, for `--json`, and what to say if it did not."""
    from worker.ops.heartbeat import last_tick, silence

    last = last_tick(client)
    note = silence(last, now)
    return {"last_dispatch": last.isoformat() if last else None, "active": note is None}, note


def _duration(span: timedelta) -> str:
    """A span as its two largest units: 2d 3h, 5h 12m, 40m."""
    minutes = max(0, int(span.total_seconds() // 60))
    days, hours, minutes = minutes // 1440, minutes // 60 % 24, minutes % 60
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes}m" if hours else f"{minutes}m"


def _timeline(statuses: list[dict[str, Any]], active: bool, now: datetime) -> str:
    """The statuses in order, each with how long the shipment stayed in it.

    The last one's span runs to now while the shipment is watched; a finished one has none.
    """
    times = [datetime.fromisoformat(row["occurred_at"]) for row in statuses]
    steps = []
    for i, row in enumerate(statuses):
        end = times[i + 1] if i + 1 < len(times) else (now if active else None)
        span = f" [dim]{_duration(end - times[i])}[/]" if end is not None else ""
        steps.append(f"{row['status']}{span}")
    return " → ".join(steps)


def _warn(note: str | None) -> None:
    if note is not None:
        console.print(f"[yellow]{note}[/]", highlight=False, soft_wrap=True)


def show(
    order_code: Annotated[str, typer.Argument(help="The order code.", metavar="CODE")],
    account: Annotated[
        str | None, typer.Option(help="The account, when the code is in several.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show a shipment: its state, status and scan history, delays, and every notification."""
    import redis

    from worker.ops.views import ShipmentNotFound, shipment_story

    with session() as s:
        try:
            story = shipment_story(s, order_code, account)
        except ShipmentNotFound as exc:
            fail(str(exc), code=1)
    client: redis.Redis[bytes] = redis.Redis.from_url(servers().redis_url)
    try:
        polling, note = _polling(client, datetime.now(UTC))
    except redis.RedisError as exc:
        fail(f"cannot reach Redis: {exc}")
    finally:
        client.close()
    data = story.as_dict() | {"polling": polling}
    if as_json:
        print_json(data)
        return
    _print_story(story, data)
    if data["current"]["active"]:
        _warn(note)


def _print_story(story: ShipmentStory, data: dict[str, Any]) -> None:
    current = data["current"]
    status = current["status"]
    state = "watched" if current["active"] else f"stopped ({_text(current['stopped_reason'])})"
    said = (
        f"[bold]{status['name']}[/] ({_text(status['id'])} {_text(status['code'])}) "
        f"{_text(status['tracking_name'])}"
        if status["name"] is not None
        else "not looked up at the carrier yet"
    )
    console.print(f"[bold]{story.order_code}[/] of {story.account}: {said}", highlight=False)
    if data["statuses"]:
        timeline = _timeline(data["statuses"], current["active"], datetime.now(UTC))
        console.print(timeline, highlight=False)
    facts = uncut_table("fact", "value", show_header=False, box=None)
    facts.add_row("status since", _when(current["status_changed_at"]))
    facts.add_row("last scan", _when(current["last_scan_at"]))
    if current["delay"] is not None:
        delay = current["delay"]
        note = f" ({delay['note']})" if delay["note"] else ""
        facts.add_row("delay", f"{delay['code']}: {delay['reason']}{note}")
    if current["stalled_at"] is not None:
        facts.add_row("stalled since", _when(current["stalled_at"]))
    facts.add_row("polling", state)
    facts.add_row("registered", _when(current["registered_at"]))
    facts.add_row("last poll", _when(current["last_polled_at"]))
    facts.add_row("next poll", _when(current["next_poll_at"]) if current["active"] else "")
    facts.add_row("polls made", str(current["polls_made"]))
    if current["last_error_code"]:
        facts.add_row(
            "last error", f"{current['last_error_code']} ({current['consecutive_errors']} in a row)"
        )
    print_table(facts)

    statuses = uncut_table(
        "time (UTC)", "status", "id", "code", "carrier's words", title="statuses",
        whole=("time (UTC)", "id", "code"),
    )  # fmt: skip
    for row in data["statuses"]:
        statuses.add_row(
            _when(row["occurred_at"]),
            row["status"],
            _text(row["status_id"]),
            _text(row["status_code"]),
            _text(row["tracking_name"]),
        )
    print_table(statuses)

    scans = uncut_table(
        "time (UTC)", "scan", "post office", "province", "notes", title="scans",
        whole=("time (UTC)",),
    )  # fmt: skip
    for row in data["scans"]:
        scans.add_row(
            _when(row["occurred_at"]),
            _text(row["status_name"]),
            _text(row["post_office"]),
            _text(row["province"]),
            _text(row["notes"]),
        )
    print_table(scans)

    if data["delays"]:
        delays = uncut_table(
            "seen (UTC)", "code", "reason", "note", title="delays", whole=("seen (UTC)", "code")
        )
        for row in data["delays"]:
            delays.add_row(
                _when(row["seen_at"]), _text(row["code"]), _text(row["reason"]), _text(row["note"])
            )
        print_table(delays)

    notifications = uncut_table(
        "#", "event", "type", "created (UTC)", "sent to", "state", "attempts",
        title="notifications", whole=("#", "event", "created (UTC)"),
    )  # fmt: skip
    for event in data["notifications"]:
        deliveries = event["deliveries"] or [None]
        created = _when(event["created_at"])
        for i, delivery in enumerate(deliveries):
            # The event's columns on its first delivery's line only.
            head = (str(event["sequence"]), event["event_id"], event["type"], created)
            if i > 0:
                head = ("", "", "", "")
            if delivery is None:
                notifications.add_row(*head, "(no destination)", "", "")
                continue
            notifications.add_row(
                *head,
                f"{delivery['channel']} {delivery['destination']}",
                delivery["state"],
                "; ".join(_attempt(a) for a in delivery["attempts"]),
            )
    print_table(notifications)


def _attempt(attempt: dict[str, Any]) -> str:
    answer = (
        f"HTTP {attempt['status_code']}" if attempt["status_code"] is not None else attempt["error"]
    )
    return f"{_when(attempt['attempted_at'])} {answer} {attempt['duration_ms']} ms"


def stats(as_json: JsonOption = False) -> None:
    """Show shipments by status and account, quota use, the poll backlog, the last 24 hours'
    transitions and delays, the share of changes the carrier's pushes reported first, failing
    endpoints and stalled shipments."""
    import redis

    from worker.ops.views import collect_stats
    from worker.quota.limiter import QuotaLimiter
    from worker.scheduling.coverage import account_coverage

    client: redis.Redis[bytes] = redis.Redis.from_url(servers().redis_url)
    try:
        with session() as s:
            quota = QuotaLimiter(client, settings()).status(s)
            now = datetime.now(UTC)
            result = collect_stats(s, now, quota)
            coverage = account_coverage(s, now)
        polling, note = _polling(client, now)
    except redis.RedisError as exc:
        fail(f"cannot reach Redis: {exc}")
    finally:
        client.close()
    data = result.as_dict() | {"polling": polling}
    data["push_coverage"] = [{"account": name} | c.to_json() for name, c in coverage]
    if as_json:
        print_json(data)
        return
    _print_stats(result, data, coverage)
    _warn(note)


def _hourly_line(counts: list[int]) -> str:
    """Transitions per hour over the last day, oldest hour first, as a sparkline."""
    return (
        f"transitions per hour, last {len(counts)} h: {sparkline(counts)} "
        f"(busiest hour {max(counts, default=0):,}, in all {sum(counts):,})"
    )


def _print_stats(
    result: Stats, data: dict[str, Any], coverage: list[tuple[str | None, PushCoverage]]
) -> None:
    from worker.cli.quota import push_cells
    from worker.scheduling.coverage import LEARNING_WINDOW

    shipments = uncut_table(
        "account", "status", "watched", "finished or stopped", title="shipments",
        whole=("watched", "finished or stopped"),
    )  # fmt: skip
    for row in data["shipments"]:
        shipments.add_row(
            row["account"], row["status"] or "(not found yet)", str(row["open"]), str(row["closed"])
        )
    print_table(shipments)

    quota = uncut_table(
        "account", "polls today", "allowed by now", "daily quota", "use, │ pace",
        title="quota today",
        whole=("polls today", "allowed by now", "daily quota", "use, │ pace"),
    )  # fmt: skip
    for line in result.quota:
        quota.add_row(
            line.account or "[bold]all keys[/]",
            f"{line.used_today:,}",
            f"{line.allowed_now:,}",
            f"{line.daily_quota:,}",
            pace_bar(line.used_today, line.allowed_now, line.daily_quota),
        )
    print_table(quota)

    oldest = data["oldest_overdue"]
    backlog = f"due now: {result.due:,}"
    if oldest is not None:
        backlog += (
            f"; oldest overdue: {oldest['order_code']} of {oldest['account']}, due since "
            f"{_when(oldest['due_at'])} UTC ({oldest['overdue_seconds'] / 60:,.0f} min)"
        )
    console.print(backlog, highlight=False)

    transitions = uncut_table(
        "from", "to", "count", title="transitions, last 24 h", whole=("count",)
    )
    for row in data["transitions"]:
        transitions.add_row(
            row["from_status"] or "(new)", _text(row["to_status"]), str(row["count"])
        )
    print_table(transitions)
    console.print(_hourly_line(result.transitions_by_hour), highlight=False)

    delays = uncut_table(
        "code", "reason", "count", title="delays, last 24 h", whole=("code", "count")
    )
    for row in data["delays"]:
        delays.add_row(_text(row["code"]), _text(row["reason"]), str(row["count"]))
    print_table(delays)

    endpoints = uncut_table(
        "id", "account", "url", "state", "pending", "dead", title="failing endpoints",
        whole=("id", "pending", "dead"),
    )  # fmt: skip
    for row in data["failing_endpoints"]:
        state = (
            f"failing since {_when(row['failing_since'])}"
            if row["enabled"]
            else f"disabled: {_text(row['disabled_reason'])}"
        )
        endpoints.add_row(
            str(row["id"]), row["account"], row["url"], state, str(row["pending"]), str(row["dead"])
        )
    print_table(endpoints)

    stalled = uncut_table(
        "account", "order", "status", "last change", "stalled since",
        title=f"stalled shipments: {result.stalled:,}",
        whole=("order", "last change", "stalled since"),
    )  # fmt: skip
    for row in data["stalled_oldest"]:
        stalled.add_row(
            row["account"],
            row["order_code"],
            _text(row["status"]),
            _when(row["last_change_at"]),
            _when(row["stalled_at"]),
        )
    print_table(stalled)

    pushes = uncut_table(
        "account", "by push", "push delay (median)",
        title=f"pushes, last {LEARNING_WINDOW.days} days",
    )  # fmt: skip
    for name, covered in coverage:
        pushes.add_row(name or "[bold]all accounts[/]", *push_cells(covered))
    print_table(pushes)


def metrics(
    port: Annotated[int, typer.Option(help="Port of /metrics and /healthz (0: any).")] = 9808,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Serve the worker processes' Prometheus metrics, summed from PROMETHEUS_MULTIPROC_DIR."""
    from worker.core.metrics import MULTIPROC_DIR, serve

    if not os.environ.get(MULTIPROC_DIR):
        fail(
            f"set {MULTIPROC_DIR} to the folder the worker processes write their metrics to "
            "(the same value in their environment and in this command's)"
        )
    try:
        server, thread = serve(port, host)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port")
    # Printed, and flushed, so whoever started this command can read the port it chose.
    print(f"serving metrics on http://{host}:{server.server_port}/metrics", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
