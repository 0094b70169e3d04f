"""Receiving the carrier's status pushes: which account a push is for, and pushes already applied.

Why: 247Express can push each status change to shipmon (`POST /carrier/247/status`). A push
names its account by the account's own API key, stored only encrypted, so accounts gain a keyed
digest of it (HMAC-SHA256 under a key derived from SHIPMON_SECRET_KEY) to find the account
without decrypting every key; or by Basic auth, whose password is stored hashed. The carrier
resends pushes it believes failed, so each applied push's `TransactionId` is kept, unique per
account, and a resent one changes nothing.

The digests of existing accounts are filled in when the HTTP API starts (it has the secret key;
a migration may run without it), and kept current by `account add`/`set-key` and
`shipmon secrets rotate`.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 19:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("api_key_digest", sa.String(length=64), nullable=True))
    op.add_column("accounts", sa.Column("push_password_hash", sa.Text(), nullable=True))
    op.create_index(op.f("ix_accounts_api_key_digest"), "accounts", ["api_key_digest"])
    op.create_table(
        "push_receipts",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("transaction_id", sa.Uuid(), nullable=False),
        sa.Column("shipment_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_push_receipts_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["shipment_id"],
            ["shipments.id"],
            name=op.f("fk_push_receipts_shipment_id_shipments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", "transaction_id", name=op.f("pk_push_receipts")),
    )
    op.create_index(op.f("ix_push_receipts_shipment_id"), "push_receipts", ["shipment_id"])


def downgrade() -> None:
    op.drop_table("push_receipts")
    op.drop_index(op.f("ix_accounts_api_key_digest"), table_name="accounts")
    op.drop_column("accounts", "push_password_hash")
    op.drop_column("accounts", "api_key_digest")
