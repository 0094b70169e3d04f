"""The carrier's status push (247Express → shipmon), parsed into a bounded, typed `StatusPush`.

A push is hostile bytes until this module has read it: it is cleaned and bounded by the same
rules as a lookup's answer (NUL stripped, text cut to its column, numbers range-checked, times
to UTC), and keys shipmon does not use are ignored. A push is a partial answer: `as_result`
turns it into the `TrackingResult` the apply code takes, with the one status it reports.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.carrier.parse import (  # the parser helpers shared with lookups' answers
    StatusEntry,
    TrackingResult,
    _bounded,
    _delay_code,
    _FieldError,
    _Fields,
    _finite_float,
    _identifier,
    _integer,
    _reject_constant,
    _status,
    _text,
    _text_within,
    _time,
)
from worker.domain.vocabulary import Status

# The carrier's push is a flat object of a few short fields; a real one is under 2 KiB.
MAX_PUSH_BYTES = 64 * 1024
# accounts' API keys are at most 200 characters (`shipmon account add`).
_API_KEY_LIMIT = 200
_ORDER_CODE_LIMIT = 40


class PushRefused(ValueError):
    """A push that cannot be read; the message says what the sender must change."""


@dataclass(frozen=True, slots=True)
class StatusPush:
    """One status change as the carrier pushed it; times are timezone-aware UTC."""

    api_key: str | None
    order_code: str
    transaction_id: uuid.UUID
    time: datetime
    status: Status | None
    status_raw: str | None
    status_name: str | None
    external_code: str | None
    reference_code: str | None
    description: str | None
    request_feedback_count: int | None
    delay_code: int | None
    delay_note: str | None
    delivery_notes: str | None
    mailman: str | None
    delivery_date: datetime | None
    receiver_name: str | None

    @property
    def changed_from(self) -> str | None:
        """The status the carrier says the order left ("" for its first status), as its
        Description writes it; None where the Description does not say, or names another
        status than the one pushed."""
        # "Change order status: DANGVANCHUYEN ==> DANGDIPHAT"; nothing left of the arrow for
        # an order's first status.
        before, arrow, entered = (self.description or "").rpartition("==>")
        left = before.rpartition(":")[2].split()
        pushed = {self.status_raw, self.status_name}
        if self.status is not None:
            pushed |= {self.status.code, str(self.status.carrier_id)}
        named = {name.casefold() for name in pushed if name is not None}
        if not arrow or len(left) > 1 or entered.strip().casefold() not in named:
            return None
        return left[0] if left else ""

    @property
    def status_entry(self) -> StatusEntry:
        """The one status the push reports, as an entry of an answer's history."""
        return StatusEntry(self.time, self.status, self.status_raw, self.status_name, None)

    def as_result(self) -> TrackingResult:
        """The push as the partial answer it is: one status, none of a lookup's details."""
        return TrackingResult(
            order_code=self.order_code,
            status=self.status,
            status_raw=self.status_raw,
            status_name=self.status_name,
            tracking_name=None,
            delay_code=self.delay_code,
            delay_note=self.delay_note,
            delivery_notes=self.delivery_notes,
            delivery_date=self.delivery_date,
            receiver_name=self.receiver_name,
            mailer_type=None,
            length=None,
            width=None,
            height=None,
            real_weight=None,
            cal_weight=None,
            weight=None,
            quantity=None,
            price=None,
            price_fr=None,
            far_region_fee_amount=None,
            fuel_fee_amount=None,
            vat_amount=None,
            total_service_cost=None,
            accept_date=None,
            external_code=self.external_code,
            statuses=(self.status_entry,),
        )


def parse_push(body: bytes) -> StatusPush:
    """The push in `body`, or PushRefused saying what is wrong with it."""
    if len(body) > MAX_PUSH_BYTES:
        raise PushRefused(f"the push is over {MAX_PUSH_BYTES} bytes; send one status per push")
    try:
        payload = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise PushRefused("the push is not valid UTF-8 JSON; send a JSON object") from None
    if not isinstance(payload, dict):
        raise PushRefused(f"the push is a JSON {type(payload).__name__}; send a JSON object")
    try:
        return _status_push(_Fields(_bounded(payload, nul=b"\\u0000" in body), ""))
    except (_FieldError, ValueError) as error:
        raise PushRefused(f"the push was refused: {error}") from None


def _required(value: Any, path: str) -> Any:
    if value is None:
        raise _FieldError(path, "a value", None)
    return value


def _transaction_id(value: object, path: str) -> uuid.UUID:
    text = _text(value, path, 64)
    try:
        return uuid.UUID(_required(text, path))
    except ValueError:
        raise _FieldError(path, "a UUID", value) from None


def _status_push(fields: _Fields) -> StatusPush:
    status, status_raw, status_name = _status(fields)
    if status_raw is None and status_name is None:
        raise _FieldError("Status", "a status ID or StatusName", None)
    return StatusPush(
        api_key=fields.read("ApiKey", _text_within(_API_KEY_LIMIT)),
        order_code=_required(
            fields.read("OrderCode", _text_within(_ORDER_CODE_LIMIT)), "OrderCode"
        ),
        transaction_id=fields.read("TransactionId", _transaction_id),
        time=_required(fields.read("Time", _time), "Time"),
        status=status,
        status_raw=status_raw,
        status_name=status_name,
        external_code=fields.read("ExternalCode", _identifier),
        reference_code=fields.read("ReferenceCode", _identifier),
        description=fields.read("Description", _text),
        request_feedback_count=fields.read("RequestFeedbackCount", _integer),
        delay_code=fields.read("DelayCode", _delay_code),
        delay_note=fields.read("DelayNotes", _text),
        delivery_notes=fields.read("DeliveryNotes", _text),
        mailman=fields.read("Mailman", _text),
        delivery_date=fields.read("DeliveryDate", _time),
        receiver_name=fields.read("ReceiverName", _text),
    )
