"""An index of the stalled open shipments, by account.

Why: the metrics refresh counts each account's stalled shipments every 30 seconds, and without
an index that reads every shipment: a second at a million rows, ten at ten million. Stalled
shipments are few (one open shipment in a thousand, say), so a partial index on them is small
and the count costs in proportion to them. Built CONCURRENTLY, outside a transaction, so polls
writing shipments are never blocked while it builds.

Revision ID: 0013
Revises: 0010
Create Date: 2026-12-02 19:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0010"
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


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_shipments_stalled", table_name="shipments", postgresql_concurrently=True)
