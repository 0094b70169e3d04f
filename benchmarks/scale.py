"""The periodic work and one dispatch tick on large shipment tables, timed with shipmon's code.

For each --rows N, a scratch database is created on the given PostgreSQL, migrated to head and
filled in SQL (generate_series) with a deployment's shapes: 15 accounts, 80% of the shipments
open and 20% finished over ten days, about four status rows each (ACCEPTED, PICKED_UP,
IN_TRANSIT, DELIVERING, PENDING_FOR_PROCEED; DELIVERED for the finished), one open shipment in
ten due now, the last two minutes' registrations still waiting for their first lookup, and one
open shipment in a thousand silent for three days (stalled). Then every periodic job runs,
each in a transaction rolled back afterwards so every run sees the same table, and the median
of --repeat runs is printed:

- relearn (every 10 min): `learning.relearn`; the reference is the former path, every stay
  read into Python (`recorded_stays`) and fitted (`fit_model`), run once;
- stalled detection (every 15 min): `ops.detect_stalled`, and its normal stays alone; the
  reference is the same job with `ix_shipments_silent_since` dropped (in the transaction);
- prices (every minute): `learning.update_prices` for the 15 keys; the reference reads every
  row (`PRICE_SAMPLE_ROWS` above the table's size), as before;
- a dispatch tick (every 2 s): `dispatch.dispatch` with a first-lookup plan and five grants per
  key (3,000,000 lookups a day over 15 keys); the reference drops `ix_shipments_unplanned`;
- metrics gauges (every 30 s) and `shipmon stats`;
- retention: one `ops.purge_finished` batch (500 shipments with their history).

The disk each table takes is printed too. Every scratch database is dropped at the end. The
references run up to --reference-rows shipments: above that the former relearn alone would read
tens of millions of stays into Python.

    uv run python benchmarks/scale.py --rows 100000 --rows 1000000 \
        [--database-url postgresql://postgres@127.0.0.1:5432] [--repeat 3] [--reference-rows N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

import worker.scheduling.coverage
import worker.scheduling.learning
from worker.core.db import upgrade
from worker.core.metrics import refresh_gauges
from worker.ops.retention import purge_finished
from worker.ops.stalled import detect_stalled, normal_stays
from worker.ops.views import collect_stats
from worker.scheduling.learning import recorded_stays, relearn, update_prices
from worker.scheduling.model import LearnedModel, ShipmentState, fit_model, next_poll_at
from worker.scheduling.pricing import INITIAL_PRICE
from worker.tracking.dispatch import dispatch

ACCOUNTS = 15
ZONE = "Asia/Ho_Chi_Minh"
FLOOR = timedelta(hours=48)
# 3,000,000 lookups a day over 15 keys: about five per key per two-second tick.
GRANT_PER_TICK = 5
RETENTION_DAYS = 5

# One row per shipment i: when it was registered, when it was found (if yet), its last change,
# how many status rows it has and whether it has finished. u is a fixed pseudo-random [0, 1).
PLAN = """
CREATE UNLOGGED TABLE bench_plan AS
WITH g AS (
    SELECT i,
           (((i::bigint * 2654435761) %% 1000003) / 1000003.0)::float8 AS u,
           i %% 5 = 0 AS finished
    FROM generate_series(1, %(rows)s) AS i
), r AS (
    SELECT i, u, finished,
           %(now)s - CASE WHEN finished THEN interval '1 day' + u * interval '9 days'
                          ELSE u * interval '6 days' END
               AS registered_at,
           2 + i %% 5 AS steps
    FROM g
), f AS (
    SELECT r.*,
           CASE WHEN registered_at + interval '30 minutes' <= %(now)s
                THEN registered_at + interval '30 minutes' END AS found_at
    FROM r
)
SELECT f.*,
       CASE WHEN found_at IS NULL THEN NULL
            WHEN finished THEN found_at + least((%(now)s - found_at) * 0.9, interval '72 hours')
            ELSE greatest(found_at, %(now)s - CASE WHEN i %% 1000 = 7 THEN interval '72 hours'
                                             ELSE ((i * 13) %% 36) * interval '1 hour' END)
       END AS changed_at
FROM f
"""

STATUSES = (
    "ARRAY['ACCEPTED','PICKED_UP','IN_TRANSIT','DELIVERING','PENDING_FOR_PROCEED','DELIVERING']"
)

SHIPMENTS = f"""
INSERT INTO shipments (id, account_id, order_code, registered_at, found_at, status,
                       status_changed_at, active, terminal_at, last_polled_at, next_poll_at,
                       polls_made)
SELECT i, 1 + i %% {ACCOUNTS}, 'SC' || lpad(i::text, 10, '0'), registered_at, found_at,
       CASE WHEN found_at IS NULL THEN NULL WHEN finished THEN 'DELIVERED'
            ELSE ({STATUSES})[steps] END,
       changed_at, NOT finished, CASE WHEN finished THEN changed_at END,
       CASE WHEN finished THEN changed_at + interval '1 hour'
            WHEN registered_at > %(now)s - interval '2 minutes' THEN NULL
            ELSE %(now)s - (i %% 120) * interval '1 minute' END,
       CASE WHEN finished THEN changed_at + interval '1 hour'
            WHEN registered_at > %(now)s - interval '2 minutes' THEN registered_at
            WHEN i %% 10 = 1 THEN %(now)s - (i %% 600) * interval '1 second'
            ELSE %(now)s + (i %% 86400) * interval '1 second' END,
       steps
FROM bench_plan
"""

# Status rows spread evenly from the shipment's finding to its last change.
STATUS_EVENTS = f"""
INSERT INTO status_events (shipment_id, status, occurred_at, seen_at)
SELECT i,
       CASE WHEN finished AND j = steps THEN 'DELIVERED' ELSE ({STATUSES})[j] END,
       found_at + (changed_at - found_at) * (j - 1) / (steps - 1),
       found_at + (changed_at - found_at) * (j - 1) / (steps - 1)
FROM bench_plan, generate_series(1, steps) AS j
WHERE found_at IS NOT NULL
ON CONFLICT DO NOTHING
"""


def build(url: str, rows: int, now: datetime) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO accounts (id, name, api_key_encrypted, api_key_hint) "
            "SELECT a, 'merchant-' || a, 'not-a-key', 'xxxx' FROM generate_series(1, %s) a",
            (ACCOUNTS,),
        )
        params = {"rows": rows, "now": now}
        conn.execute(PLAN, params)
        conn.execute(SHIPMENTS, params)
        conn.execute(STATUS_EVENTS)
        conn.execute("SELECT setval('shipments_id_seq', %s)", (rows,))
        conn.execute("DROP TABLE bench_plan")
        conn.execute("VACUUM ANALYZE")


@contextmanager
def rolled_back(engine_url: str) -> Iterator[Session]:
    engine = create_engine(engine_url)
    with engine.connect() as conn, conn.begin() as outer:
        with Session(bind=conn) as session:
            yield session
        outer.rollback()
    engine.dispose()


def timed(
    engine_url: str, job: Callable[[Session], object], repeat: int, setup: str | None = None
) -> float:
    """The median seconds of `job`, each run in a transaction rolled back afterwards."""
    runs = []
    for _ in range(repeat):
        with rolled_back(engine_url) as session:
            if setup is not None:
                session.execute(text(setup))
            start = time.perf_counter()
            job(session)
            runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def tick(now: datetime) -> Callable[[Session], object]:
    model = LearnedModel(ZONE)

    def first_lookup(account_id: int, registered: datetime) -> datetime:
        planned = next_poll_at(ShipmentState(registered_at=registered), model, INITIAL_PRICE)
        return planned or registered

    first_lookup(0, now)  # the plan is solved once per model and kept, as in a worker
    return lambda session: dispatch(
        session,
        now,
        daily_quota=lambda account: 200_000,
        grant=lambda s, account_id, wanted, quota: min(wanted, GRANT_PER_TICK),
        refund=lambda s, account_id, n: None,
        first_lookup=first_lookup,
    )


def full_prices(session: Session, now: datetime) -> object:
    kept = worker.scheduling.learning.PRICE_SAMPLE_ROWS
    worker.scheduling.learning.PRICE_SAMPLE_ROWS = 10**12
    try:
        return update_prices(session, dict.fromkeys(range(1, ACCOUNTS + 1), 200_000), ZONE, now)
    finally:
        worker.scheduling.learning.PRICE_SAMPLE_ROWS = kept


def measure(
    url: str, rows: int, repeat: int, with_references: bool = True
) -> dict[str, tuple[float, float | None]]:
    now = datetime.now(UTC)
    engine_url = url.replace("postgresql://", "postgresql+psycopg://")
    upgrade(engine_url)
    started = time.perf_counter()
    build(url, rows, now)
    print(f"  built {rows:,} shipments in {time.perf_counter() - started:.0f} s", flush=True)
    quotas = dict.fromkeys(range(1, ACCOUNTS + 1), 200_000)
    learning_since = now - worker.scheduling.coverage.LEARNING_WINDOW
    results: dict[str, tuple[float, float | None]] = {}

    def run(
        name: str,
        job: Callable[[Session], object],
        reference: Callable[[Session], object] | None = None,
        reference_setup: str | None = None,
        reference_repeat: int | None = None,
    ) -> None:
        new = timed(engine_url, job, repeat)
        old = None
        if reference is not None and with_references:
            old = timed(engine_url, reference, reference_repeat or repeat, reference_setup)
        results[name] = (new, old)
        print(f"  {name}: {new:.4f} s" + ("" if old is None else f" (reference {old:.4f} s)"))

    run(
        "relearn",
        lambda s: relearn(s, ZONE, now),
        lambda s: fit_model(recorded_stays(s, learning_since), ZONE),
        reference_repeat=1,
    )
    run("normal stays", lambda s: normal_stays(s, now))
    run(
        "detect stalled",
        lambda s: detect_stalled(s, now, FLOOR),
        lambda s: detect_stalled(s, now, FLOOR),
        "DROP INDEX ix_shipments_silent_since",
    )
    run(
        "update prices",
        lambda s: update_prices(s, quotas, ZONE, now),
        lambda s: full_prices(s, now),
    )
    run(
        "dispatch tick",
        tick(now),
        tick(now),
        "DROP INDEX ix_shipments_unplanned",
    )
    run("metrics gauges", lambda s: refresh_gauges(s, []))
    run("stats", lambda s: collect_stats(s, now, []))
    run("purge batch", lambda s: purge_finished(s, now, RETENTION_DAYS))
    with psycopg.connect(url) as conn:
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        events = conn.execute("SELECT count(*) FROM status_events").fetchone()
    assert size is not None
    assert events is not None
    results["disk (MB)"] = (size[0] / 1e6, None)
    results["status rows"] = (float(events[0]), None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, action="append", required=True)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--reference-rows",
        type=int,
        default=1_000_000,
        help="run the references only on tables of at most this many shipments",
    )
    args = parser.parse_args()
    base = args.database_url.rstrip("/")
    figures: dict[int, dict[str, tuple[float, float | None]]] = {}
    for rows in args.rows:
        name = f"shipmon_scale_{os.getpid()}_{rows}"
        with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            print(f"{rows:,} shipments:", flush=True)
            figures[rows] = measure(
                f"{base}/{name}", rows, args.repeat, rows <= args.reference_rows
            )
        finally:
            with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    sizes = list(figures)
    header = f"{'job (seconds)':<16}" + "".join(
        f"{f'{n:,} new':>16}{'reference':>12}" for n in sizes
    )
    print()
    print(header)
    for job in figures[sizes[0]]:
        line = f"{job:<16}"
        for n in sizes:
            new, old = figures[n][job]
            line += f"{new:>16.4f}" if job not in ("disk (MB)", "status rows") else f"{new:>16,.0f}"
            line += f"{old:>12.4f}" if old is not None else f"{'':>12}"
        print(line)


if __name__ == "__main__":
    main()
