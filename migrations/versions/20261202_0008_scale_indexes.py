"""Indexes that keep the periodic work from reading every shipment.

Why: with millions of shipments, three questions asked every few seconds or minutes read the
whole table: which new rows still need their planned first lookup (every dispatch tick), which
open shipments have been silent longer than normal for their status (stalled detection), and
how many orders each account registered since the last price update. A partial index on the
rows not yet planned, one on each open shipment's status and last change, and one on the
accounts' registrations answer each with a range scan. Built CONCURRENTLY, outside a
transaction, so polls writing shipments are never blocked while they build.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 18:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_shipments_unplanned",
            "shipments",
            ["registered_at"],
            postgresql_where=sa.text(
                "active AND last_polled_at IS NULL AND next_poll_at = registered_at"
            ),
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.create_index(
            "ix_shipments_silent_since",
            "shipments",
            ["status", sa.text("greatest(status_changed_at, last_scan_at)")],
            postgresql_where=sa.text("active AND stalled_at IS NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.create_index(
            "ix_shipments_account_id_registered_at",
            "shipments",
            ["account_id", "registered_at"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in (
            "ix_shipments_account_id_registered_at",
            "ix_shipments_silent_since",
            "ix_shipments_unplanned",
        ):
            op.drop_index(name, table_name="shipments", postgresql_concurrently=True)
