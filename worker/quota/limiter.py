"""The quota limiter: how many lookups each API key, and all keys together, may make right now.

Every lookup is granted by one atomic Redis script before it is made, so any number of worker
processes share the carrier's limits without overspending them. Per key and in total the script
enforces, on Redis's own clock:
- the carrier-day counters (the day starts at 00:00 in SHIPMON_QUOTA_TIMEZONE), a hard cap;
- the pace line of `worker.quota.pacing`: never ahead of the day's elapsed share plus a small slack;
- a per-second ceiling that protects the carrier from bursts.

A grant counts at once, whatever then happens to the HTTP attempt; only what is certain never to be
attempted is given back: the part of a grant left unclaimed at dispatch (`refund`), and the
shipments of a leased batch that its poll task no longer finds under the lease (`hold` when the
batch is sent, `release` when its task starts). Grants are also recorded per key per day in
PostgreSQL, in the caller's transaction: the caller commits before it makes the lookups, so
PostgreSQL always holds at least every grant that turned into an attempt. When Redis has lost a
day's counter (a fresh day, a flush, a restart) the script grants nothing until the counter is
restored from PostgreSQL. Grants take a shared advisory lock and a restore takes it exclusively, so
a restore never reads PostgreSQL while a grant it must count is uncommitted. When Redis comes back
with an older snapshot, the key's count recorded in PostgreSQL is a floor the script catches up to
before it grants anything.

`APIKEY_LIMIT` from the carrier pauses the key until the carrier's next midnight and lowers its
plan for the days after: someone else is probably using the same key.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import redis
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from worker.core.clock import DAY_SECONDS, Clock, utcnow
from worker.core.config import Settings
from worker.domain.models import Account, QuotaUsage
from worker.domain.pauses import Alert
from worker.quota.pacing import (
    allowed_by,
    carrier_day_end,
    carrier_day_start,
    elapsed_share,
    per_second_ceiling,
    slack,
)

if TYPE_CHECKING:
    # The metrics module (and prometheus_client) only for the gauges, not for every command.
    from worker.core.metrics import QuotaGauge

log = logging.getLogger(__name__)

PREFIX = "shipmon:quota"
# Day counters outlive their day by this much, for `shipmon quota` and late refunds.
COUNTER_GRACE_SECONDS = DAY_SECONDS
# The plan learned from APIKEY_LIMIT keeps this share of what was spent when the carrier said stop,
# but one refusal at most halves it: a key shared for one day only is not ruined for good, and a
# key shared for good converges within a few days.
LEARNED_PLAN_SHARE = 0.95
# For every carrier day that passes without a refusal, a lowered plan grows back by this share
# of the full plan: whoever else used the key may have stopped.
PLAN_REGROWTH_SHARE = 0.1
# Between grants (shared) and restores from PostgreSQL (exclusive); "shipmonq" in ASCII.
RESTORE_LOCK = int.from_bytes(b"shipmonq", "big")
# A restore or a midnight costs one more round; more than this means Redis keeps losing keys.
MAX_ROUNDS = 4

# What the acquire script answers besides a grant (status 0, of zero or more lookups): restore
# the day's counters from PostgreSQL first, or ask again in the carrier day Redis's clock is in.
_RESTORE, _WRONG_DAY = 1, 2

# KEYS: 1 key's day counter, 2 global day counter, 3 key's pause marker, 4 key's second bucket,
#   5 global second bucket, 6 key's minute ring, 7 global minute ring.
# ARGV: 1 wanted, 2-3 carrier day start and end (epoch seconds), 4-5 now in epoch seconds and
#   microseconds ('' for Redis TIME), 6-8 key quota, slack and per-second ceiling, 9-11 the
#   same for all keys, 12 the key's count recorded in PostgreSQL.
_ACQUIRE = """
local sec, usec
if ARGV[4] == '' then
  local t = redis.call('TIME')
  sec, usec = tonumber(t[1]), tonumber(t[2])
else
  sec, usec = tonumber(ARGV[4]), tonumber(ARGV[5])
end
local start, stop = tonumber(ARGV[2]), tonumber(ARGV[3])
if sec < start or sec >= stop then
  return {2, 0, sec, usec}
end
local counts = redis.call('MGET', KEYS[1], KEYS[2])
if not counts[1] or not counts[2] then
  return {1, 0, sec, usec}
end
local key_used, total_used = tonumber(counts[1]), tonumber(counts[2])
local recorded = tonumber(ARGV[12])
if key_used < recorded then
  -- An older snapshot: PostgreSQL has seen more of this key's grants than Redis remembers.
  redis.call('SET', KEYS[1], recorded, 'KEEPTTL')
  total_used = redis.call('INCRBY', KEYS[2], recorded - key_used)
  key_used = recorded
end
-- worker.quota.pacing.elapsed_share and allowed_by, operation for operation, so both agree exactly.
local elapsed = ((sec - start) * 1000000 + usec) / 1000000
local share = math.min(1.0, math.max(0.0, elapsed / (stop - start)))
local function allowed(quota, slack)
  return math.min(quota, math.floor(quota * share) + slack)
end
local key_allowed = allowed(tonumber(ARGV[6]), tonumber(ARGV[7]))
local total_allowed = allowed(tonumber(ARGV[9]), tonumber(ARGV[10]))
local function this_second(bucket)
  local b = redis.call('HMGET', bucket, 's', 'n')
  if tonumber(b[1]) == sec then return tonumber(b[2]) end
  return 0
end
local key_second, total_second = this_second(KEYS[4]), this_second(KEYS[5])
local grant = 0
if redis.call('EXISTS', KEYS[3]) == 0 then
  grant = math.max(0, math.min(tonumber(ARGV[1]), key_allowed - key_used,
    total_allowed - total_used, tonumber(ARGV[8]) - key_second,
    tonumber(ARGV[11]) - total_second))
end
if grant > 0 then
  key_used = redis.call('INCRBY', KEYS[1], grant)
  total_used = redis.call('INCRBY', KEYS[2], grant)
  redis.call('HSET', KEYS[4], 's', sec, 'n', key_second + grant)
  redis.call('HSET', KEYS[5], 's', sec, 'n', total_second + grant)
  -- Kept a while after their second: a stale stamp reads as zero, and a short expiry could
  -- forget a second that a slow caller is still in.
  redis.call('EXPIRE', KEYS[4], 60)
  redis.call('EXPIRE', KEYS[5], 60)
  -- One slot per minute of the hour, each stamped with its minute, for `shipmon quota`'s pace.
  local minute = math.floor(sec / 60)
  local slot = minute % 60
  for i = 6, 7 do
    local m = redis.call('HMGET', KEYS[i], 'm' .. slot, 'c' .. slot)
    local count = grant
    if tonumber(m[1]) == minute then count = count + tonumber(m[2]) end
    redis.call('HSET', KEYS[i], 'm' .. slot, minute, 'c' .. slot, count)
    redis.call('EXPIRE', KEYS[i], 3660)
  end
end
return {0, grant, sec, usec}
"""

# KEYS: 1 key's day counter, 2 global day counter, 3 key's minute ring, 4 global minute ring.
# ARGV: 1 lookups given back, 2 the key's count in PostgreSQL after the refund, 3 the grant's
#   minute.
_REFUND = """
local key_used = tonumber(redis.call('GET', KEYS[1]))
if not key_used then
  -- Lost: the restore will read PostgreSQL, which already has the refund.
  return 0
end
local given = math.min(tonumber(ARGV[1]), math.max(0, key_used - tonumber(ARGV[2])))
if given > 0 then
  redis.call('DECRBY', KEYS[1], given)
  local total = tonumber(redis.call('GET', KEYS[2]))
  if total then redis.call('SET', KEYS[2], math.max(0, total - given), 'KEEPTTL') end
  local minute = tonumber(ARGV[3])
  local slot = minute % 60
  for i = 3, 4 do
    local m = redis.call('HMGET', KEYS[i], 'm' .. slot, 'c' .. slot)
    if tonumber(m[1]) == minute then
      redis.call('HSET', KEYS[i], 'c' .. slot, math.max(0, tonumber(m[2]) - given))
    end
  end
end
return given
"""

# KEYS: 1 key's day counter, 2 global day counter, 3 key's pause marker.
# ARGV: 1 the key's count and 2 the total recorded in PostgreSQL, 3 TTL in seconds, 4 '1' when
#   the key is paused.
_RESTORE_SCRIPT = """
local ttl = tonumber(ARGV[3])
for i = 1, 2 do
  local have, recorded = tonumber(redis.call('GET', KEYS[i])), tonumber(ARGV[i])
  if not have then
    redis.call('SET', KEYS[i], recorded, 'EX', ttl)
  elseif have < recorded then
    redis.call('SET', KEYS[i], recorded, 'KEEPTTL')
  end
end
if ARGV[4] == '1' then redis.call('SET', KEYS[3], 1, 'EX', ttl) end
return 1
"""


# The statements of every grant, built once: the dispatcher asks for every key every few seconds.
_LOCK_AND_RECORDED = select(
    func.pg_advisory_xact_lock_shared(RESTORE_LOCK),
    select(QuotaUsage.used)
    .where(QuotaUsage.account_id == bindparam("account_id"), QuotaUsage.day == bindparam("day"))
    .scalar_subquery(),
)
_insert_usage = insert(QuotaUsage).values(
    account_id=bindparam("account_id"), day=bindparam("day"), used=bindparam("used")
)
_RECORD = _insert_usage.on_conflict_do_update(
    index_elements=[QuotaUsage.account_id, QuotaUsage.day],
    set_={"used": QuotaUsage.used + _insert_usage.excluded.used, "updated_at": func.now()},
)


@dataclass(frozen=True)
class CarrierDay:
    """One carrier day: its local date and its bounds in epoch seconds."""

    date: date
    start: int
    end: int

    @classmethod
    def containing(cls, moment: datetime, tz: ZoneInfo) -> CarrierDay:
        start = carrier_day_start(moment, tz)
        end = carrier_day_end(moment, tz)
        return cls(start.date(), int(start.timestamp()), int(end.timestamp()))


def counter_key(day: date, account_id: int | None) -> str:
    """The Redis counter of a key's lookups (or, for None, all keys') on a carrier day."""
    if account_id is None:
        return f"{PREFIX}:{day.isoformat()}:global"
    return f"{PREFIX}:{day.isoformat()}:key:{account_id}"


def _pause_key(day: date, account_id: int) -> str:
    return f"{PREFIX}:{day.isoformat()}:paused:{account_id}"


def _held_key(account_id: int, batch: str) -> str:
    return f"{PREFIX}:held:{account_id}:{batch}"


def _minutes_key(account_id: int | None) -> str:
    return f"{PREFIX}:minutes:{'global' if account_id is None else f'key:{account_id}'}"


def _second_key(account_id: int | None) -> str:
    return f"{PREFIX}:second:{'global' if account_id is None else f'key:{account_id}'}"


def _epoch(moment: datetime) -> tuple[int, int]:
    """Whole seconds and microseconds since the epoch, exactly (no float rounding)."""
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return delta.days * DAY_SECONDS + delta.seconds, delta.microseconds


def _moment(sec: int, usec: int) -> datetime:
    return datetime.fromtimestamp(sec, UTC).replace(microsecond=usec)


def effective_daily_quota(account: Account, settings: Settings) -> int:
    """The lookups a key may make per carrier day: its plan, lowered by what the carrier taught."""
    plan = account.daily_quota or settings.key_daily_quota
    if account.learned_daily_quota is not None:
        return min(plan, account.learned_daily_quota)
    return plan


def regrow_plans(session: Session, settings: Settings, now: datetime) -> list[Account]:
    """Grow lowered plans back a step for each whole carrier day without APIKEY_LIMIT.

    A key refused on day D keeps its lowered plan through D+1; from D+2 on, each carrier day
    adds `PLAN_REGROWTH_SHARE` of the full plan, until the plan is whole again (a refusal
    meanwhile lowers it anew). Returns the accounts whose plan grew.
    """
    tz = ZoneInfo(settings.quota_timezone)
    yesterday = carrier_day_start(now, tz).date() - timedelta(days=1)
    grown = []
    for account in session.scalars(
        select(Account)
        .where(Account.learned_daily_quota.is_not(None))
        .where((Account.learned_plan_day.is_(None)) | (Account.learned_plan_day < yesterday))
        .with_for_update(skip_locked=True)
    ):
        plan = account.daily_quota or settings.key_daily_quota
        before = effective_daily_quota(account, settings)
        learned = (account.learned_daily_quota or plan) + math.ceil(plan * PLAN_REGROWTH_SHARE)
        account.learned_daily_quota = learned if learned < plan else None
        account.learned_plan_day = yesterday if learned < plan else None
        log.info(
            "account %s: a day without APIKEY_LIMIT, daily plan %d -> %d",
            account.name,
            before,
            effective_daily_quota(account, settings),
        )
        grown.append(account)
    session.flush()
    return grown


@dataclass(frozen=True)
class KeyStatus:
    """One line of `shipmon quota`: a key's (or, with no account, all keys') carrier day."""

    account: str | None
    api_key_hint: str | None
    daily_quota: int
    used_today: int
    allowed_now: int
    last_hour: int
    projected: int
    paused_until: datetime | None
    pause_reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "api_key": f"…{self.api_key_hint}" if self.api_key_hint else None,
            "daily_quota": self.daily_quota,
            "used_today": self.used_today,
            "allowed_now": self.allowed_now,
            "last_hour": self.last_hour,
            "projected": self.projected,
            "paused_until": self.paused_until.isoformat() if self.paused_until else None,
            "pause_reason": self.pause_reason,
        }

    def gauge(self) -> QuotaGauge:
        """The numbers the quota gauges show (never the key's hint)."""
        from worker.core.metrics import QuotaGauge

        return QuotaGauge(self.account, self.daily_quota, self.used_today, self.allowed_now)


@dataclass(frozen=True)
class _Grant:
    """A key's latest grant: its day and minute, and how much of it may still be refunded."""

    day: date
    minute: int
    outstanding: int


class QuotaLimiter:
    """Grants lookups per key and in total; one per process, shared by its tasks."""

    def __init__(
        self, redis_client: redis.Redis[Any], settings: Settings, clock: Clock = utcnow
    ) -> None:
        self.redis = redis_client
        self.settings = settings
        # Only a first guess at the carrier day: Redis's clock decides every grant.
        self.clock = clock
        self.tz = settings.timezone
        self._acquire = redis_client.register_script(_ACQUIRE)
        self._refund = redis_client.register_script(_REFUND)
        self._restore_counts = redis_client.register_script(_RESTORE_SCRIPT)
        # The carrier day Redis's clock was last seen in; the worker's clock is only a first guess.
        self._day: CarrierDay | None = None
        self._grants: dict[int, _Grant] = {}
        global_quota = settings.global_daily_quota
        self._global_args = (global_quota, slack(global_quota), per_second_ceiling(global_quota))

    def acquire(
        self,
        session: Session,
        account_id: int,
        wanted: int,
        daily_quota: int,
        now: datetime | None = None,
    ) -> int:
        """Grant 0 to `wanted` lookups for the key now, counting them at once.

        The grant is recorded in `session`'s transaction: commit it before making the lookups,
        and keep the transaction short, since a restore from PostgreSQL waits for it. `now` is
        for tests and simulations; in production Redis's clock decides.
        """
        if wanted < 0:
            raise ValueError(f"cannot grant a negative number of lookups ({wanted})")
        day = self._guess_day(now)
        for _ in range(MAX_ROUNDS):
            recorded = session.execute(
                _LOCK_AND_RECORDED, {"account_id": account_id, "day": day.date}
            ).one()[1]
            status, granted, sec, usec = self._acquire(
                keys=[
                    counter_key(day.date, account_id),
                    counter_key(day.date, None),
                    _pause_key(day.date, account_id),
                    _second_key(account_id),
                    _second_key(None),
                    _minutes_key(account_id),
                    _minutes_key(None),
                ],
                args=[
                    wanted,
                    day.start,
                    day.end,
                    *self._clock_args(now),
                    daily_quota,
                    slack(daily_quota),
                    per_second_ceiling(daily_quota),
                    *self._global_args,
                    recorded or 0,
                ],
            )
            if status == _WRONG_DAY:
                day = CarrierDay.containing(_moment(sec, usec), self.tz)
                if now is None:
                    self._day = day
                continue
            if status == _RESTORE:
                if not self._restore(session, account_id, day, sec):
                    return 0
                continue
            if granted:
                self._record(session, account_id, day.date, granted)
                self._grants[account_id] = _Grant(day.date, sec // 60, granted)
            else:
                self._grants.pop(account_id, None)
            return int(granted)
        log.warning(
            "quota counters keep disappearing from Redis; no lookups granted",
            extra={"account_id": account_id},
        )
        return 0

    def refund(self, session: Session, account_id: int, unused: int) -> None:
        """Give back lookups of this limiter's latest grant to the key that will not be made.

        PostgreSQL records grants, and a lookup is only made from a grant that was not given
        back, so after a refund it still counts every attempt actually made; the Redis counter is
        never lowered below PostgreSQL's count. Like `acquire`, in `session`'s transaction.
        """
        grant = self._grants.get(account_id)
        outstanding = grant.outstanding if grant else 0
        if not 0 <= unused <= outstanding:
            raise ValueError(
                f"cannot refund {unused} lookups to account {account_id}: "
                f"{outstanding} of its latest grant are outstanding"
            )
        if grant is None or unused == 0:
            return
        self._grants[account_id] = replace(grant, outstanding=outstanding - unused)
        self._give_back(session, account_id, grant.day, grant.minute, unused)

    def hold(self, account_id: int, batch: str, shipments: int) -> None:
        """Remember a leased batch of the key's latest grant, for its poll task to `release`.

        Call it before the batch's poll task is sent. Kept as long as the day's counters are.
        """
        grant = self._grants.get(account_id)
        if grant is None:
            raise ValueError(f"account {account_id} has no grant to hold a batch of")
        self.redis.set(
            _held_key(account_id, batch),
            f"{grant.day.isoformat()} {grant.minute} {shipments}",
            ex=COUNTER_GRACE_SECONDS,
        )

    def release(self, session: Session, account_id: int, batch: str, started: int) -> int:
        """Give back the lookups of a held batch that its poll task found no longer leased.

        Its shipments were stopped, or their lease ran out while the task waited and they were
        dispatched, and granted, anew. Only the first delivery of the task takes the hold: one
        delivered again (its worker died) gives nothing back, since the first may have made the
        lookups. A hold lost with Redis gives nothing back either: never more than was unused.
        Returns the lookups given back; like `acquire`, in `session`'s transaction.
        """
        held = self.redis.getdel(_held_key(account_id, batch))
        if held is None:
            return 0
        day, minute, shipments = held.decode().split()
        unused = int(shipments) - started
        if unused <= 0:
            return 0
        self._give_back(session, account_id, date.fromisoformat(day), int(minute), unused)
        return unused

    def _give_back(
        self, session: Session, account_id: int, day: date, minute: int, unused: int
    ) -> None:
        """Lower the key's count of `day`, in PostgreSQL and then Redis, by `unused` lookups."""
        session.execute(select(func.pg_advisory_xact_lock_shared(RESTORE_LOCK)))
        recorded = session.scalar(
            update(QuotaUsage)
            .where(QuotaUsage.account_id == account_id, QuotaUsage.day == day)
            .values(used=func.greatest(QuotaUsage.used - unused, 0), updated_at=func.now())
            .returning(QuotaUsage.used)
        )
        self._refund(
            keys=[
                counter_key(day, account_id),
                counter_key(day, None),
                _minutes_key(account_id),
                _minutes_key(None),
            ],
            args=[unused, recorded or 0, minute],
        )

    def pause_for_limit(
        self, session: Session, account: Account, now: datetime | None = None
    ) -> Alert | None:
        """The carrier said APIKEY_LIMIT: pause the key until its midnight and lower its plan.

        Changes `account` in `session`'s transaction; the key gets no more grants today at once.
        Returns what to tell the account's ops contact, or None if the key was already paused.
        """
        moment = now or self._redis_now()
        day = CarrierDay.containing(moment, self.tz)
        until = carrier_day_end(moment, self.tz)
        self.redis.set(
            _pause_key(day.date, account.id),
            1,
            ex=day.end - _epoch(moment)[0] + COUNTER_GRACE_SECONDS,
        )
        if account.paused_until is not None and account.paused_until >= until:
            return None
        spent = max(
            int(self.redis.get(counter_key(day.date, account.id)) or 0),
            session.scalar(
                select(QuotaUsage.used).where(
                    QuotaUsage.account_id == account.id, QuotaUsage.day == day.date
                )
            )
            or 0,
        )
        before = effective_daily_quota(account, self.settings)
        learned = max(1, int(spent * LEARNED_PLAN_SHARE), before // 2)
        if learned < before:
            account.learned_daily_quota = learned
        account.learned_plan_day = day.date
        plan = effective_daily_quota(account, self.settings)
        account.paused_until = until
        account.pause_reason = (
            f"APIKEY_LIMIT: the carrier refused the key after {spent} lookups today; "
            f"paused until {until.isoformat()}, daily plan {before} -> {plan}"
        )
        session.flush()
        message = (
            f"The carrier refused account {account.name}'s API key (APIKEY_LIMIT) after shipmon "
            f"had made {spent} lookups today. Is the key used elsewhere? Polling resumes at "
            f"{until.isoformat()} with a daily plan of {plan} lookups (was {before}), which grows "
            f"back by {PLAN_REGROWTH_SHARE:.0%} of the full plan for every carrier day without a "
            "refusal."
        )
        log.warning(
            "account %s paused by APIKEY_LIMIT after %d lookups; plan %d -> %d",
            account.name,
            spent,
            before,
            plan,
            extra={"account": account.name, "reason": "APIKEY_LIMIT"},
        )
        return Alert(account.name, account.ops_email, until, message, spent_today=spent)

    def status(self, session: Session, now: datetime | None = None) -> list[KeyStatus]:
        """Every key's carrier day so far, by account name, then the total of all keys."""
        moment = now or self._redis_now()
        day = CarrierDay.containing(moment, self.tz)
        share = elapsed_share(moment, self.tz)
        hours_left = (day.end - _epoch(moment)[0]) / 3600
        minute = _epoch(moment)[0] // 60
        accounts = session.scalars(select(Account).order_by(Account.name)).all()
        recorded: dict[int, int] = {
            account_id: used
            for account_id, used in session.execute(
                select(QuotaUsage.account_id, QuotaUsage.used).where(QuotaUsage.day == day.date)
            )
        }
        pipe = self.redis.pipeline(transaction=False)
        for account_id in [*(a.id for a in accounts), None]:
            pipe.get(counter_key(day.date, account_id))
            pipe.hgetall(_minutes_key(account_id))
        answers = pipe.execute()

        def line(
            account: Account | None, quota: int, used: int, ring: dict[bytes, bytes]
        ) -> KeyStatus:
            last_hour = _last_hour(ring, minute)
            paused = account is not None and (
                account.paused_until is not None and account.paused_until > moment
            )
            projected = used if paused else min(quota, used + round(last_hour * hours_left))
            return KeyStatus(
                account=account.name if account else None,
                api_key_hint=account.api_key_hint if account else None,
                daily_quota=quota,
                used_today=used,
                allowed_now=allowed_by(quota, share),
                last_hour=last_hour,
                # A plan lowered during the day may already be exceeded.
                projected=max(used, projected),
                paused_until=account.paused_until.astimezone(self.tz)
                if account and account.paused_until and paused
                else None,
                pause_reason=account.pause_reason if account and paused else None,
            )

        lines = []
        for i, account in enumerate(accounts):
            counted, ring = answers[2 * i], answers[2 * i + 1]
            used = max(int(counted or 0), recorded.get(account.id, 0))
            lines.append(line(account, effective_daily_quota(account, self.settings), used, ring))
        counted, ring = answers[-2], answers[-1]
        total = max(int(counted or 0), sum(recorded.values()))
        lines.append(line(None, self.settings.global_daily_quota, total, ring))
        return lines

    def _guess_day(self, now: datetime | None) -> CarrierDay:
        if now is not None:
            return CarrierDay.containing(now, self.tz)
        if self._day is None:
            self._day = CarrierDay.containing(self.clock(), self.tz)
        return self._day

    def _clock_args(self, now: datetime | None) -> tuple[int | str, int]:
        return _epoch(now) if now is not None else ("", 0)

    def _redis_now(self) -> datetime:
        sec, usec = self.redis.time()
        return _moment(int(sec), int(usec))

    def _record(self, session: Session, account_id: int, day: date, granted: int) -> None:
        session.execute(_RECORD, {"account_id": account_id, "day": day, "used": granted})

    def _restore(self, session: Session, account_id: int, day: CarrierDay, now_sec: int) -> bool:
        """Raise the day's counters to what PostgreSQL recorded; False if it must wait."""
        # Exclusive, so every grant Redis counted before it lost the day is committed and read.
        # Without waiting: the caller may hold the shared lock, and two waiting would deadlock.
        if not session.scalar(select(func.pg_try_advisory_xact_lock(RESTORE_LOCK))):
            log.info("quota restore deferred: grants are in flight", extra={"day": str(day.date)})
            return False
        key_used = session.scalar(
            select(QuotaUsage.used).where(
                QuotaUsage.account_id == account_id, QuotaUsage.day == day.date
            )
        )
        total = session.scalar(
            select(func.coalesce(func.sum(QuotaUsage.used), 0)).where(QuotaUsage.day == day.date)
        )
        paused_until = session.scalar(select(Account.paused_until).where(Account.id == account_id))
        paused = paused_until is not None and paused_until > _moment(now_sec, 0)
        self._restore_counts(
            keys=[
                counter_key(day.date, account_id),
                counter_key(day.date, None),
                _pause_key(day.date, account_id),
            ],
            args=[
                key_used or 0,
                total or 0,
                day.end - now_sec + COUNTER_GRACE_SECONDS,
                "1" if paused else "0",
            ],
        )
        return True


def _last_hour(ring: dict[bytes, bytes], minute: int) -> int:
    """Lookups granted in the hour up to `minute`, from a key's minute ring."""
    total = 0
    for slot in range(60):
        stamp = ring.get(f"m{slot}".encode())
        if stamp is not None and minute - 60 < int(stamp) <= minute:
            total += int(ring[f"c{slot}".encode()])
    return total
