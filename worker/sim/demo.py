"""`shipmon demo`: the whole system live on one machine, with a carrier and a merchant to watch.

The sandbox carrier runs on an accelerated clock, a few accounts register a few hundred sample
orders, a local receiver verifies every webhook's signature, and a terminal view shows polls,
transitions, delay reasons, webhooks and quota as they happen.

The sandbox also pushes its status changes to shipmon's own receiver (SPEC §8), losing one in
ten, late and out of order as the carrier does; the view says which changes came by push and
which by poll, so the polling backstop is seen catching what the pushes lost. If the receiver
refuses the pushes, they are given up and polling carries on alone.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
from aiohttp import web
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from worker.api.routes.carrier import PUSH_PATH
from worker.api.tokens import create_token
from worker.cli.common import sparkline
from worker.core.crypto import encrypt, keyed_digest
from worker.domain.deliveries import DeliveryState
from worker.domain.events import EventData
from worker.domain.models import Account, Delivery, OutboxEvent, Shipment, WebhookEndpoint
from worker.notify.webhooks.endpoints import add_endpoint
from worker.tracking.intake import register_orders

DEMO_ACCOUNTS = ("demo-shop", "demo-market")


@dataclass
class Receiver:
    """A merchant's webhook endpoint on loopback that verifies every signature it gets."""

    secrets: dict[str, Webhook] = field(default_factory=dict)
    verified: int = 0
    rejected: int = 0
    ids: set[str] = field(default_factory=set)
    by_type: Counter[str] = field(default_factory=Counter)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        account = request.match_info["account"]
        try:
            payload = self.secrets[account].verify(body, dict(request.headers))
        except (KeyError, WebhookVerificationError):
            self.rejected += 1
            return web.Response(status=400)
        self.verified += 1
        self.ids.add(request.headers["webhook-id"])
        self.by_type[payload["type"]] += 1
        return web.Response(status=204)

    def start(self) -> None:
        """Serve from a background thread on a free loopback port."""
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/hooks/{account}", self.handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks"
            ready.set()
            await asyncio.Event().wait()

        threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
        ready.wait(10)


# The carrier's local hour the demo's clock opens at: pickups start, the day lies ahead.
DEMO_MORNING_HOUR = 7


def carrier_morning(now: datetime, zone: ZoneInfo) -> datetime:
    """The last DEMO_MORNING_HOUR on the carrier's local clock at or before `now`. The demo's
    carrier starts there, so whatever the hour it is run, its parcels move while watched."""
    local = now.astimezone(zone)
    morning = local.replace(hour=DEMO_MORNING_HOUR, minute=0, second=0, microsecond=0)
    return morning if morning <= local else morning - timedelta(days=1)


def start_sandbox(
    speed: float, seed: int, start: datetime | None = None
) -> tuple[subprocess.Popen[str], str]:
    """The sandbox carrier in a process of its own, its clock from `start` (default: now)."""
    starting = ["--start", start.isoformat()] if start is not None else []
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "sandbox", "--port", "0",
         "--speed", str(speed), "--seed", str(seed), *starting],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    match = re.search(r"http://127\.0\.0\.1:\d+", process.stdout.readline())
    if match is None:
        process.terminate()
        raise RuntimeError("the sandbox carrier did not start")
    return process, match.group(0)


def seed_orders(
    sessions: sessionmaker[Session],
    sandbox_url: str,
    receiver: Receiver,
    secret_key: str,
    orders: int,
) -> list[str]:
    """Accounts, their webhook endpoints, and sample orders at the carrier and in shipmon."""
    codes: list[str] = []
    with httpx.Client(base_url=sandbox_url, timeout=30) as admin:
        for index, name in enumerate(DEMO_ACCOUNTS):
            api_key = f"DEMO-{secrets.token_hex(8)}"
            admin.post("/_sandbox/accounts", json={"name": name, "apikey": api_key})
            mine = [f"DEMO{index}{secrets.token_hex(2).upper()}{i:05d}" for i in range(orders)]
            for code in mine:
                admin.post("/_sandbox/orders", json={"apikey": api_key, "order_code": code})
            with sessions.begin() as session:
                account = session.scalar(select(Account).where(Account.name == name))
                if account is None:
                    account = Account(name=name, api_key_encrypted="", api_key_hint="")
                    session.add(account)
                account.api_key_encrypted = encrypt(api_key, secret_key)
                account.api_key_hint = api_key[-4:]
                account.api_key_digest = keyed_digest(api_key, secret_key)  # pushes name it
                account.paused_until = None
                session.flush()
                # A fresh start: the last demo's orders and endpoints belonged to its carrier.
                session.execute(delete(Shipment).where(Shipment.account_id == account.id))
                session.execute(
                    delete(WebhookEndpoint).where(WebhookEndpoint.account_id == account.id)
                )
                _, secret = add_endpoint(
                    session, account, f"{receiver.url}/{name}", None,
                    secret_key=secret_key, allow_private=True,
                )  # fmt: skip
                receiver.secrets[name] = Webhook(secret)
                register_orders(session, name, mine)
            codes.extend(mine)
    return codes


def free_port() -> int:
    """A port free on loopback right now, for the demo's HTTP API."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# The share of pushes the demo's carrier loses, and their delay [p50, p99] in carrier seconds.
DEMO_PUSH_DROP = 0.1
DEMO_PUSH_DELAY_S = (60.0, 900.0)


def start_pushing(sandbox_url: str, api_port: int) -> str | None:
    """Have the sandbox push to the demo's HTTP API; None, or why it would not."""
    settings = {
        "url": f"http://127.0.0.1:{api_port}{PUSH_PATH}",
        "drop": DEMO_PUSH_DROP,
        "delay_s": list(DEMO_PUSH_DELAY_S),
    }
    try:
        httpx.put(f"{sandbox_url}/_sandbox/push", json=settings, timeout=10).raise_for_status()
    except httpx.HTTPError as error:
        return f"the sandbox does not push ({error}); changes come by poll only"
    return None


def push_summary(sandbox_url: str, sources: Counter[str]) -> str:
    """Changes seen by push and by poll, and what the sandbox's pusher has done."""
    line = (
        f"changes by push: [bold cyan]{sources['push']}[/], by poll: [bold]{sources['poll']}[/]   "
    )
    try:
        response = httpx.get(f"{sandbox_url}/_sandbox/stats", timeout=2)
        response.raise_for_status()
        pushes = response.json()["pushes"]
    except (httpx.HTTPError, ValueError, KeyError):
        return line + "carrier pushes: [red]unknown[/]"
    return line + (
        f"carrier pushes sent: {pushes['sent']}, dropped: {pushes['dropped']}, "
        f"failed: {pushes['failed']}, given up: {pushes['given_up']}"
    )


def api_example(sessions: sessionmaker[Session], port: int, order_code: str) -> str:
    """A new token for the first demo account, and a curl line that reads one of its orders."""
    with sessions.begin() as session:
        _, token = create_token(session, DEMO_ACCOUNTS[0], "demo")
    return (
        f"curl -H 'Authorization: Bearer {token}' http://127.0.0.1:{port}/v1/shipments/{order_code}"
    )


def detection_delay_s(
    event_time: datetime, seen_at: datetime, clock: tuple[datetime, datetime], speed: float
) -> float:
    """Carrier seconds from a change to shipmon seeing it. `clock` is one reading of the
    sandbox's clock and the real time it was read at; the sandbox runs `speed` times real time."""
    carrier_now, real_now = clock
    seen_by_carrier_clock = carrier_now + (seen_at - real_now) * speed
    return max(0.0, (seen_by_carrier_clock - event_time).total_seconds())


def _carrier_clock(sandbox_url: str) -> tuple[datetime, datetime] | None:
    """The sandbox clock's reading and when it was taken; None when it does not answer."""
    try:
        response = httpx.get(f"{sandbox_url}/_sandbox/stats", timeout=2)
        response.raise_for_status()
        return datetime.fromisoformat(response.json()["now"]), datetime.now(UTC)
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


CHART_POINTS = 40


@dataclass
class Chart:
    """Polls per second and the median detection delay, one point per refresh of the view."""

    speed: float
    polls: deque[float] = field(default_factory=lambda: deque(maxlen=CHART_POINTS))
    delays: deque[float | None] = field(default_factory=lambda: deque(maxlen=CHART_POINTS))
    _last_polls: int | None = None
    _last_at: float = 0.0

    def add(self, polls_made: int, delays_s: list[float]) -> None:
        """The poll counter now, and the detection delays of the changes seen since the last."""
        now = time.monotonic()
        if self._last_polls is not None and now > self._last_at:
            self.polls.append((polls_made - self._last_polls) / (now - self._last_at))
            self.delays.append(statistics.median(delays_s) if delays_s else None)
        self._last_polls, self._last_at = polls_made, now

    def render(self) -> str:
        seen = [d for d in self.delays if d is not None]
        latest = f"{seen[-1] / 60:,.0f} min" if seen else "—"
        rate = f"{self.polls[-1]:,.1f}/s" if self.polls else "—"
        return (
            f"polls per second      {sparkline(list(self.polls)):<{CHART_POINTS}} now {rate}\n"
            f"detection delay       {sparkline(list(self.delays)):<{CHART_POINTS}} "
            f"median {latest} of carrier time"
        )


@dataclass
class DemoView:
    """The live terminal view, read from the database every second."""

    sessions: sessionmaker[Session]
    receiver: Receiver
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    sandbox_url: str = ""
    recent: deque[tuple[str, ...]] = field(default_factory=lambda: deque(maxlen=12))
    sources: Counter[str] = field(default_factory=Counter)
    last_event_id: int = 0
    chart: Chart = field(default_factory=lambda: Chart(speed=1.0))
    _clock: tuple[datetime, datetime] | None = None

    def render(self) -> Group:
        with self.sessions.begin() as session:
            by_status = session.execute(
                select(func.coalesce(Shipment.status, "(not found yet)"), func.count())
                .join(Account)
                .where(Account.name.in_(DEMO_ACCOUNTS))
                .group_by(Shipment.status)
                .order_by(func.count().desc())
            ).all()
            polls, open_ = session.execute(
                select(func.coalesce(func.sum(Shipment.polls_made), 0),
                       func.count().filter(Shipment.active))
                .join(Account).where(Account.name.in_(DEMO_ACCOUNTS))
            ).one()  # fmt: skip
            events = session.scalars(
                select(OutboxEvent)
                .where(
                    OutboxEvent.id > self.last_event_id,
                    OutboxEvent.type != "shipment.tracking_event",
                )
                .order_by(OutboxEvent.id)
                .limit(200)
            ).all()
            delivered = session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(
                    Delivery.state == DeliveryState.SUCCEEDED, Delivery.created_at >= self.started
                )
            )
        if self._clock is None and self.sandbox_url:
            self._clock = _carrier_clock(self.sandbox_url)
        delays = []
        for event in events:
            self.last_event_id = event.id
            data = EventData.from_json(event.data)
            self.sources[data.source] += 1
            self.recent.append((*_event_line(data, event.type), data.source))
            if event.type == "shipment.status_changed" and data.event_time and self._clock:
                delays.append(
                    detection_delay_s(data.event_time, data.seen_at, self._clock, self.chart.speed)
                )
        self.chart.add(polls, delays)
        statuses = Table("status", "shipments", title="Shipments")
        for status, count in by_status:
            statuses.add_row(str(status), str(count))
        feed = Table(
            "order", "change", "delay reason", "carrier says", "via", title="Latest changes"
        )
        for row in self.recent:
            feed.add_row(*row)
        elapsed = (datetime.now(UTC) - self.started).total_seconds()
        summary = (
            ("[yellow]workers starting…[/]   " if not polls else "")
            + f"polls made: [bold]{polls}[/]  ({polls / max(elapsed, 1):.1f}/s)   "
            f"open shipments: [bold]{open_}[/]   "
            f"webhooks delivered: [bold]{delivered}[/], verified by the receiver: "
            f"[bold green]{self.receiver.verified}[/], rejected: [red]{self.receiver.rejected}[/]"
        )
        if self.sandbox_url:
            summary += "\n" + push_summary(self.sandbox_url, self.sources)
        return Group(
            Panel(summary, title="shipmon demo"),
            Panel(self.chart.render(), title="live", highlight=False),
            statuses,
            feed,
        )


def _event_line(data: EventData, type_: str) -> tuple[str, str, str, str]:
    previous = (data.previous_status.name if data.previous_status else None) or "—"
    status = data.status.name or "—"
    change = {
        "shipment.status_changed": f"{previous} → {status}",
        "shipment.delayed": f"delayed in {status}",
    }.get(type_, type_.removeprefix("shipment."))
    delay = (data.delay.reason if data.delay else None) or ""
    return data.order_code, change, delay, data.status.tracking_name or ""


def watch(view: DemoView, duration: float | None) -> None:
    """Refresh the view until Ctrl-C or the end of `duration` seconds."""
    deadline = None if duration is None else time.monotonic() + duration
    with Live(view.render(), refresh_per_second=2, screen=False) as live:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(1)
            live.update(view.render())
