"""One shipment's whole story as a JSON document that PostgreSQL builds in one statement.

This is the document of `GET /v1/shipments/{code}`, the API's hot path: one round trip
instead of five, and no Python objects between the rows and the bytes sent. It equals
`shipment_story(...).as_dict()` (`worker.ops.views`), field for field and time for time; the
tests hold the two together on a shipment with statuses, scans, delays and deliveries.
"""

from __future__ import annotations


def _iso(column: str) -> str:
    """SQL for `iso_utc`: `2026-12-01T09:30:00+00:00`, with `.ffffff` when there are
    microseconds, as Python's `isoformat` writes it; NULL stays NULL."""
    utc = f"({column} AT TIME ZONE 'UTC')"
    return (
        f"(to_char({utc}, 'YYYY-MM-DD\"T\"HH24:MI:SS')"
        f" || CASE WHEN mod(extract(microseconds FROM {column})::bigint, 1000000) = 0"
        f" THEN '' ELSE to_char({utc}, '.US') END || '+00:00')"
    )


def _array(element: str, source: str, order: str) -> str:
    # Composed from this module's constants only; every value is a bound parameter.
    subquery = f"SELECT json_agg({element} ORDER BY {order}) FROM {source}"  # noqa: S608
    return f"coalesce(({subquery}), '[]'::json)"


_CURRENT = f"""json_build_object(
    'status', json_build_object(
        'name', s.status, 'id', s.status_id, 'code', s.status_code,
        'tracking_name', s.tracking_name),
    'status_changed_at', {_iso("s.status_changed_at")},
    'last_scan_at', {_iso("s.last_scan_at")},
    'delay', CASE WHEN s.delay_code IS NOT NULL THEN json_build_object(
        'code', s.delay_code, 'reason', s.delay_reason, 'note', s.delay_note) END,
    'receiver_name', s.receiver_name,
    'delivery_date', {_iso("s.delivery_date")},
    'delivery_notes', s.delivery_notes,
    'confirm_images', coalesce(nullif(s.confirm_images, 'null'::jsonb), '[]'::jsonb),
    'estimate_routes', s.estimate_routes,
    'active', s.active,
    'stopped_reason', s.stopped_reason,
    'stalled_at', {_iso("s.stalled_at")},
    'registered_at', {_iso("s.registered_at")},
    'found_at', {_iso("s.found_at")},
    'terminal_at', {_iso("s.terminal_at")},
    'last_polled_at', {_iso("s.last_polled_at")},
    'next_poll_at', {_iso("s.next_poll_at")},
    'polls_made', s.polls_made,
    'consecutive_errors', s.consecutive_errors,
    'last_error_code', s.last_error_code)"""

_STATUSES = _array(
    f"""json_build_object(
        'status', e.status, 'status_id', e.status_id, 'status_code', e.status_code,
        'tracking_name', e.tracking_name, 'occurred_at', {_iso("e.occurred_at")},
        'seen_at', {_iso("e.seen_at")})""",
    "status_events e WHERE e.shipment_id = s.id",
    "e.occurred_at, e.id",
)

# A post office or province is shown by name, or by id when the name is missing or empty.
_SCANS = _array(
    f"""json_build_object(
        'status_id', t.status_id, 'status_name', t.status_name,
        'post_office', coalesce(nullif(t.post_office_name, ''), t.post_office_id),
        'province', coalesce(nullif(t.province_name, ''), t.province_id),
        'occurred_at', {_iso("t.occurred_at")}, 'notes', t.notes,
        'seen_at', {_iso("t.seen_at")})""",
    "tracking_events t WHERE t.shipment_id = s.id",
    "t.occurred_at NULLS LAST, t.id",
)

# Delays live in the events that announced them: the shipment row keeps only the latest.
_DELAYS = _array(
    f"""json_build_object(
        'code', o.data->'delay'->'code', 'reason', o.data->'delay'->'reason',
        'note', o.data->'delay'->'note', 'seen_at', {_iso("o.created_at")})""",
    "outbox_events o WHERE o.shipment_id = s.id AND o.type = 'shipment.delayed'"
    " AND jsonb_typeof(o.data->'delay') = 'object' AND o.data->'delay' <> '{}'::jsonb",
    "o.sequence",
)

_ATTEMPTS = _array(
    f"""json_build_object(
        'attempted_at', {_iso("da.attempted_at")}, 'status_code', da.status_code,
        'duration_ms', da.duration_ms, 'error', da.error)""",
    "delivery_attempts da WHERE da.delivery_id = d.id",
    "da.attempted_at, da.id",
)

_DELIVERIES = _array(
    f"""json_build_object(
        'channel', CASE WHEN d.endpoint_id IS NOT NULL THEN 'webhook' ELSE 'email' END,
        'destination', CASE WHEN d.endpoint_id IS NOT NULL THEN w.url ELSE r.address END,
        'state', d.state, 'next_attempt_at', {_iso("d.next_attempt_at")},
        'completed_at', {_iso("d.completed_at")}, 'attempts', {_ATTEMPTS})""",
    "deliveries d LEFT JOIN webhook_endpoints w ON w.id = d.endpoint_id"
    " LEFT JOIN email_recipients r ON r.id = d.recipient_id WHERE d.event_id = o.id",
    "d.id",
)

_NOTIFICATIONS = _array(
    f"""json_build_object(
        'event_id', o.event_id, 'type', o.type, 'sequence', o.sequence,
        'created_at', {_iso("o.created_at")}, 'deliveries', {_DELIVERIES})""",
    "outbox_events o WHERE o.shipment_id = s.id",
    "o.sequence",
)

# The document of shipment `s` of account `a`, as JSON text.
DOCUMENT = f"""json_build_object(
    'account', a.name, 'order_code', s.order_code, 'current', {_CURRENT},
    'statuses', {_STATUSES}, 'scans', {_SCANS}, 'delays', {_DELAYS},
    'notifications', {_NOTIFICATIONS})::text"""

# What a token may read: (token id, the document or NULL) for a valid, unrevoked token, and no
# row at all for any other. Another account's code answers exactly as an unknown one: the same
# single index probe finds nothing. Parameters: `token_hash`, `order_code`. psycopg prepares
# it on each connection after its fifth run, so PostgreSQL plans it once.
READ_BY_TOKEN = f"""SELECT k.id, (
    SELECT {DOCUMENT} FROM shipments s JOIN accounts a ON a.id = s.account_id
    WHERE s.account_id = k.account_id AND s.order_code = %(order_code)s)
FROM api_tokens k WHERE k.token_hash = %(token_hash)s AND k.revoked_at IS NULL"""  # noqa: S608
