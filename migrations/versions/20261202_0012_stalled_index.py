"""An index on the stalled shipments, so counting them per account does not read every one.

Why: the metrics gauges (every 30 s) and `shipmon stats` count each account's stalled open
shipments. Stalled shipments are few, but without an index of their own the count read every
shipment: about a second at a million rows. A partial index holds only the stalled open ones.
Built CONCURRENTLY, outside a transaction, so polls writing shipments are never blocked.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 23:00:00.000000
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


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_shipments_stalled",
            table_name="shipments",
            postgresql_concurrently=True,
            if_exists=True,
        )
