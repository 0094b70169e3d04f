"""The polling pipeline in-process: dispatch, poll the sandbox carrier, apply, outbox events."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import httpx
import pytest
import redis
from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import RunServers
from worker.carrier.client import CarrierClient
from worker.carrier.errors import ApiKeyLimit, ApiKeyNotFound
from worker.carrier.parse import parse_tracking
from worker.core.crypto import encrypt
from worker.core.db import session_factory
from worker.domain.events import EventData
from worker.domain.models import Account, OutboxEvent, QuotaUsage, Shipment, StatusEvent
from worker.domain.pauses import FOREVER, until_words
from worker.domain.vocabulary import EventType, Status
from worker.quota.limiter import QuotaLimiter, counter_key
from worker.scheduling.learning import PlanCache
from worker.scheduling.model import LearnedModel
from worker.sim.sandbox import ManualClock, SandboxHandle, running_sandbox
from worker.sim.workload import Faults
from worker.tracking.accounts import pause
from worker.tracking.dispatch import Claim, FirstLookup, database_now, dispatch
from worker.tracking.poller import BatchReport, poll_claim
from worker.tracking.record import PollContext, apply_outcome

START = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # 09:00 in Ho Chi Minh City


@pytest.fixture
def sessions(servers: RunServers) -> sessionmaker[Session]:
    return session_factory(servers.database_url)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def sandbox(clock: ManualClock) -> Iterator[SandboxHandle]:
    with running_sandbox(clock=clock, faults=Faults(), seed=7) as handle:
        yield handle


@pytest.fixture
def account(sessions: sessionmaker[Session], sandbox: SandboxHandle) -> Iterator[Account]:
    """A committed account known to the sandbox carrier; deleted with its shipments after."""
    api_key = f"KEY-{secrets.token_hex(6)}"
    sandbox.add_account(f"carrier-{api_key}", api_key)
    with sessions.begin() as s:
        acc = Account(
            name=f"pipe-{secrets.token_hex(4)}",
            api_key_encrypted=encrypt(api_key, "test-secret-key-0123456789-abcdefghijklmnop"),
            api_key_hint=api_key[-4:],
        )
        s.add(acc)
    acc.api_key = api_key  # type: ignore[attr-defined]
    yield acc
    with sessions.begin() as s:
        s.execute(delete(Account).where(Account.id == acc.id))


class Pipeline:
    """Dispatch and poll one account's due shipments, on the sandbox's clock."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        sandbox: SandboxHandle,
        clock: ManualClock,
        account: Account,
        servers: RunServers,
    ) -> None:
        self.sessions, self.sandbox, self.clock = sessions, sandbox, clock
        self.account, self.secret = account, servers.secret_key
        self.plans = PlanCache("Asia/Ho_Chi_Minh")
        self.paused: list[str] = []
        # Every poll granted, nothing to give back, unless a test hands in a real limiter.
        self.limiter: QuotaLimiter | None = None

    def register(self, *codes: str) -> None:
        with self.sessions.begin() as s:
            for code in codes:
                s.add(
                    Shipment(
                        account_id=self.account.id,
                        order_code=code,
                        registered_at=self.clock.now(),
                        next_poll_at=self.clock.now(),
                    )
                )

    def claims(self, first_lookup: FirstLookup | None = None) -> list[Claim]:
        with self.sessions.begin() as s:
            found = dispatch(
                s,
                self.clock.now(),
                daily_quota=lambda a: 10**6,
                grant=self._grant,
                refund=lambda s, a, n: self.limiter.refund(s, a, n) if self.limiter else None,
                first_lookup=first_lookup,
            )
        if self.limiter is not None:
            for claim in found:
                self.limiter.hold(claim.account_id, claim.batch, len(claim.shipment_ids))
        return [c for c in found if c.account_id == self.account.id]

    def _grant(self, session: Session, account_id: int, wanted: int, quota: int) -> int:
        if self.limiter is None:
            return wanted
        return self.limiter.acquire(session, account_id, wanted, quota, now=self.clock.now())

    def _release(self, session: Session, account_id: int, batch: str, started: int) -> object:
        return self.limiter.release(session, account_id, batch, started) if self.limiter else 0

    def poll(self, claim: Claim, transport: httpx.AsyncBaseTransport | None = None) -> BatchReport:
        async def run() -> BatchReport:
            async with CarrierClient(
                self.sandbox.base_url, timeout=5, transport=transport
            ) as client:
                return await poll_claim(
                    self.sessions,
                    client,
                    claim,
                    secret_key=self.secret,
                    plans=self.plans,
                    max_interval=timedelta(hours=24),
                    concurrency=8,
                    pause_for_limit=lambda s, a, now: self.paused.append(a.name),
                    release=self._release,
                    clock=self.clock.now,
                )

        return asyncio.run(run())

    def poll_due(self) -> list[BatchReport]:
        return [self.poll(c) for c in self.claims()]

    def shipment(self, code: str) -> Shipment:
        with self.sessions.begin() as s:
            found = s.scalar(
                select(Shipment).where(
                    Shipment.account_id == self.account.id, Shipment.order_code == code
                )
            )
            assert found is not None
            return found

    def events(self, code: str) -> list[OutboxEvent]:
        shipment = self.shipment(code)
        with self.sessions.begin() as s:
            return list(
                s.scalars(
                    select(OutboxEvent)
                    .where(OutboxEvent.shipment_id == shipment.id)
                    .order_by(OutboxEvent.sequence)
                )
            )

    def wait_until_due(self, code: str) -> None:
        self.clock.set(max(self.clock.now(), self.shipment(code).next_poll_at))


@pytest.fixture
def pipe(
    sessions: sessionmaker[Session],
    sandbox: SandboxHandle,
    clock: ManualClock,
    account: Account,
    servers: RunServers,
) -> Pipeline:
    return Pipeline(sessions, sandbox, clock, account, servers)


def _status_changes(events: list[OutboxEvent]) -> list[tuple[str | None, str]]:
    return [
        ((e.data["previous_status"] or {}).get("name"), e.data["status"]["name"])
        for e in events
        if e.type == EventType.STATUS_CHANGED
    ]


def test_a_new_order_is_polled_at_once_and_its_status_announced(pipe: Pipeline) -> None:
    pipe.sandbox.add_order(pipe.account.api_key, "SHOP00001", status="ACCEPTED")  # type: ignore[attr-defined]
    pipe.register("SHOP00001")
    reports = pipe.poll_due()
    assert [r.polled for r in reports] == [1]
    shipment = pipe.shipment("SHOP00001")
    assert (shipment.status, shipment.status_id, shipment.status_code) == (
        "ACCEPTED",
        21,
        "DATIEPNHAN",
    )
    assert shipment.next_poll_at > pipe.clock.now()
    events = pipe.events("SHOP00001")
    assert _status_changes(events) == [(None, "ACCEPTED")]
    data = events[0].data
    assert data["order_code"] == "SHOP00001"
    assert data["account"] == pipe.account.name
    assert data["sequence"] == 1
    assert data["status"]["id"] == 21
    assert data["event_time"] is not None
    assert data["seen_at"] == START.isoformat()
    assert data["source"] == "poll"


def test_every_event_written_reads_back_as_the_same_typed_data(pipe: Pipeline) -> None:
    pipe.sandbox.add_order(pipe.account.api_key, "SHOP00009", status="ACCEPTED")  # type: ignore[attr-defined]
    pipe.register("SHOP00009")
    pipe.poll_due()
    events = pipe.events("SHOP00009")
    assert events
    for event in events:
        data = EventData.from_json(event.data)
        assert data.to_json() == event.data
        assert (data.order_code, data.sequence, data.source) == (
            "SHOP00009",
            event.sequence,
            "poll",
        )


def test_event_data_that_is_not_as_written_is_refused_saying_what_is_wrong(
    pipe: Pipeline,
) -> None:
    pipe.sandbox.add_order(pipe.account.api_key, "SHOP00010", status="ACCEPTED")  # type: ignore[attr-defined]
    pipe.register("SHOP00010")
    pipe.poll_due()
    stored = pipe.events("SHOP00010")[0].data
    with pytest.raises(ValueError, match="'seen_at' is missing"):
        EventData.from_json({k: v for k, v in stored.items() if k != "seen_at"})
    with pytest.raises(ValueError, match="source must be"):
        EventData.from_json(stored | {"source": "fax"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        EventData.from_json(stored | {"status": "DELIVERED"})


def test_several_transitions_caught_by_one_poll_each_get_one_event(pipe: Pipeline) -> None:
    key = pipe.account.api_key  # type: ignore[attr-defined]
    pipe.sandbox.add_order(key, "SHOP00002", status="ACCEPTED")
    pipe.register("SHOP00002")
    pipe.poll_due()
    for target in ("PICKED_UP", "IN_TRANSIT", "DELIVERING"):
        pipe.clock.advance(timedelta(minutes=5))
        pipe.sandbox.advance("SHOP00002", to=target)
    pipe.wait_until_due("SHOP00002")
    pipe.poll_due()
    events = pipe.events("SHOP00002")
    assert _status_changes(events) == [
        (None, "ACCEPTED"),
        ("ACCEPTED", "PICKED_UP"),
        ("PICKED_UP", "IN_TRANSIT"),
        ("IN_TRANSIT", "DELIVERING"),
    ]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    # Polling again re-sees the same history: no transition is announced a second time.
    pipe.wait_until_due("SHOP00002")
    pipe.poll_due()
    truth = [t["status"] for t in pipe.sandbox.order("SHOP00002")["history"]]
    assert _status_changes(pipe.events("SHOP00002")) == list(
        zip([None, *truth], truth, strict=False)
    )
    with pipe.sessions.begin() as s:
        history = s.scalars(
            select(StatusEvent.status)
            .join(Shipment)
            .where(Shipment.order_code == "SHOP00002")
            .order_by(StatusEvent.occurred_at)
        ).all()
    assert list(history) == truth


def test_a_terminal_status_gets_one_settle_poll_then_polling_stops(pipe: Pipeline) -> None:
    key = pipe.account.api_key  # type: ignore[attr-defined]
    pipe.sandbox.add_order(key, "SHOP00003", status="DELIVERING")
    pipe.register("SHOP00003")
    pipe.poll_due()
    pipe.clock.advance(timedelta(minutes=30))
    pipe.sandbox.advance("SHOP00003", to="DELIVERED")
    pipe.wait_until_due("SHOP00003")
    pipe.poll_due()
    shipment = pipe.shipment("SHOP00003")
    assert shipment.status == Status.DELIVERED
    assert shipment.terminal_at is not None
    assert shipment.active  # the settle poll is still to come
    pipe.wait_until_due("SHOP00003")
    pipe.poll_due()
    shipment = pipe.shipment("SHOP00003")
    assert not shipment.active
    assert shipment.polls_made == 3
    pipe.clock.advance(timedelta(days=2))
    assert pipe.claims() == []


def test_an_order_unknown_to_the_carrier_is_retried_then_given_up(pipe: Pipeline) -> None:
    pipe.register("NEVERSEEN1")
    pipe.poll_due()
    shipment = pipe.shipment("NEVERSEEN1")
    assert shipment.active
    assert shipment.last_error_code == "ORDERCODE_NOT_FOUND"
    assert shipment.next_poll_at > pipe.clock.now()
    pipe.clock.advance(timedelta(days=3, minutes=1))
    pipe.poll_due()
    shipment = pipe.shipment("NEVERSEEN1")
    assert not shipment.active
    assert [e.type for e in pipe.events("NEVERSEEN1")] == [EventType.NOT_FOUND]


def test_an_order_of_another_account_stops_polling(pipe: Pipeline) -> None:
    pipe.sandbox.add_account("someone-else", "OTHER-KEY-1")
    pipe.sandbox.add_order("OTHER-KEY-1", "THEIRS0001", status="ACCEPTED")
    pipe.register("THEIRS0001")
    pipe.poll_due()
    shipment = pipe.shipment("THEIRS0001")
    assert not shipment.active
    events = pipe.events("THEIRS0001")
    assert [e.type for e in events] == [EventType.POLLING_STOPPED]
    assert events[0].data["reason"] == "ORDERCODE_DOES_NOT_BELONG_TO_YOUR_ACCOUNT"


def test_a_key_the_carrier_does_not_know_pauses_the_account(
    pipe: Pipeline, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as s:
        acc = s.get(Account, pipe.account.id)
        assert acc is not None
        acc.api_key_encrypted = encrypt("NO-SUCH-KEY", pipe.secret)
        acc.ops_email = "ops@shop.example"
    pipe.register("SHOP00004")
    reports = pipe.poll_due()
    assert reports[0].paused == "ApiKeyNotFound"
    alert = reports[0].alert
    assert alert is not None
    assert alert.ops_email == "ops@shop.example"
    assert pipe.account.name in alert.subject
    assert "shipmon account set-key" in alert.body
    # The pause waits for a person, and says so in words, not as a placeholder date.
    assert "until the key is fixed" in alert.body and "9999" not in alert.body
    with sessions.begin() as s:
        acc = s.get(Account, pipe.account.id)
        assert acc is not None
        assert acc.paused_until is not None
        assert "refused the API key" in (acc.pause_reason or "")
        assert acc.paused_until == FOREVER
        # The same refusal seen by another batch pauses nothing new and tells no one again.
        refusal = ApiKeyNotFound("refused", order_code="X", code_raw="APIKEY_NOT_FOUND",
                                 carrier_message=None)  # fmt: skip
        assert pause(s, acc, refusal, pipe.clock.now(), lambda *_: None) is None
    assert pipe.shipment("SHOP00004").active
    assert pipe.claims() == []  # paused accounts are not dispatched


def test_carrier_faults_back_off_without_losing_the_shipment(pipe: Pipeline) -> None:
    pipe.sandbox.add_order(pipe.account.api_key, "SHOP00005", status="ACCEPTED")  # type: ignore[attr-defined]
    pipe.register("SHOP00005")
    pipe.sandbox.set_faults({"http_500": 1.0})
    pipe.poll_due()
    first = pipe.shipment("SHOP00005")
    assert first.consecutive_errors == 1
    assert first.status is None
    backoff_1 = first.next_poll_at - pipe.clock.now()
    pipe.wait_until_due("SHOP00005")
    pipe.poll_due()
    second = pipe.shipment("SHOP00005")
    assert second.consecutive_errors == 2
    assert second.next_poll_at - pipe.clock.now() > backoff_1
    pipe.sandbox.set_faults({})
    pipe.wait_until_due("SHOP00005")
    pipe.poll_due()
    healed = pipe.shipment("SHOP00005")
    assert (healed.status, healed.consecutive_errors) == ("ACCEPTED", 0)


def test_a_delay_code_is_announced_with_its_reason(pipe: Pipeline) -> None:
    key = pipe.account.api_key  # type: ignore[attr-defined]
    pipe.sandbox.add_order(key, "SHOP00006", status="DELIVERING")
    pipe.register("SHOP00006")
    pipe.poll_due()
    pipe.clock.advance(timedelta(hours=1))
    pipe.sandbox.advance("SHOP00006", to="PENDING_FOR_PROCEED", delay_code=12)
    pipe.wait_until_due("SHOP00006")
    pipe.poll_due()
    delayed = [e for e in pipe.events("SHOP00006") if e.type == EventType.DELAYED]
    assert len(delayed) == 1
    assert delayed[0].data["delay"]["code"] == 12
    assert "does not answer the phone" in delayed[0].data["delay"]["reason"]


def test_claims_are_leased_so_a_second_dispatcher_or_a_redelivery_polls_nothing(
    pipe: Pipeline,
) -> None:
    pipe.sandbox.add_order(pipe.account.api_key, "SHOP00007", status="ACCEPTED")  # type: ignore[attr-defined]
    pipe.register("SHOP00007")
    first = pipe.claims()
    assert pipe.claims() == []  # a duplicate beat finds the shipment leased
    assert pipe.poll(first[0]).polled == 1
    again = pipe.poll(first[0])  # the same task delivered twice
    assert (again.polled, again.skipped) == (0, 1)
    assert _status_changes(pipe.events("SHOP00007")) == [(None, "ACCEPTED")]


def test_a_stale_answer_never_moves_a_shipment_back(
    pipe: Pipeline, sessions: sessionmaker[Session]
) -> None:
    key = pipe.account.api_key  # type: ignore[attr-defined]
    pipe.sandbox.add_order(key, "SHOP00008", status="IN_TRANSIT")
    old_body = pipe.sandbox.world.tracking_body("SHOP00008", pipe.clock.now())
    pipe.register("SHOP00008")
    pipe.clock.advance(timedelta(minutes=10))
    pipe.sandbox.advance("SHOP00008", to="DELIVERING")
    pipe.poll_due()
    assert pipe.shipment("SHOP00008").status == "DELIVERING"
    import json

    stale = parse_tracking(json.dumps(old_body).encode(), "SHOP00008")
    with sessions.begin() as s:
        shipment = s.scalar(
            select(Shipment).where(
                Shipment.order_code == "SHOP00008", Shipment.account_id == pipe.account.id
            )
        )
        acc = s.get(Account, pipe.account.id)
        assert shipment is not None and acc is not None
        ctx = PollContext(
            pipe.clock.now(), LearnedModel("Asia/Ho_Chi_Minh"), 1800.0, timedelta(hours=24)
        )
        applied = apply_outcome(s, shipment, acc, stale, ctx)
        assert applied.events == []
        assert shipment.status == "DELIVERING"


def test_a_task_that_died_after_its_lookups_leaves_them_to_a_fresh_grant(
    pipe: Pipeline,
) -> None:
    pipe.sandbox.add_order(pipe.account.api_key, "SHOP00009", status="ACCEPTED")  # type: ignore[attr-defined]
    pipe.register("SHOP00009")
    claim = pipe.claims()[0]
    started = claim.leased_until + timedelta(microseconds=1)
    with pipe.sessions.begin() as s:  # as if a task had started the claim and then died
        s.execute(
            update(Shipment).where(Shipment.id.in_(claim.shipment_ids)).values(next_poll_at=started)
        )
    redelivered = pipe.poll(claim)
    assert (redelivered.polled, redelivered.skipped) == (0, 1)
    pipe.clock.set(started)
    again = pipe.claims()  # due again once the lease is over: dispatched and granted anew
    assert [c.shipment_ids for c in again] == [claim.shipment_ids]
    assert pipe.poll(again[0]).polled == 1


def test_applying_waits_for_the_database_rather_than_losing_paid_lookups(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    import worker.tracking.poller

    pipe.sandbox.add_order(pipe.account.api_key, "SHOP00010", status="ACCEPTED")  # type: ignore[attr-defined]
    pipe.register("SHOP00010")
    real = worker.tracking.poller._apply_all
    failures = iter([OperationalError("UPDATE", {}, Exception("server closed the connection"))])

    def flaky(*args: object, **kwargs: object) -> object:
        for failure in failures:
            raise failure
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker.tracking.poller, "_apply_all", flaky)
    monkeypatch.setattr(worker.tracking.poller, "APPLY_RETRY_DELAYS", (0.0,))
    assert [r.polled for r in pipe.poll_due()] == [1]
    assert pipe.shipment("SHOP00010").status == "ACCEPTED"


def test_a_new_shipment_gets_its_planned_first_lookup_once_whatever_way_it_came_in(
    pipe: Pipeline,
) -> None:
    pipe.register("SHOP00021")
    with pipe.sessions.begin() as s:  # a plain INSERT, due at its registration like any other
        s.execute(
            text(
                "INSERT INTO shipments (account_id, order_code, registered_at, next_poll_at) "
                "VALUES (:account, 'SHOP00022', :now, :now)"
            ),
            {"account": pipe.account.id, "now": pipe.clock.now()},
        )
    planned: list[str] = []

    def first_lookup(account_id: int, registered: datetime) -> datetime:
        planned.append(f"{account_id}@{registered.isoformat()}")
        return registered + timedelta(hours=2)

    registered = pipe.clock.now()
    assert pipe.claims(first_lookup) == []
    for code in ("SHOP00021", "SHOP00022"):
        assert pipe.shipment(code).next_poll_at == registered + timedelta(hours=2)
    assert pipe.claims(first_lookup) == []  # planned once: the plan is not made again
    assert len(planned) == 2
    pipe.clock.advance(timedelta(hours=2))
    assert sorted(len(c.shipment_ids) for c in pipe.claims(first_lookup)) == [2]
    assert len(planned) == 2


def test_a_dispatcher_whose_clock_is_hours_ahead_claims_nothing_already_leased(
    sessions: sessionmaker[Session],
    account: Account,
    servers: RunServers,
    redis_client: redis.Redis[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import worker.runtime.tasks

    with sessions.begin() as s:
        now = database_now(s)
        shipments = [
            Shipment(
                account_id=account.id,
                order_code=f"SKEW{i:05d}",
                registered_at=now - timedelta(hours=2),
                next_poll_at=now - timedelta(minutes=1),
            )
            for i in range(3)
        ]
        s.add_all(shipments)
    sent: list[tuple[int, list[int], str]] = []
    settings = servers.settings()
    monkeypatch.setattr(
        worker.runtime.tasks,
        "process",
        lambda: SimpleNamespace(
            sessions=sessions,
            settings=settings,
            limiter=QuotaLimiter(redis_client, settings),
            plans=PlanCache(settings.quota_timezone),
            max_interval=timedelta(hours=24),
        ),
    )
    monkeypatch.setattr(
        worker.runtime.tasks, "poll", SimpleNamespace(delay=lambda *a: sent.append(a))
    )

    worker.runtime.tasks.dispatch()  # an honest dispatcher leases the three shipments
    leased = sorted(i for a, ids, _ in sent if a == account.id for i in ids)
    assert leased == sorted(shipment.id for shipment in shipments)
    sent.clear()
    monkeypatch.setattr(
        worker.runtime.tasks, "utcnow", lambda: datetime.now(UTC) + timedelta(hours=3)
    )
    worker.runtime.tasks.dispatch()  # a second one, on a worker whose clock runs 3 hours ahead
    assert [ids for a, ids, _ in sent if a == account.id] == []


def _spent(pipe: Pipeline, redis_client: redis.Redis[bytes]) -> tuple[int, int]:
    """The account's lookups of the sandbox's carrier day: in PostgreSQL, and in Redis."""
    day = pipe.clock.now().astimezone(ZoneInfo("Asia/Ho_Chi_Minh")).date()
    with pipe.sessions.begin() as s:
        recorded = s.scalar(
            select(QuotaUsage.used).where(
                QuotaUsage.account_id == pipe.account.id, QuotaUsage.day == day
            )
        )
    return recorded or 0, int(redis_client.get(counter_key(day, pipe.account.id)) or 0)


@pytest.fixture
def limited(pipe: Pipeline, redis_client: redis.Redis[bytes], servers: RunServers) -> Pipeline:
    """The pipeline with grants from the real quota limiter, on the sandbox's clock."""
    pipe.limiter = QuotaLimiter(redis_client, servers.settings())
    return pipe


def test_grants_of_shipments_a_poll_no_longer_holds_come_back_once(
    limited: Pipeline, redis_client: redis.Redis[bytes]
) -> None:
    pipe = limited
    codes = ["GIVE00001", "GIVE00002", "GIVE00003"]
    for code in codes:
        pipe.sandbox.add_order(pipe.account.api_key, code, status="ACCEPTED")  # type: ignore[attr-defined]
    pipe.register(*codes)
    [claim] = pipe.claims()
    assert _spent(pipe, redis_client) == (3, 3)
    stopped, moved = pipe.shipment(codes[1]), pipe.shipment(codes[2])
    with pipe.sessions.begin() as s:  # before the task starts, the merchant stops one shipment
        s.execute(update(Shipment).where(Shipment.id == stopped.id).values(active=False))
        s.execute(  # and another is leased anew, as if this lease had run out
            update(Shipment)
            .where(Shipment.id == moved.id)
            .values(next_poll_at=claim.leased_until + timedelta(minutes=5))
        )
    report = pipe.poll(claim)
    assert (report.polled, report.skipped) == (1, 2)
    assert _spent(pipe, redis_client) == (1, 1)  # the two lookups not made are spendable again
    again = pipe.poll(claim)  # the same task delivered twice: its lookup was made, keep it
    assert (again.polled, again.skipped) == (0, 3)
    assert _spent(pipe, redis_client) == (1, 1)


class PushDuringLookup(httpx.AsyncBaseTransport):
    """Forwards lookups to the sandbox; before each, a carrier push re-plans the shipment, as
    the HTTP API does when a push lands while the lookup is out."""

    def __init__(self, pipe: Pipeline, shipment_id: int) -> None:
        self.pipe, self.shipment_id = pipe, shipment_id
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with self.pipe.sessions.begin() as s:
            s.execute(
                update(Shipment)
                .where(Shipment.id == self.shipment_id)
                .values(next_poll_at=self.pipe.clock.now() + timedelta(hours=3))
            )
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_push_landing_during_the_lookup_leaves_the_answer_to_apply(pipe: Pipeline) -> None:
    pipe.sandbox.add_order(pipe.account.api_key, "MIDPUSH01", status="PICKED_UP")  # type: ignore[attr-defined]
    pipe.register("MIDPUSH01")
    [claim] = pipe.claims()
    report = pipe.poll(claim, PushDuringLookup(pipe, pipe.shipment("MIDPUSH01").id))
    assert (report.polled, report.skipped) == (1, 0)
    shipment = pipe.shipment("MIDPUSH01")
    assert shipment.status == "PICKED_UP" and shipment.polls_made == 1


def test_a_poll_task_that_waited_past_its_lease_gives_its_grants_back(
    limited: Pipeline, redis_client: redis.Redis[bytes]
) -> None:
    pipe = limited
    codes = ["LATE00001", "LATE00002"]
    for code in codes:
        pipe.sandbox.add_order(pipe.account.api_key, code, status="ACCEPTED")  # type: ignore[attr-defined]
    pipe.register(*codes)
    [late] = pipe.claims()
    pipe.clock.set(late.leased_until)  # the task waits in a backlog until its lease is over
    [fresh] = pipe.claims()  # the shipments are dispatched, and granted, anew
    assert fresh.shipment_ids == late.shipment_ids
    assert _spent(pipe, redis_client) == (4, 4)
    assert pipe.poll(late).skipped == 2
    assert _spent(pipe, redis_client) == (2, 2)
    assert pipe.poll(fresh).polled == 2
    assert _spent(pipe, redis_client) == (2, 2)


def test_a_key_refused_for_quota_sends_ops_the_limiters_careful_message_once(
    limited: Pipeline,
) -> None:
    pipe = limited
    assert pipe.limiter is not None
    refusal = ApiKeyLimit("refused", order_code="X", code_raw="APIKEY_LIMIT", carrier_message=None)
    with pipe.sessions.begin() as s:
        acc = s.get_one(Account, pipe.account.id)
        acc.ops_email = "ops@shop.example"
        alert = pause(s, acc, refusal, pipe.clock.now(), pipe.limiter.pause_for_limit)
        assert alert is not None
        assert alert.ops_email == "ops@shop.example" and pipe.account.name in alert.subject
        # What the limiter knows goes out: when polling resumes and the key's new daily plan.
        assert alert.paused_until == acc.paused_until and alert.paused_until < FOREVER
        assert "APIKEY_LIMIT" in alert.body and "daily plan" in alert.body
        assert alert.paused_until.isoformat() in alert.body
        assert pause(s, acc, refusal, pipe.clock.now(), pipe.limiter.pause_for_limit) is None


def test_a_pause_waiting_for_a_person_reads_until_fixed_whatever_date_it_holds() -> None:
    assert until_words(FOREVER) == "fixed"
    # Rows written before the one placeholder, with the held deliveries' date, read alike.
    assert until_words(datetime(9999, 12, 31, tzinfo=UTC)) == "fixed"
    assert until_words(datetime(2026, 12, 3, 17, 0, tzinfo=UTC)) == "2026-12-03 17:00 UTC"
