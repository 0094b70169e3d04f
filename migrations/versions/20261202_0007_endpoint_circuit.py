"""Attempts in flight per endpoint, and a circuit that rests an endpoint that never answers.

Why: one endpoint that tarpits or drops every connection held a delivery slot per waiting
delivery, until every slot of every worker waited on it and other merchants' webhooks stopped.
A claimed delivery now says until when its attempt is in flight (`leased_until`), so a claim can
cap the attempts in flight per endpoint across every worker; an endpoint whose attempts end
without an answer several times in a row is skipped until `circuit_open_until`. Nullable
columns and one with a constant default take no table rewrite; the partial index covers only
the few deliveries in flight.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 18:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("leased_until", sa.DateTime(timezone=True)))
    op.create_index(
        "ix_deliveries_in_flight",
        "deliveries",
        ["endpoint_id", "leased_until"],
        postgresql_where=sa.text("leased_until IS NOT NULL"),
    )
    op.add_column(
        "webhook_endpoints",
        sa.Column("unanswered", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column("webhook_endpoints", sa.Column("circuit_open_until", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("webhook_endpoints", "circuit_open_until")
    op.drop_column("webhook_endpoints", "unanswered")
    op.drop_index("ix_deliveries_in_flight", table_name="deliveries")
    op.drop_column("deliveries", "leased_until")
