"""The database schema: accounts, shipments and their history, the outbox and deliveries, quota."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any, ClassVar, Protocol

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from worker.domain.deliveries import DeliveryState
from worker.domain.vocabulary import ORDER_CODE_SQL_PATTERN

# Stable constraint names, so migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Timestamp = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: Timestamp,
        dict[str, Any]: JSONB,
        list[Any]: JSONB,
        Decimal: Numeric,
    }


def _now() -> Any:
    return mapped_column(Timestamp, server_default=func.now(), nullable=False)


class UnknownAccount(LookupError):
    """No account has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"no account named {name!r}; create it with: shipmon account add {name} --api-key KEY"
        )
        self.name = name


class Account(Base):
    """A merchant's carrier account: its API key (encrypted) and its daily quota."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    api_key_encrypted: Mapped[str] = mapped_column(Text)
    # The key's last four characters, so ops can tell keys apart without seeing them.
    api_key_hint: Mapped[str] = mapped_column(String(8))
    # HMAC-SHA256 of the key under a key derived from SHIPMON_SECRET_KEY: a carrier push names
    # its account by the API key, found through this without decrypting every account's key.
    api_key_digest: Mapped[str | None] = mapped_column(String(64), index=True)
    # `shipmon account set-push-auth`: the Basic auth password pushes may use instead (scrypt).
    push_password_hash: Mapped[str | None] = mapped_column(Text)
    daily_quota: Mapped[int | None] = mapped_column(
        Integer, CheckConstraint("daily_quota > 0", name="positive_daily_quota")
    )
    # Lowered when the carrier says APIKEY_LIMIT before the plan is spent (someone else uses the
    # key too): what had been spent then, less a margin. The plan never exceeds it.
    learned_daily_quota: Mapped[int | None] = mapped_column(
        Integer, CheckConstraint("learned_daily_quota > 0", name="positive_learned_daily_quota")
    )
    # The carrier day the learned plan was last lowered or grown back.
    learned_plan_day: Mapped[date | None]
    paused_until: Mapped[datetime | None]
    pause_reason: Mapped[str | None] = mapped_column(Text)
    ops_email: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime] = _now()

    shipments: Mapped[list[Shipment]] = relationship(back_populates="account", lazy="raise")


class AccountRef(Protocol):
    """What writing a shipment's history and events needs of its account: an `Account`, or a
    copy of its id and name kept between transactions (the carrier push's account cache)."""

    @property
    def id(self) -> int: ...

    @property
    def name(self) -> str: ...


class Shipment(Base):
    """One order code of one account: what the carrier last said, and when to ask again."""

    __tablename__ = "shipments"
    __table_args__ = (
        UniqueConstraint("account_id", "order_code"),
        CheckConstraint(f"order_code ~ '{ORDER_CODE_SQL_PATTERN}'", name="order_code_format"),
        # The dispatcher's question: which active shipments of this account are due, oldest first.
        Index(
            "ix_shipments_due",
            "account_id",
            "next_poll_at",
            postgresql_where=text("active"),
        ),
        Index("ix_shipments_active_next_poll_at", "next_poll_at", postgresql_where=text("active")),
        Index("ix_shipments_status", "status"),
        # New rows not yet given their planned first lookup; planning moves a row out, so a
        # dispatch tick reads only these, however long the due backlog.
        Index(
            "ix_shipments_unplanned",
            "registered_at",
            postgresql_where=text(
                "active AND last_polled_at IS NULL AND next_poll_at = registered_at"
            ),
        ),
        # Stalled detection: per status, the open shipments silent since before its limit.
        Index(
            "ix_shipments_silent_since",
            "status",
            text("greatest(status_changed_at, last_scan_at)"),
            postgresql_where=text("active AND stalled_at IS NULL"),
        ),
        # The price update counts each account's registrations since it last looked.
        Index("ix_shipments_account_id_registered_at", "account_id", "registered_at"),
        # The gauges and `stats` count each account's stalled open shipments, which are few.
        Index(
            "ix_shipments_stalled",
            "account_id",
            postgresql_where=text("active AND stalled_at IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    order_code: Mapped[str] = mapped_column(String(20))

    # Current state, as the carrier last reported it. `status` is the English name, or the
    # carrier's raw value when it is a status shipmon does not know.
    status: Mapped[str | None] = mapped_column(String(40))
    status_id: Mapped[int | None] = mapped_column(Integer)
    status_code: Mapped[str | None] = mapped_column(String(40))
    tracking_name: Mapped[str | None] = mapped_column(Text)
    status_changed_at: Mapped[datetime | None]
    delay_code: Mapped[int | None] = mapped_column(Integer)
    delay_reason: Mapped[str | None] = mapped_column(Text)
    delay_note: Mapped[str | None] = mapped_column(Text)
    delivery_notes: Mapped[str | None] = mapped_column(Text)
    delivery_date: Mapped[datetime | None]
    receiver_name: Mapped[str | None] = mapped_column(Text)
    mailer_type: Mapped[str | None] = mapped_column(String(20))
    length: Mapped[Decimal | None]
    width: Mapped[Decimal | None]
    height: Mapped[Decimal | None]
    real_weight: Mapped[Decimal | None]
    cal_weight: Mapped[Decimal | None]
    weight: Mapped[Decimal | None]
    quantity: Mapped[int | None] = mapped_column(Integer)
    price: Mapped[Decimal | None]
    price_fr: Mapped[Decimal | None]
    far_region_fee_amount: Mapped[Decimal | None]
    fuel_fee_amount: Mapped[Decimal | None]
    vat_amount: Mapped[Decimal | None]
    total_service_cost: Mapped[Decimal | None]
    price_info: Mapped[list[Any] | None]
    estimate_routes: Mapped[list[Any] | None]
    confirm_images: Mapped[list[Any] | None]
    accept_date: Mapped[datetime | None]
    external_code: Mapped[str | None] = mapped_column(Text)
    last_scan_at: Mapped[datetime | None]
    last_payload: Mapped[dict[str, Any] | None]
    payload_hash: Mapped[str | None] = mapped_column(String(64))

    # Polling state. Every column has a default so a bare INSERT gives a row that is due now.
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    next_poll_at: Mapped[datetime] = _now()
    last_polled_at: Mapped[datetime | None]
    polls_made: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    consecutive_errors: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error_code: Mapped[str | None] = mapped_column(String(60))
    registered_at: Mapped[datetime] = _now()
    found_at: Mapped[datetime | None]
    terminal_at: Mapped[datetime | None]
    stopped_reason: Mapped[str | None] = mapped_column(String(60))
    stalled_at: Mapped[datetime | None]
    # The sequence number of the shipment's latest outbox event.
    last_sequence: Mapped[int] = mapped_column(Integer, server_default=text("0"))

    account: Mapped[Account] = relationship(back_populates="shipments", lazy="raise")


class StatusEvent(Base):
    """One entry of the carrier's `statuses[]`: the shipment entered a status at a time."""

    __tablename__ = "status_events"
    __table_args__ = (
        UniqueConstraint("shipment_id", "occurred_at", "status"),
        # Learning and stalled detection read recent history by time.
        Index("ix_status_events_occurred_at", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    shipment_id: Mapped[int] = mapped_column(
        ForeignKey("shipments.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(40))
    status_id: Mapped[int | None] = mapped_column(Integer)
    status_code: Mapped[str | None] = mapped_column(String(40))
    tracking_name: Mapped[str | None] = mapped_column(Text)
    occurred_at: Mapped[datetime]
    seen_at: Mapped[datetime] = _now()
    # How shipmon first heard of it: a lookup it made, or the carrier's own push. What share of
    # an account's changes pushes cover decides where lookups are still worth spending.
    source: Mapped[str] = mapped_column(
        String(8),
        CheckConstraint("source IN ('poll', 'push')", name="known_source"),
        server_default=text("'poll'"),
    )


class TrackingEvent(Base):
    """One entry of the carrier's `trackings[]`: a scan at a post office."""

    __tablename__ = "tracking_events"
    # Scans have no id of their own; a digest of all their fields is their natural key.
    __table_args__ = (UniqueConstraint("shipment_id", "fingerprint"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    shipment_id: Mapped[int] = mapped_column(
        ForeignKey("shipments.id", ondelete="CASCADE"), index=True
    )
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_id: Mapped[int | None] = mapped_column(Integer)
    status_name: Mapped[str | None] = mapped_column(Text)
    post_office_id: Mapped[str | None] = mapped_column(Text)
    post_office_name: Mapped[str | None] = mapped_column(Text)
    province_id: Mapped[str | None] = mapped_column(Text)
    province_name: Mapped[str | None] = mapped_column(Text)
    occurred_at: Mapped[datetime | None]
    notes: Mapped[str | None] = mapped_column(Text)
    seen_at: Mapped[datetime] = _now()


class PushReceipt(Base):
    """A carrier push already applied: the carrier resends what it thinks failed."""

    __tablename__ = "push_receipts"

    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    transaction_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    # Receipts go with their shipment when finished shipments are purged.
    shipment_id: Mapped[int] = mapped_column(
        ForeignKey("shipments.id", ondelete="CASCADE"), index=True
    )
    received_at: Mapped[datetime] = _now()


class OutboxEvent(Base):
    """A change worth telling the merchant, written in the transaction that saw it."""

    __tablename__ = "outbox_events"
    __table_args__ = (
        UniqueConstraint("shipment_id", "sequence"),
        Index("ix_outbox_events_created_at", "created_at"),
        # Delivery runs look for the few events not yet fanned out to their endpoints.
        Index("ix_outbox_events_unfanned", "id", postgresql_where=text("fanned_out_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # The public id: `webhook-id` and the body's `id`, stable across retries and replays.
    event_id: Mapped[str] = mapped_column(String(40), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    shipment_id: Mapped[int] = mapped_column(ForeignKey("shipments.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(40))
    sequence: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = _now()
    # Set once a delivery row exists for every endpoint and recipient that wants this event.
    fanned_out_at: Mapped[datetime | None]


class WebhookEndpoint(Base):
    """Where an account's webhooks go, signed with the endpoint's own secret."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(Text)
    secret_encrypted: Mapped[str] = mapped_column(Text)
    # During a rotation the previous secret also signs, until it expires.
    previous_secret_encrypted: Mapped[str | None] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None]
    # NULL means every event type.
    event_types: Mapped[list[str] | None] = mapped_column(ARRAY(String(40)))
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    failing_since: Mapped[datetime | None]
    # Attempts in a row that ended with no answer at all (timeout, reset, refused); enough of
    # them open the circuit: the endpoint is skipped until `circuit_open_until`.
    unanswered: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    circuit_open_until: Mapped[datetime | None]
    created_at: Mapped[datetime] = _now()


class EmailRecipient(Base):
    """An address that gets one email per event of the chosen types."""

    __tablename__ = "email_recipients"
    __table_args__ = (UniqueConstraint("account_id", "address"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(320))
    event_types: Mapped[list[str] | None] = mapped_column(ARRAY(String(40)))
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[datetime] = _now()


_DELIVERY_STATES = ", ".join(f"'{state}'" for state in DeliveryState)


class Delivery(Base):
    """One event on its way to one endpoint or one email recipient."""

    __tablename__ = "deliveries"
    __table_args__ = (
        CheckConstraint("(endpoint_id IS NULL) <> (recipient_id IS NULL)", name="one_destination"),
        CheckConstraint(f"state IN ({_DELIVERY_STATES})", name="known_state"),
        UniqueConstraint("event_id", "endpoint_id"),
        UniqueConstraint("event_id", "recipient_id"),
        Index(
            "ix_deliveries_pending",
            "next_attempt_at",
            postgresql_where=text(f"state = '{DeliveryState.PENDING}'"),
        ),
        # An endpoint's deliveries by state: holding and resuming them, counting the dead ones,
        # and deleting them with their endpoint or recipient without a scan of the whole table.
        Index("ix_deliveries_endpoint_id_state", "endpoint_id", "state"),
        Index("ix_deliveries_recipient_id", "recipient_id"),
        # The few deliveries in flight, counted per endpoint by every claim.
        Index(
            "ix_deliveries_in_flight",
            "endpoint_id",
            "leased_until",
            postgresql_where=text("leased_until IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("outbox_events.id", ondelete="CASCADE"))
    endpoint_id: Mapped[int | None] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    recipient_id: Mapped[int | None] = mapped_column(
        ForeignKey("email_recipients.id", ondelete="CASCADE")
    )
    # Copied from the event so per-shipment ordering needs no join.
    shipment_id: Mapped[int] = mapped_column(BigInteger, index=True)
    sequence: Mapped[int] = mapped_column(Integer)
    # A `DeliveryState`, stored as its string.
    state: Mapped[str] = mapped_column(String(20), server_default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = _now()
    # While an attempt is on its way: when its claim runs out. Cleared when it is recorded.
    leased_until: Mapped[datetime | None]
    last_attempt_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _now()


class DeliveryAttempt(Base):
    """One try at a delivery: what was sent back, and how long it took."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("deliveries.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[datetime] = _now()
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    response_excerpt: Mapped[str | None] = mapped_column(Text)


class QuotaUsage(Base):
    """Lookups spent per account (API key) per carrier day; restores Redis if it loses them."""

    __tablename__ = "quota_usage"

    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    used: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    updated_at: Mapped[datetime] = _now()


class SchedulerState(Base):
    """Named state the poll scheduler shares between processes (its learned model, prices)."""

    __tablename__ = "scheduler_state"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    data: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime] = _now()


class ApiToken(Base):
    """A bearer token of the HTTP API: it acts for one account, and only its SHA-256 is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    # The token itself is never stored: a lookup hashes what the caller presents.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = _now()
    revoked_at: Mapped[datetime | None]
