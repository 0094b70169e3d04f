"""The day a key's learned plan last changed, so a lowered plan can grow back.

Why: a key refused with APIKEY_LIMIT gets a lower daily plan, as someone else is using it too.
If that other user stops, the lowered plan would cost the merchant freshness for good; shipmon
now grows it back a step for every carrier day that passes without a refusal, and needs to
know which day it last changed. Adding a nullable column takes no table rewrite.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 12:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("learned_plan_day", sa.Date(), nullable=True))


def downgrade() -> None:
    op.drop_column("accounts", "learned_plan_day")
