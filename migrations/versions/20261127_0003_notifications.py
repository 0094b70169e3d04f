"""Indexes for notifications: an endpoint's deliveries by state, a recipient's deliveries.

Why: disabling an endpoint holds its pending deliveries and enabling it makes them due, `shipmon
endpoint list` counts each endpoint's pending and dead deliveries, and deleting an endpoint or an
email recipient cascades to its deliveries. Without these indexes each of those reads the whole
deliveries table, which grows with every event. The indexes are built CONCURRENTLY, outside a
transaction, so writers to a live deliveries table are never blocked while they build.

Revision ID: 0003
Revises: 0004
Create Date: 2026-11-27 09:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_deliveries_endpoint_id_state",
            "deliveries",
            ["endpoint_id", "state"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.create_index(
            "ix_deliveries_recipient_id",
            "deliveries",
            ["recipient_id"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_deliveries_recipient_id", table_name="deliveries", postgresql_concurrently=True
        )
        op.drop_index(
            "ix_deliveries_endpoint_id_state", table_name="deliveries", postgresql_concurrently=True
        )
