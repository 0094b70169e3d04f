"""`POST /carrier/247/status`: the carrier's own status pushes (SPEC §8).

The carrier is not a merchant's backend: it authenticates with the account's API key in the
body (or Basic auth), and expects its own answer shape, `{"IsError": ..., "ErrorMessage": ...}`,
not problem+json. A push is verified, applied in one short transaction and answered; webhooks
go out from the outbox, by the delivery sweep, like every other event.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from worker.api.deps import ApiState
from worker.api.limits import BodyLimit
from worker.carrier.push import PushRefused, StatusPush, parse_push
from worker.core.crypto import keyed_digest, password_matches
from worker.domain.models import Account, OutboxEvent
from worker.scheduling.model import DEFAULT_MAX_INTERVAL
from worker.tracking.intake import PushBatch, prepare_pushes, receive_push
from worker.tracking.record import PollContext

PUSH_PATH = "/carrier/247/status"

log = logging.getLogger(__name__)

router = APIRouter(tags=["carrier"])


class PushAnswer(BaseModel):
    """The answer 247Express expects; it retries a push answered with `IsError: true`."""

    IsError: bool
    ErrorMessage: str


class NotAuthenticated(Exception):
    """Neither the body's ApiKey nor the Basic auth credentials name an account."""


def _answer(status: int, error: str = "") -> JSONResponse:
    return JSONResponse(
        PushAnswer(IsError=bool(error), ErrorMessage=error).model_dump(), status_code=status
    )


# The answer to nearly every push, rendered once.
_APPLIED = _answer(200).body


class PushBodyLimit(BodyLimit):
    """Pushes are small: refuse one over MAX_PUSH_BYTES with 413, in the carrier's shape."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PUSH_PATH:
            await super().__call__(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _answer(413, f"the push is over {self.limit} bytes; send one status per push")
        response.headers["connection"] = "close"
        await response(scope, receive, send)


@router.post(
    PUSH_PATH,
    response_model=PushAnswer,
    responses={
        400: {"model": PushAnswer, "description": "The push cannot be read."},
        401: {"model": PushAnswer, "description": "Neither ApiKey nor Basic auth is valid."},
        413: {"model": PushAnswer, "description": "The push is over 64 KiB."},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def status_push(request: Request) -> Response:
    """Receive one status change pushed by 247Express for an account's order."""
    # Like the hot read, this route takes no injected dependencies: they cost a push's time.
    state: ApiState = request.app.state.shipmon
    body = await request.body()
    try:
        push = parse_push(body)
        await state.pushes.apply(state, push, request.headers.get("authorization"))
    except PushRefused as error:
        return _answer(400, str(error))
    except NotAuthenticated as error:
        return _answer(401, str(error))
    return Response(_APPLIED, media_type="application/json")


@dataclass(frozen=True, slots=True)
class PushAccount:
    """The account a push authenticated as: a copy of its id and name, safe to keep between
    transactions and threads (an ORM row is neither)."""

    id: int
    name: str


class AccountCache:
    """The accounts pushes authenticated as, by a keyed digest of their credentials, so most
    batches read no account at all.

    An entry lives for SECONDS: a replaced API key or push password stops authenticating pushes
    within that, and a new one works at once (only accounts found are kept, never refusals).
    A removed account needs no wait: a batch applied for it fails (its rows are gone), and the
    batch clears the cache before applying its pushes one by one.
    """

    # One lookup per account every two seconds is nothing at hundreds of batches a second.
    SECONDS = 2.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._found: dict[tuple[bool, str], tuple[float, PushAccount]] = {}

    def get(self, credential: tuple[bool, str]) -> PushAccount | None:
        """The account found for this credential less than SECONDS ago, if any."""
        entry = self._found.get(credential)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    def put(self, credential: tuple[bool, str], account: PushAccount) -> None:
        self._found[credential] = (self._clock() + self.SECONDS, account)

    def clear(self) -> None:
        self._found.clear()


@dataclass
class _Pending:
    push: StatusPush
    authorization: str | None
    answered: asyncio.Future[None]


class PushBatcher:
    """Applies the pushes that arrive while earlier ones are being applied together, in one
    transaction, and answers each only once that transaction has committed.

    One transaction per push cost most of a push's time; pushes come in bursts, so a batch
    forms by itself while the previous one commits, with no wait added. A batch that fails as a
    whole (a deadlock with a poll, a push no one foresaw) is applied again one push per
    transaction, so one bad push never fails its neighbours.
    """

    MAX_BATCH = 100
    # Batches in flight at once. One: the next gathers while it applies and commits, and is the
    # larger for it. With two, each was half the size and a push cost more CPU than overlapping
    # the commits saved (432-436 against 500-509 pushes/s on 2 cores, 2026-12-03).
    IN_FLIGHT = 1
    # Committed events go to the notify workers together, at most this often (seconds) while
    # pushes keep coming and at once when they stop: queueing a task cost a tenth of a batch.
    # Ids lost with the process are the delivery sweep's, as every event not fanned out is.
    DELIVERY_INTERVAL = 0.05

    def __init__(self, accounts: AccountCache | None = None) -> None:
        self.accounts = accounts or AccountCache()
        self._waiting: list[_Pending] = []
        self._draining = 0
        self._tasks: set[asyncio.Task[None]] = set()  # held, so none is collected while it runs
        self._undelivered: list[int] = []
        self._delivered_at = -math.inf

    async def apply(self, state: ApiState, push: StatusPush, authorization: str | None) -> None:
        """Apply `push`; raises NotAuthenticated or PushRefused as the carrier should hear."""
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending(push, authorization, answered))
        if self._draining < self.IN_FLIGHT:
            self._draining += 1
            task = asyncio.create_task(self._drain(state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await answered

    async def _drain(self, state: ApiState) -> None:
        try:
            await self._apply_waiting(state)
        finally:
            # Counted out in the same step as the last look at `_waiting`, not in a done
            # callback: a push taken in between would find no room and wait for no one.
            self._draining -= 1

    async def _apply_waiting(self, state: ApiState) -> None:
        while self._waiting:
            batch = self._waiting[: self.MAX_BATCH]
            del self._waiting[: self.MAX_BATCH]
            try:
                outcomes, committed = await run_in_threadpool(_apply_batch, state, batch)
            except Exception as error:
                outcomes, committed = [error] * len(batch), []
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.answered.done():  # the carrier hung up
                    continue
                if outcome is None:
                    pending.answered.set_result(None)
                else:
                    pending.answered.set_exception(outcome)
            self._undelivered += committed
            now = time.monotonic()
            due = not self._waiting or now - self._delivered_at >= self.DELIVERY_INTERVAL
            if self._undelivered and due:
                event_ids, self._undelivered = self._undelivered, []
                self._delivered_at = now
                await run_in_threadpool(state.deliver, event_ids)


def _apply_batch(
    state: ApiState, batch: list[_Pending]
) -> tuple[list[Exception | None], list[int]]:
    """Each push's outcome (None once applied or a resend ignored, else what refused it), and
    the ids of the outbox events committed."""
    events: list[OutboxEvent] = []
    try:
        with state.sessions.begin() as session:
            outcomes = _receive_together(session, state, batch, events)
    except Exception:  # whatever failed the batch, each push is tried alone
        log.warning("a batch of %d pushes failed; applying them one by one", len(batch))
        # Perhaps for an account removed since it was cached: each push finds its own again.
        state.pushes.accounts.clear()
        outcomes, events = [], []
        for pending in batch:
            committed: list[OutboxEvent] = []
            try:
                with state.sessions.begin() as session:
                    [outcome] = _receive_together(session, state, [pending], committed)
            except Exception as error:  # this push's failure is its own
                outcome = error
                committed = []
            outcomes.append(outcome)
            events.extend(committed)
    return outcomes, [event.id for event in events]


def _receive_together(
    session: Session, state: ApiState, batch: list[_Pending], events: list[OutboxEvent]
) -> list[Exception | None]:
    """Apply these pushes in the caller's transaction; each one's outcome, as `_apply_batch`."""
    # Nothing applying a push reads needs the previous push's writes flushed: they go out
    # together at the commit, a few statements for the whole batch.
    with session.no_autoflush:
        accounts = _Accounts(session, state)
        prepared = prepare_pushes(session, list(accounts.known(batch)))
        outcomes = [
            _receive(session, state, accounts, pending, events, prepared) for pending in batch
        ]
        prepared.finish(session)
    return outcomes


class _Accounts:
    """The accounts a batch's pushes authenticate as: from the process's cache, else looked up
    once per credential."""

    def __init__(self, session: Session, state: ApiState) -> None:
        self.session, self.state = session, state
        self._found: dict[tuple[bool, str], PushAccount | NotAuthenticated] = {}

    def known(self, batch: list[_Pending]) -> Iterator[tuple[PushAccount, StatusPush]]:
        """Each push that authenticates, with its account."""
        for pending in batch:
            with contextlib.suppress(NotAuthenticated):
                yield self.of(pending.push, pending.authorization), pending.push

    def of(self, push: StatusPush, authorization: str | None) -> PushAccount:
        # What `_account` decides by: the Basic credentials when sent, else the body's ApiKey;
        # kept by digest, so no credential stays in memory as it was sent.
        basic = authorization is not None and authorization[:6].lower() == "basic "
        sent = authorization if basic else push.api_key
        credential = (basic, keyed_digest(sent or "", self.state.secret_key))
        if credential not in self._found:
            cache = self.state.pushes.accounts
            cached = cache.get(credential)
            try:
                if cached is None:
                    account = _account(self.session, self.state, push, authorization)
                    cached = PushAccount(account.id, account.name)
                    cache.put(credential, cached)
                self._found[credential] = cached
            except NotAuthenticated as refusal:
                self._found[credential] = refusal
        found = self._found[credential]
        if isinstance(found, NotAuthenticated):
            raise NotAuthenticated(str(found))
        return found


def _receive(
    session: Session,
    state: ApiState,
    accounts: _Accounts,
    pending: _Pending,
    events: list[OutboxEvent],
    batch: PushBatch,
) -> Exception | None:
    """Apply one push in the caller's transaction; a refusal is returned, having written
    nothing, so the rest of the batch goes on."""
    push = pending.push
    try:
        account = accounts.of(push, pending.authorization)
        plans = state.plans
        setting = state.settings.max_poll_interval
        ceiling = plans.max_interval(
            account.id, timedelta(seconds=setting) if setting else DEFAULT_MAX_INTERVAL
        )
        model = plans.current(session)
        ctx = PollContext(
            datetime.now(UTC),
            model,
            plans.price(account.id),
            ceiling,
            pushes=model.coverage(account.id),
        )
        received = receive_push(session, account, push, ctx, batch)
    except (NotAuthenticated, PushRefused) as refusal:
        return refusal
    log.debug(
        "carrier push for order %s: %s",
        push.order_code,
        "resent, ignored" if received.duplicate else f"{len(received.events)} events",
        extra={"order_code": push.order_code, "account": account.name},
    )
    events.extend(received.events)
    return None


def _account(
    session: Session, state: ApiState, push: StatusPush, authorization: str | None
) -> Account:
    """The account Basic auth names (when sent), else the one whose API key is the body's."""
    if authorization is not None and authorization[:6].lower() == "basic ":
        name, password = _basic(authorization[6:])
        account = session.scalar(select(Account).where(Account.name == name))
        stored = account.push_password_hash if account is not None else None
        if account is None or stored is None or not password_matches(password, stored):
            raise NotAuthenticated(
                "Basic auth refused: use the account's name and the password set with "
                "`shipmon account set-push-auth ACCOUNT`"
            )
        return account
    if push.api_key is None:
        raise NotAuthenticated("ApiKey is missing: send the account's 247Express API key")
    # Under the current key and, while `shipmon secrets rotate` runs, the old ones.
    keys = [state.secret_key, *(k.get_secret_value() for k in state.settings.old_secret_keys)]
    digests = [keyed_digest(push.api_key, key) for key in keys]
    accounts = session.scalars(
        select(Account).where(Account.api_key_digest.in_(digests)).limit(2)
    ).all()
    matching = [
        a for a in accounts if any(hmac.compare_digest(a.api_key_digest or "", d) for d in digests)
    ]
    if len(matching) != 1:
        # Two accounts with one key cannot tell which one a push is for: Basic auth can.
        raise NotAuthenticated(
            "ApiKey is not the API key of one shipmon account: check the key the carrier "
            "pushes with, or use Basic auth (`shipmon account set-push-auth ACCOUNT`)"
        )
    return matching[0]


def _basic(credentials: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        decoded = ""
    name, colon, password = decoded.partition(":")
    if not colon:
        raise NotAuthenticated(
            "the Authorization header is not Basic auth (base64 of name:password)"
        )
    return name, password
