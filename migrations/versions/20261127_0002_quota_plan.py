"""A learned daily plan per API key.

Why: when the carrier answers APIKEY_LIMIT before a key has spent its plan, someone else is
using the same key. shipmon pauses the key until the carrier's midnight and, from then on, plans
no more than it had spent when it was stopped (less a margin), so the key is not refused again
every afternoon. Adding a nullable column takes no table rewrite.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 09:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("learned_daily_quota", sa.Integer(), nullable=True))
    op.create_check_constraint(
        op.f("ck_accounts_positive_learned_daily_quota"), "accounts", "learned_daily_quota > 0"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_accounts_positive_learned_daily_quota"), "accounts", type_="check")
    op.drop_column("accounts", "learned_daily_quota")
