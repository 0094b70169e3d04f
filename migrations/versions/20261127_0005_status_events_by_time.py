"""An index on status_events by time.

Why: the scheduler learns from the stays that began in the last few days, and stalled detection
from those of the last two weeks; both select status history by `occurred_at`, which without an
index reads the whole table, the largest there is. Built CONCURRENTLY, outside a transaction,
so polls writing history are never blocked while it builds.

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-27 10:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_status_events_occurred_at",
            "status_events",
            ["occurred_at"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_status_events_occurred_at", table_name="status_events", postgresql_concurrently=True
        )
