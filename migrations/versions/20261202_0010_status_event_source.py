"""Where each recorded status came from: a lookup shipmon made, or the carrier's push.

Why: 247Express can push status changes to shipmon as well as answer lookups. Both land in the
same `status_events` rows; the scheduler learns from this column what share of an account's
changes pushes already cover, and spends lookups where they do not. A column with a constant
default is added without rewriting the table (PostgreSQL 11+), and every existing row came
from a lookup.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 19:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "status_events",
        sa.Column("source", sa.String(length=8), server_default=sa.text("'poll'"), nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_status_events_known_source"), "status_events", "source IN ('poll', 'push')"
    )


def downgrade() -> None:
    op.drop_column("status_events", "source")
