"""The API's bodies, declared so the OpenAPI description is exact.

The documents themselves are built by the same code as the CLI's `--json` output (intake,
`shipmon show`, `shipmon quota`); these models only describe them. Times stay the ISO-8601
strings that code writes, so an API answer and the CLI's JSON are equal byte for byte.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from worker.domain.vocabulary import ErrorCode

MAX_CODES_PER_CALL = 10_000

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order_codes: list[str] = Field(
        max_length=MAX_CODES_PER_CALL,
        description="Order codes to watch: 5-20 letters, digits, '_' or '-'. Up to 10,000.",
    )


class Refused(BaseModel):
    order_code: str
    error: ErrorCode


class IntakeAnswer(BaseModel):
    """What became of each code: as the Celery task `shipmon.register_orders` answers."""

    registered: list[str]
    already_registered: list[str]
    refused: list[Refused]


class StatusView(BaseModel):
    name: str | None = Field(description="English name, or the carrier's raw value if unknown.")
    id: int | None
    code: str | None
    tracking_name: str | None


class DelayView(BaseModel):
    code: int | None
    reason: str | None
    note: str | None


class CurrentState(BaseModel):
    status: StatusView
    status_changed_at: Timestamp | None
    last_scan_at: Timestamp | None
    delay: DelayView | None
    receiver_name: str | None
    delivery_date: Timestamp | None
    delivery_notes: str | None
    confirm_images: list[Any] = Field(description="Delivery proof: the carrier's image URLs.")
    estimate_routes: Any = Field(
        description="The carrier's estimated delivery (`estimateRoutes`), as it sent it."
    )
    active: bool = Field(description="Still polled; false once finished or stopped.")
    stopped_reason: str | None
    stalled_at: Timestamp | None
    registered_at: Timestamp
    found_at: Timestamp | None
    terminal_at: Timestamp | None
    last_polled_at: Timestamp | None
    next_poll_at: Timestamp
    polls_made: int
    consecutive_errors: int
    last_error_code: str | None


class ShipmentSummary(CurrentState):
    order_code: str


class ShipmentPage(BaseModel):
    shipments: list[ShipmentSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: done.")


class StatusRecord(BaseModel):
    status: str
    status_id: int | None
    status_code: str | None
    tracking_name: str | None
    occurred_at: Timestamp
    seen_at: Timestamp


class ScanRecord(BaseModel):
    status_id: int | None
    status_name: str | None
    post_office: str | None
    province: str | None
    occurred_at: Timestamp | None
    notes: str | None
    seen_at: Timestamp


class DelayRecord(BaseModel):
    code: int | None
    reason: str | None
    note: str | None
    seen_at: Timestamp


class AttemptRecord(BaseModel):
    attempted_at: Timestamp
    status_code: int | None
    duration_ms: int
    error: str | None


class DeliveryRecord(BaseModel):
    channel: str
    destination: str
    state: str
    next_attempt_at: Timestamp
    completed_at: Timestamp | None
    attempts: list[AttemptRecord]


class NotificationRecord(BaseModel):
    event_id: str
    type: str
    sequence: int
    created_at: Timestamp
    deliveries: list[DeliveryRecord]


class ShipmentDocument(BaseModel):
    """Everything shipmon knows about one shipment: the document of `shipmon show CODE --json`."""

    account: str
    order_code: str
    current: CurrentState
    statuses: list[StatusRecord]
    scans: list[ScanRecord]
    delays: list[DelayRecord]
    notifications: list[NotificationRecord]


class QuotaRow(BaseModel):
    """The account's carrier day: a row of `shipmon quota --json`."""

    account: str | None
    api_key: str | None = Field(description="The key's last four characters only.")
    daily_quota: int
    used_today: int
    allowed_now: int
    last_hour: int
    projected: int
    paused_until: Timestamp | None
    pause_reason: str | None
