"""The quota limiter on real Redis and PostgreSQL, with a controllable clock."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import secrets
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import redis
from sqlalchemy import Engine, delete, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import REDIS_CLAIM_KEY, ROOT, RunServers, make_account
from worker.core.clock import utcnow
from worker.core.config import Settings
from worker.domain.models import Account, QuotaUsage, Shipment
from worker.quota.limiter import (
    PLAN_REGROWTH_SHARE,
    RESTORE_LOCK,
    QuotaLimiter,
    counter_key,
    effective_daily_quota,
    regrow_plans,
)
from worker.quota.pacing import allowed_by, elapsed_share, per_second_ceiling
from worker.tracking.dispatch import dispatch

TZ = ZoneInfo("Asia/Ho_Chi_Minh")
# A day of its own, far from today, so no other test's counters or rows are on it.
DAY1 = date(2025, 6, 2)
# Small quotas: the per-second ceiling is then 1, and a day's worth is granted in a few calls.
KEY_QUOTA, TOTAL_QUOTA = 100, 150


def local(day: date, hour: int, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, micro, tzinfo=TZ)


def flush_redis(client: redis.Redis[bytes]) -> None:
    """Lose everything, as a Redis restarted without persistence would; keep the run's claim."""
    client.flushdb()
    client.set(REDIS_CLAIM_KEY, os.getpid(), ex=3600)


def recorded(session: Session, account_id: int, day: date) -> int:
    used = session.scalar(
        select(QuotaUsage.used).where(QuotaUsage.account_id == account_id, QuotaUsage.day == day)
    )
    return used or 0


def spend_until_refused(
    limiter: QuotaLimiter, session: Session, account: Account, quota: int, at: datetime
) -> int:
    """Ask second after second from `at` until the pace line refuses; the lookups granted."""
    total = 0
    for second in range(10_000):
        granted = limiter.acquire(
            session, account.id, 10, quota, now=at + timedelta(seconds=second)
        )
        if granted == 0:
            return total
        total += granted
    raise AssertionError("the limiter never refused")


@pytest.fixture
def settings(servers: RunServers) -> Settings:
    return servers.settings(key_daily_quota=KEY_QUOTA, global_daily_quota=TOTAL_QUOTA)


@pytest.fixture
def limiter(redis_client: redis.Redis[bytes], settings: Settings) -> QuotaLimiter:
    return QuotaLimiter(redis_client, settings)


@pytest.fixture
def today_limiter(redis_client: redis.Redis[bytes], servers: RunServers) -> QuotaLimiter:
    """A limiter for today on Redis's clock. Other tests of the run (end-to-end ones) spend
    from today's total too, so the total here is the default, not the small TOTAL_QUOTA."""
    return QuotaLimiter(redis_client, servers.settings(key_daily_quota=KEY_QUOTA))


def test_ten_times_the_quota_due_never_beats_the_caps_or_the_pace_line(
    session: Session, limiter: QuotaLimiter
) -> None:
    # Two keys of 100 a day sharing 150 a day in total, both asked for far more every 10 minutes
    # for two carrier days; B asks one second after A (the global per-second ceiling is 1).
    a, b = make_account(session), make_account(session)
    quota, total_quota, wanted = KEY_QUOTA, TOTAL_QUOTA, 7
    start = local(DAY1, 0)
    granted: dict[tuple[date, int], int] = defaultdict(int)
    asked: dict[date, int] = defaultdict(int)
    for tick in range(2 * 144):
        for offset, account in enumerate((a, b)):
            now = start + timedelta(minutes=10 * tick, seconds=offset)
            day = now.astimezone(TZ).date()
            asked[day] += wanted
            granted[day, account.id] += limiter.acquire(session, account.id, wanted, quota, now=now)
            share = elapsed_share(now, TZ)
            assert granted[day, account.id] <= allowed_by(quota, share) <= quota
            assert granted[day, a.id] + granted[day, b.id] <= allowed_by(total_quota, share)
    for day in (DAY1, DAY1 + timedelta(days=1)):
        assert asked[day] >= 10 * 2 * quota
        assert granted[day, a.id] <= quota and granted[day, b.id] <= quota
        # The line is followed to its end, not merely stayed under.
        assert granted[day, a.id] + granted[day, b.id] == total_quota
        for account in (a, b):
            assert recorded(session, account.id, day) == granted[day, account.id]


def test_the_line_in_redis_is_the_line_of_pacing(
    session: Session, limiter: QuotaLimiter, redis_client: redis.Redis[bytes]
) -> None:
    account = make_account(session)
    quota = 200_000
    rng = random.Random(5)
    for i in range(150):
        day = DAY1 + timedelta(days=i)
        now = local(day, 0) + timedelta(microseconds=rng.randrange(86_400 * 10**6))
        allowed = allowed_by(quota, elapsed_share(now, TZ))
        # One lookup short of the line: exactly one is granted, then none.
        redis_client.set(counter_key(day, account.id), allowed - 1)
        redis_client.set(counter_key(day, None), 0)
        assert limiter.acquire(session, account.id, 5, quota, now=now) == 1
        assert limiter.acquire(session, account.id, 5, quota, now=now) == 0


def test_the_day_flips_at_local_midnight(
    session: Session, limiter: QuotaLimiter, redis_client: redis.Redis[bytes]
) -> None:
    account = make_account(session)
    last_second = local(DAY1, 23, 59, 59, 999_999)
    redis_client.set(counter_key(DAY1, account.id), KEY_QUOTA)
    redis_client.set(counter_key(DAY1, None), KEY_QUOTA)
    assert limiter.acquire(session, account.id, 5, KEY_QUOTA, now=last_second) == 0
    # Midnight in Ho Chi Minh City is 17:00 UTC, still the day before there.
    midnight = local(DAY1 + timedelta(days=1), 0)
    assert midnight.astimezone(UTC).date() == DAY1
    assert limiter.acquire(session, account.id, 1, KEY_QUOTA, now=midnight) == 1
    assert redis_client.get(counter_key(DAY1 + timedelta(days=1), account.id)) == b"1"
    assert recorded(session, account.id, DAY1 + timedelta(days=1)) == 1
    assert redis_client.get(counter_key(DAY1, account.id)) == str(KEY_QUOTA).encode()


def test_a_redis_flush_mid_day_causes_no_overspend(
    session: Session, limiter: QuotaLimiter, redis_client: redis.Redis[bytes]
) -> None:
    a, b = make_account(session), make_account(session)
    noon = local(DAY1, 12)
    spent_a = spend_until_refused(limiter, session, a, KEY_QUOTA, noon)
    spent_b = spend_until_refused(limiter, session, b, KEY_QUOTA, noon + timedelta(minutes=1))
    assert spent_a > 0 and spent_b > 0
    flush_redis(redis_client)

    later = noon + timedelta(minutes=2)
    assert limiter.acquire(session, a.id, 10, KEY_QUOTA, now=later) == 0
    assert redis_client.get(counter_key(DAY1, a.id)) == str(spent_a).encode()
    assert redis_client.get(counter_key(DAY1, None)) == str(spent_a + spent_b).encode()
    # Spending on to the end of the day still ends within each key's quota and the total.
    for hour in range(13, 24):
        spend_until_refused(limiter, session, a, KEY_QUOTA, local(DAY1, hour))
        spend_until_refused(limiter, session, b, KEY_QUOTA, local(DAY1, hour, 30))
    used_a, used_b = recorded(session, a.id, DAY1), recorded(session, b.id, DAY1)
    assert used_a <= KEY_QUOTA and used_b <= KEY_QUOTA and used_a + used_b <= TOTAL_QUOTA
    assert int(redis_client.get(counter_key(DAY1, None)) or 0) == used_a + used_b


def test_redis_back_from_an_older_snapshot_catches_up_before_granting(
    session: Session, limiter: QuotaLimiter, redis_client: redis.Redis[bytes]
) -> None:
    account = make_account(session)
    noon = local(DAY1, 12)
    spent = spend_until_refused(limiter, session, account, KEY_QUOTA, noon)
    redis_client.set(counter_key(DAY1, account.id), 3)
    assert limiter.acquire(session, account.id, 10, KEY_QUOTA, now=noon + timedelta(minutes=1)) == 0
    assert redis_client.get(counter_key(DAY1, account.id)) == str(spent).encode()


def test_a_fresh_day_starts_from_zero_and_is_recorded(
    session: Session, limiter: QuotaLimiter, redis_client: redis.Redis[bytes]
) -> None:
    account = make_account(session)
    assert limiter.acquire(session, account.id, 3, KEY_QUOTA, now=local(DAY1, 8)) == 1
    assert redis_client.get(counter_key(DAY1, account.id)) == b"1"
    assert recorded(session, account.id, DAY1) == 1


def test_redis_clock_decides_when_no_time_is_given(
    session: Session, today_limiter: QuotaLimiter, redis_client: redis.Redis[bytes]
) -> None:
    limiter = today_limiter
    account = make_account(session)
    sec, _ = redis_client.time()
    today = datetime.fromtimestamp(sec, UTC).astimezone(TZ).date()
    assert limiter.acquire(session, account.id, 1, KEY_QUOTA) == 1
    assert redis_client.get(counter_key(today, account.id)) == b"1"
    assert recorded(session, account.id, today) == 1


def test_refunds_give_back_only_what_was_granted_and_unused(
    session: Session, redis_client: redis.Redis[bytes], servers: RunServers
) -> None:
    limiter = QuotaLimiter(redis_client, servers.settings())
    account = make_account(session)
    quota = 51_840  # a per-second ceiling of 3
    now = local(DAY1, 12)
    assert limiter.acquire(session, account.id, 3, quota, now=now) == 3
    limiter.refund(session, account.id, 2)
    assert redis_client.get(counter_key(DAY1, account.id)) == b"1"
    assert redis_client.get(counter_key(DAY1, None)) == b"1"
    assert recorded(session, account.id, DAY1) == 1
    with pytest.raises(ValueError, match="1 of its latest grant"):
        limiter.refund(session, account.id, 2)
    with pytest.raises(ValueError, match="0 of its latest grant"):
        limiter.refund(session, make_account(session).id, 1)
    # A refused request is the latest grant: nothing of the one before is refundable any more.
    assert limiter.acquire(session, account.id, 3, quota, now=now) == 0
    with pytest.raises(ValueError, match="0 of its latest grant"):
        limiter.refund(session, account.id, 1)
    status = {s.account: s for s in limiter.status(session, now=now)}
    assert status[account.name].used_today == 1
    assert status[account.name].last_hour == 1


def test_a_refund_never_goes_below_what_postgresql_recorded(
    session: Session, redis_client: redis.Redis[bytes], servers: RunServers
) -> None:
    limiter = QuotaLimiter(redis_client, servers.settings())
    account = make_account(session)
    now = local(DAY1, 12)
    assert limiter.acquire(session, account.id, 3, 51_840, now=now) == 3
    # Redis lost this day's count and restarted at zero; PostgreSQL keeps the 3.
    redis_client.set(counter_key(DAY1, account.id), 0)
    limiter.refund(session, account.id, 1)
    assert recorded(session, account.id, DAY1) == 2
    assert redis_client.get(counter_key(DAY1, account.id)) == b"0"
    later = now + timedelta(seconds=1)
    limiter.acquire(session, account.id, 0, 51_840, now=later)
    assert redis_client.get(counter_key(DAY1, account.id)) == b"2"


def test_the_per_second_ceiling(
    session: Session, redis_client: redis.Redis[bytes], servers: RunServers
) -> None:
    # 51,840 a day is 0.6/s on average: at most 3 in any one second per key; 4 in total.
    quota, total_quota = 51_840, 69_120
    assert (per_second_ceiling(quota), per_second_ceiling(total_quota)) == (3, 4)
    limiter = QuotaLimiter(redis_client, servers.settings(global_daily_quota=total_quota))
    a, b = make_account(session), make_account(session)
    now = local(DAY1, 12)
    assert limiter.acquire(session, a.id, 10, quota, now=now) == 3
    assert limiter.acquire(session, a.id, 10, quota, now=now + timedelta(microseconds=999_999)) == 0
    assert limiter.acquire(session, b.id, 10, quota, now=now) == 1
    assert limiter.acquire(session, b.id, 10, quota, now=now + timedelta(seconds=1)) == 3
    assert limiter.acquire(session, a.id, 10, quota, now=now + timedelta(seconds=1)) == 1


def test_the_global_cap_holds_across_two_keys(
    session: Session, redis_client: redis.Redis[bytes], servers: RunServers
) -> None:
    limiter = QuotaLimiter(redis_client, servers.settings(global_daily_quota=50))
    a, b = make_account(session), make_account(session)
    evening = local(DAY1, 23, 50)
    assert spend_until_refused(limiter, session, a, 40, evening) == 40
    assert spend_until_refused(limiter, session, b, 40, evening + timedelta(minutes=1)) == 10
    assert recorded(session, a.id, DAY1) + recorded(session, b.id, DAY1) == 50


def test_apikey_limit_pauses_exactly_that_key(
    session: Session,
    limiter: QuotaLimiter,
    settings: Settings,
    redis_client: redis.Redis[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    api_key = "secret-key-do-not-log-9876"
    a = make_account(session, api_key=api_key)
    a.ops_email = "ops@shop.example"
    b = make_account(session)
    afternoon = local(DAY1, 15)
    spent = spend_until_refused(limiter, session, a, KEY_QUOTA, afternoon)
    spend_until_refused(limiter, session, b, KEY_QUOTA, afternoon + timedelta(minutes=10))

    with caplog.at_level(logging.WARNING, logger="worker.quota.limiter"):
        alert = limiter.pause_for_limit(session, a, afternoon + timedelta(hours=1))
    assert alert is not None
    next_midnight = local(DAY1 + timedelta(days=1), 0)
    assert a.paused_until == next_midnight and alert.paused_until == next_midnight
    assert a.pause_reason is not None and "APIKEY_LIMIT" in a.pause_reason
    assert (alert.account_name, alert.ops_email, alert.spent_today) == (a.name, a.ops_email, spent)
    assert a.name in caplog.text and api_key not in caplog.text
    assert b.paused_until is None
    # Its plan for the days after is what it had spent, less a margin (more than half its plan).
    assert int(spent * 0.95) > KEY_QUOTA // 2
    assert a.learned_daily_quota == int(spent * 0.95)
    assert effective_daily_quota(a, settings) == int(spent * 0.95)
    assert effective_daily_quota(b, settings) == KEY_QUOTA
    assert limiter.pause_for_limit(session, a, afternoon + timedelta(hours=1, minutes=1)) is None

    later = afternoon + timedelta(hours=2)
    assert limiter.acquire(session, a.id, 5, KEY_QUOTA, now=later) == 0
    assert limiter.acquire(session, b.id, 5, KEY_QUOTA, now=later) == 1
    # Even when Redis loses the day, PostgreSQL keeps the pause.
    session.flush()
    flush_redis(redis_client)
    assert limiter.acquire(session, a.id, 5, KEY_QUOTA, now=later + timedelta(seconds=1)) == 0
    assert limiter.acquire(session, b.id, 5, KEY_QUOTA, now=later + timedelta(seconds=2)) == 1
    # The carrier's midnight ends the pause.
    plan = effective_daily_quota(a, settings)
    assert limiter.acquire(session, a.id, 5, plan, now=next_midnight) == 1
    status = {s.account: s for s in limiter.status(session, now=afternoon + timedelta(hours=3))}
    assert status[a.name].paused_until == next_midnight
    assert status[a.name].pause_reason == a.pause_reason
    assert status[b.name].paused_until is None


def test_status_shows_each_key_and_the_total(session: Session, limiter: QuotaLimiter) -> None:
    a, b = make_account(session, daily_quota=200), make_account(session)
    now = local(DAY1, 12)
    for second in range(4):
        limiter.acquire(session, a.id, 1, 200, now=now - timedelta(minutes=30, seconds=second))
    limiter.acquire(session, b.id, 1, KEY_QUOTA, now=now - timedelta(hours=2))
    lines = limiter.status(session, now=now)
    by_name = {line.account: line for line in lines}
    assert lines[-1].account is None
    share = elapsed_share(now, TZ)
    assert by_name[a.name].daily_quota == 200
    assert by_name[a.name].used_today == 4
    assert by_name[a.name].allowed_now == allowed_by(200, share)
    assert by_name[a.name].last_hour == 4
    assert by_name[a.name].projected == min(200, 4 + 4 * 12)
    assert by_name[b.name].used_today == 1 and by_name[b.name].last_hour == 0
    assert by_name[b.name].projected == 1
    assert lines[-1].used_today == 5
    assert lines[-1].allowed_now == allowed_by(TOTAL_QUOTA, share)


@pytest.fixture
def committing(connection_engine: Engine) -> sessionmaker[Session]:
    """Sessions whose commits are real, for what a subprocess must see."""
    return sessionmaker(connection_engine, expire_on_commit=False)


@pytest.fixture
def committed_account(committing: sessionmaker[Session]) -> Iterator[Account]:
    """An account committed for real, so a subprocess sees it; deleted afterwards."""
    with committing.begin() as s:
        account = make_account(s, name=f"quota-cli-{secrets.token_hex(4)}", daily_quota=1000)
    yield account
    with committing.begin() as s:
        s.execute(delete(Account).where(Account.id == account.id))


def test_shipmon_quota_json(
    servers: RunServers,
    redis_client: redis.Redis[bytes],
    committing: sessionmaker[Session],
    committed_account: Account,
) -> None:
    settings = servers.settings()
    limiter = QuotaLimiter(redis_client, settings)
    with committing.begin() as s:
        granted = limiter.acquire(s, committed_account.id, 1, 1000)
    assert granted == 1
    result = subprocess.run(
        [sys.executable, "-m", "worker", "quota", "--json"],
        env=servers.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = json.loads(result.stdout)
    mine = next(line for line in lines if line["account"] == committed_account.name)
    assert mine["used_today"] == 1
    assert mine["daily_quota"] == 1000
    assert mine["last_hour"] == 1
    assert mine["api_key"] == f"…{committed_account.api_key_hint}"
    assert mine["paused_until"] is None
    assert mine["push_coverage"]["transitions"] == 0
    assert 10 <= mine["allowed_now"] <= 1000
    assert lines[-1]["account"] is None
    assert lines[-1]["daily_quota"] == settings.global_daily_quota


def test_the_workers_clock_does_not_matter(
    session: Session, redis_client: redis.Redis[bytes], servers: RunServers
) -> None:
    settings = servers.settings(key_daily_quota=KEY_QUOTA)
    limiter = QuotaLimiter(redis_client, settings, clock=lambda: utcnow() - timedelta(days=3))
    account = make_account(session)
    sec, _ = redis_client.time()
    today = datetime.fromtimestamp(sec, UTC).astimezone(TZ).date()
    assert limiter.acquire(session, account.id, 1, KEY_QUOTA) == 1
    assert redis_client.get(counter_key(today, account.id)) == b"1"
    assert redis_client.get(counter_key(today - timedelta(days=3), account.id)) is None


def test_a_restore_waits_for_grants_in_flight(
    session: Session,
    limiter: QuotaLimiter,
    redis_client: redis.Redis[bytes],
    connection_engine: Engine,
) -> None:
    account = make_account(session)
    now = local(DAY1, 9)
    with connection_engine.connect() as other:
        # Another process is between a grant and its commit; Redis has lost the day meanwhile.
        other.execute(text("SELECT pg_advisory_xact_lock_shared(:lock)"), {"lock": RESTORE_LOCK})
        assert limiter.acquire(session, account.id, 1, KEY_QUOTA, now=now) == 0
        assert redis_client.get(counter_key(DAY1, account.id)) is None
        other.rollback()
    assert limiter.acquire(session, account.id, 1, KEY_QUOTA, now=now) == 1


def test_one_refusal_at_most_halves_the_plan(
    session: Session, limiter: QuotaLimiter, settings: Settings
) -> None:
    account = make_account(session)
    for day, halved in ((DAY1, KEY_QUOTA // 2), (DAY1 + timedelta(days=1), KEY_QUOTA // 4)):
        plan = effective_daily_quota(account, settings)
        assert limiter.acquire(session, account.id, 5, plan, now=local(day, 1)) == 1
        assert limiter.pause_for_limit(session, account, local(day, 2)) is not None
        assert effective_daily_quota(account, settings) == halved


def test_a_lowered_plan_grows_back_a_step_a_day_without_refusals(
    session: Session, limiter: QuotaLimiter, settings: Settings
) -> None:
    account = make_account(session)
    assert limiter.acquire(session, account.id, 5, KEY_QUOTA, now=local(DAY1, 1)) == 1
    assert limiter.pause_for_limit(session, account, local(DAY1, 2)) is not None
    lowered = effective_daily_quota(account, settings)
    assert lowered == KEY_QUOTA // 2
    step = math.ceil(KEY_QUOTA * PLAN_REGROWTH_SHARE)
    # The refused day and the whole day after keep the lowered plan.
    for moment in (local(DAY1, 23), local(DAY1 + timedelta(days=1), 12)):
        assert regrow_plans(session, settings, moment) == []
    plans = []
    for days in range(2, 8):
        for hour in (0, 12, 23):  # once per carrier day, however often it runs
            regrow_plans(session, settings, local(DAY1 + timedelta(days=days), hour))
        plans.append(effective_daily_quota(account, settings))
    assert plans == [min(KEY_QUOTA, lowered + step * n) for n in range(1, 7)]
    assert account.learned_daily_quota is None  # whole again: nothing learned is left
    # A refusal meanwhile lowers it anew and starts the count again.
    assert limiter.acquire(session, account.id, 5, KEY_QUOTA, now=local(DAY1 + timedelta(8), 1))
    limiter.pause_for_limit(session, account, local(DAY1 + timedelta(days=8), 2))
    assert regrow_plans(session, settings, local(DAY1 + timedelta(days=9), 12)) == []
    assert regrow_plans(session, settings, local(DAY1 + timedelta(days=10), 12)) == [account]


def test_a_binding_total_is_shared_evenly_whatever_the_account_ids(
    session: Session, redis_client: redis.Redis[bytes], servers: RunServers
) -> None:
    # 20 keys at the full plan want 4,000,000 a day, the total allows 3,000,000: the total binds.
    # Each starts the afternoon with an equal part of what the total's line allowed so far, so
    # from the first tick the total, not any key's own line, holds grants back.
    settings = servers.settings()
    limiter = QuotaLimiter(redis_client, settings)
    day, keys, ticks = date(2025, 9, 15), 20, 100
    noon = local(day, 12)
    spent = allowed_by(settings.global_daily_quota, elapsed_share(noon, TZ))
    assert keys * settings.key_daily_quota > settings.global_daily_quota
    accounts = [make_account(session) for _ in range(keys)]
    for account in accounts:
        session.add(QuotaUsage(account_id=account.id, day=day, used=spent // keys))
        session.add_all(
            Shipment(account_id=account.id, order_code=f"FAIR{account.id:06d}{i:04d}")
            for i in range(2 * per_second_ceiling(settings.key_daily_quota))
        )
    session.flush()
    mine = {a.id for a in accounts}
    served: dict[int, int] = dict.fromkeys(mine, 0)
    for tick in range(ticks):
        now = noon + timedelta(seconds=2 * tick)
        session.execute(
            update(Shipment)
            .where(Shipment.account_id.in_(mine))
            .values(next_poll_at=now - timedelta(seconds=1))
        )
        for claim in dispatch(
            session,
            now,
            daily_quota=lambda a: settings.key_daily_quota,
            grant=lambda s, a, wanted, q: limiter.acquire(s, a, wanted, q, now=now),  # noqa: B023
            refund=limiter.refund,
        ):
            if claim.account_id in mine:
                served[claim.account_id] += len(claim.shipment_ids)
    total = sum(served.values())
    # The total's line was followed (no key's own line or demand held it back)...
    assert total >= 0.9 * (ticks - 1) * 2 * settings.global_daily_quota / 86_400
    # ...and shared: every key within 10% of an equal share, low ids and high ids alike.
    share = total / keys
    assert all(abs(n - share) <= 0.1 * share for n in served.values()), sorted(served.values())


def test_a_held_batch_gives_back_its_unstarted_lookups_once_and_never_more(
    session: Session, redis_client: redis.Redis[bytes], servers: RunServers
) -> None:
    limiter = QuotaLimiter(redis_client, servers.settings())
    account = make_account(session)
    now = local(DAY1, 12)
    assert limiter.acquire(session, account.id, 3, 51_840, now=now) == 3
    limiter.hold(account.id, "batch-a", 2)
    limiter.hold(account.id, "batch-b", 1)
    # Another process (the poll task's) starts batch a with one of its two shipments.
    other = QuotaLimiter(redis_client, servers.settings())
    assert other.release(session, account.id, "batch-a", 1) == 1
    assert other.release(session, account.id, "batch-a", 0) == 0  # delivered again
    assert recorded(session, account.id, DAY1) == 2
    assert redis_client.get(counter_key(DAY1, account.id)) == b"2"
    # A hold lost with Redis gives nothing back: the lookups may have been made.
    redis_client.delete(*redis_client.keys("shipmon:quota:held:*"))
    assert other.release(session, account.id, "batch-b", 0) == 0
    assert recorded(session, account.id, DAY1) == 2
    with pytest.raises(ValueError, match="no grant"):
        limiter.hold(make_account(session).id, "batch-c", 1)
