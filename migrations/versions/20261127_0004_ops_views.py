"""Ops views: shipment overview, stalled shipments, delay reasons, today's quota, failed deliveries.

Why: ops people answer "where is this parcel?", "what is stuck?" and "did the merchant get told?"
with plain SQL, often from a BI tool. These views give them the answers without knowing how the
tables join, and keep the same meaning as `shipmon show` and `shipmon stats`. Views hold no data,
so creating or dropping them takes no lock on a live table beyond the catalog.

The carrier day of `quota_today` starts at midnight in Asia/Ho_Chi_Minh and a key without a plan
of its own has 200,000 lookups, shipmon's defaults; where SHIPMON_QUOTA_TIMEZONE or
SHIPMON_KEY_DAILY_QUOTA differ, set the same values for the database:
`ALTER DATABASE shipmon SET shipmon.quota_timezone = '...'` and `shipmon.key_daily_quota`.

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-27 09:50:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS = {
    "shipment_overview": """
        SELECT s.id AS shipment_id,
               a.name AS account,
               s.order_code,
               s.status,
               s.status_id,
               s.status_code,
               s.tracking_name,
               s.status_changed_at,
               s.last_scan_at,
               greatest(s.status_changed_at, s.last_scan_at) AS last_change_at,
               s.delay_code,
               s.delay_reason,
               s.delay_note,
               s.receiver_name,
               s.delivery_date,
               s.active,
               s.stopped_reason,
               s.stalled_at,
               s.registered_at,
               s.found_at,
               s.terminal_at,
               s.last_polled_at,
               s.next_poll_at,
               s.polls_made,
               s.consecutive_errors,
               s.last_error_code,
               (SELECT count(*) FROM status_events e WHERE e.shipment_id = s.id) AS statuses,
               (SELECT count(*) FROM tracking_events t WHERE t.shipment_id = s.id) AS scans,
               (SELECT count(*) FROM outbox_events o WHERE o.shipment_id = s.id) AS notifications,
               (SELECT count(*) FROM deliveries d
                WHERE d.shipment_id = s.id AND d.state = 'pending') AS deliveries_pending,
               (SELECT count(*) FROM deliveries d
                WHERE d.shipment_id = s.id AND d.state = 'dead') AS deliveries_dead
        FROM shipments s
        JOIN accounts a ON a.id = s.account_id
    """,
    "stalled_shipments": """
        SELECT s.id AS shipment_id,
               a.name AS account,
               s.order_code,
               s.status,
               greatest(s.status_changed_at, s.last_scan_at) AS last_change_at,
               now() - greatest(s.status_changed_at, s.last_scan_at) AS silent_for,
               s.stalled_at,
               s.delay_code,
               s.delay_reason,
               s.last_polled_at
        FROM shipments s
        JOIN accounts a ON a.id = s.account_id
        WHERE s.active AND s.stalled_at IS NOT NULL
    """,
    "delay_reasons": """
        WITH reported AS (
            SELECT o.account_id,
                   (o.data -> 'delay' ->> 'code')::integer AS delay_code,
                   max(o.data -> 'delay' ->> 'reason') AS delay_reason,
                   count(*) FILTER (WHERE o.created_at > now() - interval '24 hours')
                       AS reported_24h,
                   count(*) FILTER (WHERE o.created_at > now() - interval '7 days') AS reported_7d,
                   count(*) AS reported_total,
                   max(o.created_at) AS last_reported_at
            FROM outbox_events o
            WHERE o.type = 'shipment.delayed' AND jsonb_typeof(o.data -> 'delay') = 'object'
            GROUP BY 1, 2
        ),
        open_now AS (
            SELECT account_id, delay_code, max(delay_reason) AS delay_reason,
                   count(*) AS open_shipments
            FROM shipments
            WHERE active AND delay_code IS NOT NULL
            GROUP BY account_id, delay_code
        )
        SELECT a.name AS account,
               coalesce(r.delay_code, o.delay_code) AS delay_code,
               coalesce(r.delay_reason, o.delay_reason) AS delay_reason,
               coalesce(o.open_shipments, 0) AS open_shipments,
               coalesce(r.reported_24h, 0) AS reported_24h,
               coalesce(r.reported_7d, 0) AS reported_7d,
               coalesce(r.reported_total, 0) AS reported_total,
               r.last_reported_at
        FROM reported r
        FULL JOIN open_now o ON o.account_id = r.account_id AND o.delay_code = r.delay_code
        JOIN accounts a ON a.id = coalesce(r.account_id, o.account_id)
    """,
    "quota_today": """
        WITH today AS (
            SELECT (now() AT TIME ZONE coalesce(
                        nullif(current_setting('shipmon.quota_timezone', true), ''),
                        'Asia/Ho_Chi_Minh'))::date AS day,
                   coalesce(nullif(current_setting('shipmon.key_daily_quota', true), '')::integer,
                            200000) AS key_daily_quota
        )
        SELECT a.name AS account,
               t.day,
               coalesce(q.used, 0) AS used,
               p.daily_quota,
               greatest(p.daily_quota - coalesce(q.used, 0), 0) AS remaining,
               round(100.0 * coalesce(q.used, 0) / p.daily_quota, 1) AS percent_used,
               coalesce(a.paused_until > now(), false) AS paused,
               CASE WHEN a.paused_until > now() THEN a.pause_reason END AS pause_reason
        FROM accounts a
        CROSS JOIN today t
        CROSS JOIN LATERAL (
            SELECT least(coalesce(a.daily_quota, t.key_daily_quota), a.learned_daily_quota)
                AS daily_quota
        ) p
        LEFT JOIN quota_usage q ON q.account_id = a.id AND q.day = t.day
    """,
    "failed_deliveries": """
        SELECT d.id AS delivery_id,
               a.name AS account,
               s.order_code,
               o.event_id,
               o.type AS event_type,
               o.sequence,
               o.created_at AS event_created_at,
               CASE WHEN d.endpoint_id IS NOT NULL THEN 'webhook' ELSE 'email' END AS channel,
               coalesce(w.url, r.address) AS destination,
               d.state,
               d.attempts,
               d.last_attempt_at,
               CASE WHEN d.state = 'pending' THEN d.next_attempt_at END AS next_attempt_at,
               last.status_code AS last_status_code,
               last.error AS last_error,
               last.response_excerpt AS last_response
        FROM deliveries d
        JOIN outbox_events o ON o.id = d.event_id
        JOIN shipments s ON s.id = o.shipment_id
        JOIN accounts a ON a.id = o.account_id
        LEFT JOIN webhook_endpoints w ON w.id = d.endpoint_id
        LEFT JOIN email_recipients r ON r.id = d.recipient_id
        LEFT JOIN LATERAL (
            SELECT x.status_code, x.error, x.response_excerpt
            FROM delivery_attempts x
            WHERE x.delivery_id = d.id
            ORDER BY x.attempted_at DESC, x.id DESC
            LIMIT 1
        ) last ON true
        WHERE d.state = 'dead' OR (d.state = 'pending' AND d.attempts > 0)
    """,
}


def upgrade() -> None:
    for name, query in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {query}")


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW {name}")
