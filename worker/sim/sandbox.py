"""The sandbox: an emulated 247Express tracking API, for demos, tests and benchmarks.

It serves the carrier's tracking endpoint from a `Carrier` world (worker.sim.workload) on its own
clock, which may run faster than real time, injects the transport faults seen in real life
(HTTP 500, hangs, truncated JSON and HTML error pages, slow answers) and hostile answers
(NUL bytes, huge numbers, bodies of 50 MB or gzip bombs), and exposes the admin API
of SPEC §5 under `/_sandbox/` so tests and demos can create accounts and orders, move orders
on, read the truth and change the faults.

It can also push status changes as the carrier does (SPEC §8, `PUT /_sandbox/push`): a
`Pusher` in the sandbox's own event loop sends each transition to a URL once the sandbox clock
passes it, late by a lognormal delay (so pushes arrive out of order), lost or doubled by chance,
and retried with backoff when the receiver fails. Every wait is on the sandbox clock, so
`--speed` speeds pushes up with everything else, and a test's manual clock controls them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import hashlib
import heapq
import itertools
import json
import math
import random
import signal
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp
import httpx
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from worker.domain.vocabulary import ErrorCode, Status
from worker.sim.workload import (
    Carrier,
    Change,
    ConflictError,
    Faults,
    OrderTruth,
    Transition,
    UnknownAccountError,
    UnknownOrderError,
    Workload,
    default_workload,
    error_json,
    generate_orders,
    load_workload,
)

TRACKING_PATH = "/api/Order/v1/Tracking"
DEFAULT_PORT = 8247
# z-score of the 99th percentile: sigma of a lognormal from its p50 and p99.
_Z99 = 2.3263478740408408
_MAX_EXPONENT = 700.0


class Clock(Protocol):
    """The sandbox's notion of now (timezone-aware)."""

    def now(self) -> datetime: ...


class SpeedClock:
    """Sandbox time that starts at `start` (default: now) and runs `speed` times real time."""

    def __init__(self, speed: float = 1.0, start: datetime | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self._start = start or datetime.now(UTC)
        self._real_start = datetime.now(UTC)

    def now(self) -> datetime:
        return self._start + (datetime.now(UTC) - self._real_start) * self.speed

    def real_seconds(self, sandbox_seconds: float) -> float:
        """How long a span of sandbox time lasts in real time."""
        return sandbox_seconds / self.speed


class ManualClock:
    """A clock that moves only when told to, for tests."""

    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def set(self, at: datetime) -> None:
        self._now = at

    def advance(self, by: timedelta) -> None:
        self._now += by


@dataclass
class FaultInjector:
    """Draws the fault (if any) and the latency of each request, and counts what it injected."""

    faults: Faults
    rng: random.Random
    injected: Counter[str] = field(default_factory=Counter)

    def draw(self) -> str | None:
        """The fault for one request: http_500, timeout, malformed, carrier_exception, hostile
        or None."""
        faults = self.faults
        roll = self.rng.random()
        for kind, chance in (
            ("http_500", faults.http_500),
            ("timeout", faults.timeout),
            ("malformed", faults.malformed),
            ("carrier_exception", faults.carrier_exception),
            ("hostile", faults.hostile),
        ):
            if roll < chance:
                self.injected[kind] += 1
                return kind
            roll -= chance
        return None

    def latency(self) -> float:
        """Seconds to wait before answering, lognormal between slow_ms's p50 and p99."""
        if self.faults.slow_ms is None:
            return 0.0
        p50, p99 = self.faults.slow_ms
        if p50 <= 0:
            return 0.0
        self.injected["slow"] += 1
        return lognormal(p50, p99, self.rng) / 1000.0


def lognormal(p50: float, p99: float, rng: random.Random) -> float:
    """A lognormal draw with median `p50` and 99th percentile `p99` (0 when p50 is 0)."""
    if p50 <= 0:
        return 0.0
    sigma = math.log(p99 / p50) / _Z99
    # Drawn in logs: a wide spread would overflow exp(); a draw that large means "never".
    return math.exp(min(math.log(p50) + sigma * rng.gauss(0.0, 1.0), _MAX_EXPONENT))


class PushSettings(BaseModel):
    """The body of `PUT /_sandbox/push`: where to push, and how lossy the pushing is."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(pattern=r"^https?://[^\s/]+(/\S*)?$", max_length=2000)
    drop: float = Field(default=0.0, ge=0.0, le=1.0)
    duplicate: float = Field(default=0.0, ge=0.0, le=1.0)
    delay_s: tuple[float, float] = (0.0, 0.0)

    @field_validator("url")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is not None and not urlsplit(value).hostname:
            raise ValueError("url must name a host, as http://HOST:PORT/PATH")
        return value

    @field_validator("delay_s")
    @classmethod
    def _spread(cls, value: tuple[float, float]) -> tuple[float, float]:
        p50, p99 = value
        if not (math.isfinite(p50) and math.isfinite(p99)) or not 0 <= p50 <= p99 <= _WEEK_S:
            raise ValueError("delay_s must be [p50, p99] seconds with 0 <= p50 <= p99 <= 604800")
        return value


_WEEK_S = 7 * 86400.0
# Attempts of one push, and the sandbox seconds the carrier waits before each retry.
PUSH_RETRY_BACKOFF_S = (30.0, 120.0, 480.0)
PUSH_CONCURRENCY = 16
PUSH_TIMEOUT_S = 10.0
# A receiver's answer is a small JSON object; more than this is not read.
_PUSH_ANSWER_LIMIT = 64 * 1024
# How often, in real seconds, the pusher looks for transitions and pushes that are due.
_PUSH_TICK_S = 0.02


@dataclass(order=True)
class _Delivery:
    due: float  # sandbox epoch seconds
    sequence: int
    change: Change = field(compare=False)
    attempt: int = field(default=0, compare=False)


class Pusher:
    """Pushes the world's transitions to one URL as the carrier would, and counts what it did.

    Counted: `sent` (pushes the receiver took), `dropped` (transitions never pushed),
    `duplicated` (transitions pushed twice), `failed` (attempts refused or unanswered),
    `retried` and `given_up` (pushes abandoned after the last retry).
    """

    def __init__(self, world: Carrier, clock: Clock, seed: int) -> None:
        self.world = world
        self.clock = clock
        self.settings = PushSettings(url=None)
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(f"push:{seed}")
        self._queue: list[_Delivery] = []
        self._sequence = itertools.count()
        self._sending: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(PUSH_CONCURRENCY)
        self._client: aiohttp.ClientSession | None = None

    def configure(self, settings: PushSettings) -> None:
        """Push later transitions as `settings` say; a null URL stops and forgets pending ones."""
        self._queue.clear()
        self.settings = settings
        if settings.url is None:
            self.world.unwatch()
        else:
            self.world.watch(self.clock.now())

    def stats(self) -> dict[str, Any]:
        names = ("sent", "dropped", "duplicated", "failed", "retried", "given_up")
        return {
            "url": self.settings.url,
            **{name: self.counts[name] for name in names},
            "pending": len(self._queue) + len(self._sending),
        }

    async def run(self) -> None:
        """Queue transitions and send due pushes until cancelled."""
        # aiohttp rather than httpx here: a push costs a fraction of the CPU, and the pusher
        # shares the tracking endpoint's core.
        timeout = aiohttp.ClientTimeout(total=PUSH_TIMEOUT_S, connect=min(PUSH_TIMEOUT_S, 5.0))
        connector = aiohttp.TCPConnector(limit=PUSH_CONCURRENCY)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=connector, trust_env=False
        ) as client:
            self._client = client
            try:
                while True:
                    self.tick()
                    await asyncio.sleep(_PUSH_TICK_S)
            finally:
                for task in list(self._sending):
                    task.cancel()
                await asyncio.gather(*self._sending, return_exceptions=True)

    def tick(self) -> None:
        """Queue the transitions the clock has passed and start sending the pushes now due."""
        now = self.clock.now()
        settings = self.settings
        for change in self.world.changes(now):
            if self._rng.random() < settings.drop:
                self.counts["dropped"] += 1
                continue
            copies = 1
            if self._rng.random() < settings.duplicate:
                self.counts["duplicated"] += 1
                copies = 2
            for _ in range(copies):
                delay = lognormal(*settings.delay_s, self._rng)
                self._schedule(change, change.at.timestamp() + delay, attempt=0)
        ts = now.timestamp()
        while self._queue and self._queue[0].due <= ts and self._client is not None:
            delivery = heapq.heappop(self._queue)
            task = asyncio.create_task(self._send(self._client, delivery))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    def _schedule(self, change: Change, due: float, attempt: int) -> None:
        heapq.heappush(self._queue, _Delivery(due, next(self._sequence), change, attempt))

    async def _send(self, client: aiohttp.ClientSession, delivery: _Delivery) -> None:
        url = self.settings.url
        if url is None:
            return  # pushing stopped while this one waited
        async with self._limit:
            accepted = await _push_accepted(client, url, delivery.change.body)
        if accepted:
            self.counts["sent"] += 1
            return
        self.counts["failed"] += 1
        if delivery.attempt >= len(PUSH_RETRY_BACKOFF_S):
            self.counts["given_up"] += 1
            return
        self.counts["retried"] += 1
        backoff = PUSH_RETRY_BACKOFF_S[delivery.attempt]
        retry_at = self.clock.now().timestamp() + backoff
        self._schedule(delivery.change, retry_at, delivery.attempt + 1)


async def _push_accepted(client: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bool:
    """Whether the receiver took the push: HTTP 200 without `"IsError": true` in its answer."""
    try:
        async with client.post(url, json=body, allow_redirects=False) as response:
            if response.status != 200:
                return False
            answer = b""
            while chunk := await response.content.read(_PUSH_ANSWER_LIMIT + 1 - len(answer)):
                answer += chunk
                if len(answer) > _PUSH_ANSWER_LIMIT:
                    return False
    except (aiohttp.ClientError, TimeoutError, ValueError):  # ValueError: a URL yarl refuses
        return False
    try:
        parsed = json.loads(answer)
    except ValueError:
        return True  # a 200 with no JSON is taken, as the carrier reads only the status then
    return not (isinstance(parsed, dict) and parsed.get("IsError") is True)


@dataclass
class _State:
    world: Carrier
    clock: Clock
    faults: FaultInjector
    pusher: Pusher


_STATE = web.AppKey("state", _State)

_JSON = "application/json"
_GATEWAY_PAGE = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_RUNTIME_ERROR_PAGE = (
    "<!DOCTYPE html>\r\n<html><head><title>Runtime Error</title></head><body>"
    "<h1>Server Error in '/' Application.</h1><h2><i>Runtime Error</i></h2></body></html>"
)
_SERVER_ERROR = b'{"Message":"An error has occurred."}'


def create_app(
    world: Carrier, clock: Clock, faults: Faults | None = None, seed: int = 0
) -> web.Application:
    """The sandbox's web application: the tracking endpoint and the `/_sandbox/` admin API.

    `faults` defaults to the world's workload faults; `seed` fixes which requests they hit.
    """
    app = web.Application()
    chosen = faults if faults is not None else world.workload.faults
    injector = FaultInjector(chosen, random.Random(f"faults:{seed}"))
    pusher = Pusher(world, clock, seed)
    app[_STATE] = _State(world=world, clock=clock, faults=injector, pusher=pusher)
    app.cleanup_ctx.append(functools.partial(_pushing, pusher))
    app.router.add_get(TRACKING_PATH, _track)
    app.router.add_post("/_sandbox/accounts", _add_account)
    app.router.add_post("/_sandbox/orders", _add_order)
    app.router.add_post("/_sandbox/orders/{code}/advance", _advance)
    app.router.add_get("/_sandbox/orders/{code}", _order)
    app.router.add_get("/_sandbox/stats", _stats)
    app.router.add_put("/_sandbox/faults", _set_faults)
    app.router.add_put("/_sandbox/push", _set_push)
    return app


async def _pushing(pusher: Pusher, app: web.Application) -> AsyncIterator[None]:
    """Run the pusher for as long as the application serves."""
    task = asyncio.create_task(pusher.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# --- the carrier's endpoint ---


async def _track(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    apikey = order_code = None
    # The carrier's framework binds query parameters case-insensitively (apikey, apiKey).
    for name, value in request.query.items():
        lowered = name.lower()
        if lowered == "apikey":
            apikey = value
        elif lowered == "ordercode":
            order_code = value
    now = state.clock.now()
    fault = state.faults.draw()
    # Like the real API, every request counts toward the quotas, failed ones included.
    refusal = state.world.count_request(apikey, now)
    if fault == "timeout":
        await asyncio.sleep(state.faults.faults.hang_seconds)
        _drop_connection(request)
        return web.Response()
    latency = state.faults.latency()
    if latency:
        await asyncio.sleep(latency)
    if fault == "http_500":
        return web.Response(status=500, body=_SERVER_ERROR, content_type=_JSON)
    if refusal is not None:
        body = error_json(refusal)
    elif fault == "carrier_exception":
        body = error_json(ErrorCode.EXCEPTION)
    else:
        assert apikey is not None  # count_request refuses a missing key
        body = state.world.lookup_json(apikey, order_code, now)
    if fault == "malformed":
        return _malformed(body, state.faults.rng)
    if fault == "hostile":
        return await _hostile(request, body, state.faults.rng)
    return web.Response(body=body, content_type=_JSON, charset="utf-8")


def _drop_connection(request: web.Request) -> None:
    """Close the connection without an answer, as a gateway that gave up does."""
    transport = request.transport
    if transport is not None:
        transport.close()


def _malformed(body: bytes, rng: random.Random) -> web.Response:
    """A broken answer: truncated JSON, or an HTML error page from a gateway or the server."""
    roll = rng.random()
    if roll < 0.5:
        cut = max(1, int(len(body) * rng.random()))
        return web.Response(body=body[:cut], content_type=_JSON, charset="utf-8")
    if roll < 0.75:
        return web.Response(status=502, text=_GATEWAY_PAGE, content_type="text/html")
    return web.Response(text=_RUNTIME_ERROR_PAGE, content_type="text/html")


# The hostile answers: each either means what the true answer means once NUL bytes are
# stripped and text is cut to its column, or is no tracking answer at all.
HOSTILE_KINDS = (
    "nul",
    "long_text",
    "huge_number",
    "unicode_digits",
    "deep",
    "wrong_type",
    "duplicate_keys",
    "huge_body",
    "gzip_bomb",
)
HUGE_BODY_BYTES = 50 * 1024 * 1024
GZIP_BOMB_BYTES = 64 * 1024 * 1024
_CHUNK = 64 * 1024


def hostile_body(body: bytes, kind: str, rng: random.Random) -> bytes:
    """The carrier's answer `body` made hostile in the way `kind` names (not the big ones)."""
    payload: dict[str, Any] = json.loads(body)
    if kind == "nul":
        return _encode_json(_with_nul(payload))
    if kind == "long_text":
        payload |= {"statusName": f"{payload.get('statusName') or ''}{'X' * 5000}",
                    "mailerTypeID": "M" * 500, "receiverName": "R" * 100_000}  # fmt: skip
    elif kind == "huge_number":
        field_, value = rng.choice(
            [("status", str(2**31)), ("quantity", 2**40), ("delayCode", "99999999999"),
             ("length", 1e300), ("price", 10**30)]
        )  # fmt: skip
        payload[field_] = value
    elif kind == "unicode_digits":
        field_, value = rng.choice([("quantity", "²"), ("quantity", "٣"), ("delayCode", "１２")])
        payload[field_] = value
    elif kind == "deep":
        depth = rng.choice([40, 100_000])
        return _encode_json(payload)[:-1] + b',"nested":' + b"[" * depth + b"]" * depth + b"}"
    elif kind == "wrong_type":
        field_ = rng.choice(sorted(payload))
        value = payload[field_]
        payload[field_] = 12345 if isinstance(value, list) else {"unexpected": [value]}
    elif kind == "duplicate_keys":
        # The decoys come first; a JSON reader keeps the last of duplicated keys.
        decoys = b'{"status":"30","STATUS":"18","statusName":"PHATTHANHCONG",'
        return decoys + _encode_json(payload)[1:]
    else:
        raise ValueError(f"no hostile body of kind {kind!r}")
    return _encode_json(payload)


def _with_nul(value: Any) -> Any:
    """Every string in `value` with a NUL byte in its middle."""
    if isinstance(value, str):
        return f"{value[: len(value) // 2]}\x00{value[len(value) // 2 :]}"
    if isinstance(value, list):
        return [_with_nul(item) for item in value]
    if isinstance(value, dict):
        return {key: _with_nul(item) for key, item in value.items()}
    return value


def _encode_json(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode()


@functools.cache
def gzip_bomb() -> bytes:
    """A gzip body that inflates to GZIP_BOMB_BYTES of one JSON object (about 64 KB sent)."""
    inflated = b'{"orderCode":"' + b"0" * (GZIP_BOMB_BYTES - 16) + b'"}'
    return gzip.compress(inflated, compresslevel=9)


async def _hostile(request: web.Request, body: bytes, rng: random.Random) -> web.StreamResponse:
    kind = rng.choice(HOSTILE_KINDS)
    if kind == "gzip_bomb":
        return web.Response(
            body=gzip_bomb(), content_type=_JSON, headers={"Content-Encoding": "gzip"}
        )
    if kind != "huge_body":
        return web.Response(body=hostile_body(body, kind, rng), content_type=_JSON)
    # Streamed, so the sandbox never holds 50 MB; the client is expected to stop reading.
    response = web.StreamResponse(headers={"Content-Type": _JSON})
    response.content_length = HUGE_BODY_BYTES
    await response.prepare(request)
    chunk = b" " * _CHUNK
    with contextlib.suppress(ConnectionError):
        for _ in range(HUGE_BODY_BYTES // _CHUNK):
            await response.write(chunk)
        await response.write_eof()
    return response


# --- the admin API ---


class _AccountIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    apikey: str = Field(min_length=1)
    daily_quota: int | None = Field(default=None, ge=0)


class _OrderIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    apikey: str
    order_code: str
    status: str | int | None = None
    delay_code: int | None = Field(default=None, gt=0)


class _AdvanceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | int | None = None
    delay_code: int | None = Field(default=None, gt=0)


_M = TypeVar("_M", bound=BaseModel)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


async def _parse_body(request: web.Request, model: type[_M], empty_ok: bool = False) -> _M:
    """The request's JSON body as `model`, or a 422 answer raised as an exception."""
    raw = await request.read()
    if not raw.strip() and empty_ok:
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(part) for part in err["loc"]), "problem": err["msg"]}
            for err in exc.errors()
        ]
        raise web.HTTPUnprocessableEntity(
            text=json.dumps({"error": "invalid body", "problems": problems}),
            content_type=_JSON,
        ) from None


def _transition_json(transition: Transition) -> dict[str, Any]:
    return {
        "at": transition.at.isoformat(),
        **_status_json(transition.status),
        "delay_code": transition.delay_code,
    }


def _status_json(status: Status) -> dict[str, Any]:
    return {"status": status.value, "carrier_id": status.carrier_id, "code": status.code}


def _truth_json(truth: OrderTruth) -> dict[str, Any]:
    return {
        "order_code": truth.order_code,
        "account": truth.account,
        "created_at": truth.created_at.isoformat(),
        "registered_at": truth.registered_at.isoformat() if truth.registered_at else None,
        "status": _status_json(truth.status) if truth.status else None,
        "delay_code": truth.delay_code,
        "history": [_transition_json(t) for t in truth.history],
        "next_transition": (
            _transition_json(truth.next_transition) if truth.next_transition else None
        ),
        "tracking": truth.body,
    }


async def _add_account(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    data = await _parse_body(request, _AccountIn)
    try:
        account = state.world.add_account(data.name, data.apikey, data.daily_quota)
    except ConflictError as exc:
        return _error(409, str(exc))
    return web.json_response(
        {"name": account.name, "apikey": account.apikey, "daily_quota": account.daily_quota},
        status=201,
    )


async def _add_order(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    data = await _parse_body(request, _OrderIn)
    now = state.clock.now()
    try:
        state.world.add_order(
            data.apikey, data.order_code, now, status=_status_arg(data.status),
            delay_code=data.delay_code,
        )  # fmt: skip
    except UnknownAccountError as exc:
        return _error(404, str(exc))
    except ConflictError as exc:
        return _error(409, str(exc))
    except ValueError as exc:
        return _error(422, str(exc))
    return web.json_response(_truth_json(state.world.truth(data.order_code, now)), status=201)


async def _advance(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    code = request.match_info["code"]
    data = await _parse_body(request, _AdvanceIn, empty_ok=True)
    now = state.clock.now()
    try:
        state.world.advance(code, now, to=_status_arg(data.to), delay_code=data.delay_code)
    except UnknownOrderError as exc:
        return _error(404, str(exc))
    except ConflictError as exc:
        return _error(409, str(exc))
    except ValueError as exc:
        return _error(422, str(exc))
    return web.json_response(_truth_json(state.world.truth(code, now)))


def _status_arg(value: str | int | None) -> str | None:
    return None if value is None else str(value)


async def _order(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    try:
        truth = state.world.truth(request.match_info["code"], state.clock.now())
    except UnknownOrderError as exc:
        return _error(404, str(exc))
    return web.json_response(_truth_json(truth))


async def _stats(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    now = state.clock.now()
    usage = state.world.usage(now)
    return web.json_response(
        {
            "now": now.isoformat(),
            "carrier_day": usage.day.isoformat(),
            "requests": {"total": usage.total, "per_key": usage.per_key},
            "faults": dict(state.faults.injected),
            "pushes": state.pusher.stats(),
            "accounts": len(state.world.accounts),
            "orders": state.world.order_count,
        }
    )


async def _set_faults(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    state.faults.faults = await _parse_body(request, Faults)
    return web.json_response(state.faults.faults.model_dump(mode="json"))


async def _set_push(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    settings = await _parse_body(request, PushSettings)
    state.pusher.configure(settings)
    return web.json_response(settings.model_dump(mode="json"))


# --- running it ---


def account_key(name: str, seed: int) -> str:
    """The API key the population mode gives an account, shaped like the carrier's keys."""
    digits = hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()
    return "-".join((digits[0:4], digits[4:8], digits[8:12], digits[12:16], digits[16:25]))


async def _populate(world: Carrier, clock: SpeedClock, seed: int) -> None:
    """Add the workload's orders as they arrive, on the sandbox clock."""
    keys = {account.name: account_key(account.name, seed) for account in world.workload.accounts}
    for arrival, account, code in generate_orders(world.workload, clock.now(), seed=seed):
        wait = (arrival - clock.now()).total_seconds()
        if wait > 0:
            await asyncio.sleep(clock.real_seconds(wait))
        world.add_order(keys[account], code, arrival)


def _open_accounts(world: Carrier, seed: int) -> list[tuple[str, str]]:
    opened = []
    for account in world.workload.accounts:
        key = account_key(account.name, seed)
        world.add_account(account.name, key)
        opened.append((account.name, key))
    return opened


async def _serve(
    host: str,
    port: int,
    workload: Workload,
    speed: float,
    seed: int,
    populate: bool,
    start: datetime | None,
) -> None:
    world = Carrier(workload, seed=seed)
    clock = SpeedClock(speed, start)
    runner = web.AppRunner(
        create_app(world, clock, seed=seed), handler_cancellation=True, access_log=None
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(
            f"The sandbox cannot listen on {host}:{port} ({exc.strerror}); "
            "choose another port (0 picks a free one)."
        ) from exc
    bound_host, bound_port = runner.addresses[0][:2]
    print(
        f"Sandbox carrier API on http://{bound_host}:{bound_port} "
        f"(workload {workload.name}, speed {speed:g}x, seed {seed})",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():  # signals reach only that one
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    population = None
    if populate:
        for name, key in _open_accounts(world, seed):
            print(f"  account {name}: apikey {key}", flush=True)
        population = asyncio.create_task(_populate(world, clock, seed))
    try:
        await stop.wait()
    finally:
        if population is not None:
            population.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await population
        await runner.cleanup()


def run_sandbox(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    workload: Path | None = None,
    speed: float = 1.0,
    seed: int | None = None,
    populate: bool = False,
    start: datetime | None = None,
) -> None:
    """Serve the sandbox until SIGINT or SIGTERM; prints its URL (port 0 picks a free one).

    With `populate`, the workload's accounts are opened (their keys printed) and its orders
    arrive at `orders_per_day` on the sandbox clock. The clock starts at `start` (default: now).
    """
    chosen = load_workload(workload) if workload is not None else default_workload()
    if seed is None:
        seed = random.SystemRandom().randrange(1_000_000)
    asyncio.run(_serve(host, port, chosen, speed, seed, populate, start))


@dataclass
class SandboxHandle:
    """A sandbox running in this process: its URL, its world and clock, and admin calls."""

    base_url: str
    world: Carrier
    clock: Clock
    admin: httpx.Client

    @property
    def tracking_url(self) -> str:
        return self.base_url + TRACKING_PATH

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.admin.request(method, path, json=body)
        response.raise_for_status()
        return response.json()

    def add_account(self, name: str, apikey: str, daily_quota: int | None = None) -> Any:
        body: dict[str, Any] = {"name": name, "apikey": apikey}
        if daily_quota is not None:
            body["daily_quota"] = daily_quota
        return self._call("POST", "/_sandbox/accounts", body)

    def add_order(
        self, apikey: str, order_code: str, status: str | None = None, delay_code: int | None = None
    ) -> Any:
        body: dict[str, Any] = {"apikey": apikey, "order_code": order_code}
        if status is not None:
            body["status"] = status
        if delay_code is not None:
            body["delay_code"] = delay_code
        return self._call("POST", "/_sandbox/orders", body)

    def advance(self, order_code: str, to: str | None = None, delay_code: int | None = None) -> Any:
        body = {key: value for key, value in (("to", to), ("delay_code", delay_code)) if value}
        return self._call("POST", f"/_sandbox/orders/{order_code}/advance", body)

    def order(self, order_code: str) -> Any:
        return self._call("GET", f"/_sandbox/orders/{order_code}")

    def stats(self) -> Any:
        return self._call("GET", "/_sandbox/stats")

    def set_faults(self, faults: dict[str, Any]) -> Any:
        return self._call("PUT", "/_sandbox/faults", faults)

    def set_push(self, push: dict[str, Any]) -> Any:
        return self._call("PUT", "/_sandbox/push", push)


@contextlib.contextmanager
def running_sandbox(
    *,
    workload: Workload | None = None,
    seed: int = 0,
    speed: float = 1.0,
    start: datetime | None = None,
    clock: Clock | None = None,
    faults: Faults | None = None,
    key_daily_quota: int = 200_000,
    global_daily_quota: int = 3_000_000,
    query_expiry_days: float = 90.0,
) -> Iterator[SandboxHandle]:
    """A sandbox served from a background thread on a free loopback port, stopped on exit.

    The clock is `clock` if given, else sandbox time from `start` at `speed`. Faults default
    to the workload's; pass `Faults()` for none.
    """
    world = Carrier(
        workload or default_workload(),
        seed=seed,
        key_daily_quota=key_daily_quota,
        global_daily_quota=global_daily_quota,
        query_expiry_days=query_expiry_days,
    )
    chosen_clock = clock or SpeedClock(speed, start)
    app = create_app(world, chosen_clock, faults, seed=seed)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)

    async def start_serving() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    thread = threading.Thread(target=loop.run_forever, name="sandbox", daemon=True)
    thread.start()
    try:
        port = asyncio.run_coroutine_threadsafe(start_serving(), loop).result(timeout=10)
        base_url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base_url, timeout=10) as admin:
            yield SandboxHandle(base_url=base_url, world=world, clock=chosen_clock, admin=admin)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
