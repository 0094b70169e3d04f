"""Indexes that let the metrics refresh and `shipmon stats` count without reading every row.

Why: every 30 seconds the metrics refresh counts each account's stalled shipments, and
`shipmon stats` counts open shipments by account and status; both read the whole table (a
second at a million rows, ten at ten million). A partial index of the stalled open shipments
(a few in a thousand) and one of the open shipments' account and status answer them with
index-only reads in proportion to what they count. Built CONCURRENTLY, outside a transaction,
so polls writing shipments are never blocked while they build.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 19:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_shipments_stalled",
            "shipments",
            ["account_id"],
            postgresql_where=sa.text("active AND stalled_at IS NOT NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.create_index(
            "ix_shipments_open_status",
            "shipments",
            ["account_id", "status"],
            postgresql_where=sa.text("active"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in ("ix_shipments_open_status", "ix_shipments_stalled"):
            op.drop_index(name, table_name="shipments", postgresql_concurrently=True)
