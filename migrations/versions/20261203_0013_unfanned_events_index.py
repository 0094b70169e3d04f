"""An index on the outbox events not yet fanned out, so finding them does not read every event.

Why: every delivery run (the 5-second sweep, and each run while it delivers) looks for events
committed but not yet fanned out to their endpoints. They are a handful at any moment, but
without an index of their own the search read the whole outbox, which grows with history (tens
of millions of events at ten million shipments). A partial index holds only those waiting.
Built CONCURRENTLY, outside a transaction, so writers are never blocked.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 07:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_outbox_events_unfanned",
            "outbox_events",
            ["id"],
            postgresql_where=sa.text("fanned_out_at IS NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_outbox_events_unfanned",
            table_name="outbox_events",
            postgresql_concurrently=True,
            if_exists=True,
        )
