"""The carrier's JSON answer read into a bounded, typed `TrackingResult`.

Every field is checked against what the carrier documents and cut to the column it lands in;
an answer that cannot mean what the documentation says becomes `MalformedResponse`, and an
`errorCode` becomes its `CarrierErrorCode`. Times end as timezone-aware UTC.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn, TypeVar
from zoneinfo import ZoneInfo

from worker.carrier.errors import MalformedResponse, carrier_error
from worker.domain.vocabulary import Status, parse_status

__all__ = [
    "CARRIER_TIMEZONE",
    "MAILER_TYPE_LIMIT",
    "STATUS_LIMIT",
    "PriceItem",
    "StatusEntry",
    "TrackingEntry",
    "TrackingResult",
    "ascii_integer",
    "parse_tracking",
]

# Times the carrier sends without an offset are wall-clock times in Vietnam.
CARRIER_TIMEZONE = ZoneInfo("Asia/Ho_Chi_Minh")

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class PriceItem:
    """One service billed on the order (`priceInfo[]`)."""

    service_name: str | None
    service_id: str | None
    cost: Decimal | None


@dataclass(frozen=True, slots=True)
class StatusEntry:
    """One status change in the order's history (`statuses[]`)."""

    time: datetime | None
    status: Status | None
    status_raw: str | None
    status_name: str | None
    tracking_name: str | None


@dataclass(frozen=True, slots=True)
class TrackingEntry:
    """One scan of the parcel at a post office (`trackings[]`, oldest first)."""

    status_id: str | None
    status_name: str | None
    post_office_id: str | None
    post_office_name: str | None
    province_id: str | None
    province_name: str | None
    date_change: datetime | None
    notes: str | None


@dataclass(frozen=True, slots=True)
class TrackingResult:
    """What the carrier says about one order; times are timezone-aware UTC."""

    order_code: str
    status: Status | None
    status_raw: str | None
    status_name: str | None
    tracking_name: str | None
    delay_code: int | None
    delay_note: str | None
    delivery_notes: str | None
    delivery_date: datetime | None
    receiver_name: str | None
    mailer_type: str | None
    length: float | None
    width: float | None
    height: float | None
    real_weight: float | None
    cal_weight: float | None
    weight: float | None
    quantity: int | None
    price: Decimal | None
    price_fr: Decimal | None
    far_region_fee_amount: Decimal | None
    fuel_fee_amount: Decimal | None
    vat_amount: Decimal | None
    total_service_cost: Decimal | None
    accept_date: datetime | None
    external_code: str | None
    price_info: tuple[PriceItem, ...] = ()
    statuses: tuple[StatusEntry, ...] = ()
    trackings: tuple[TrackingEntry, ...] = ()
    estimate_routes: Any = None
    confirm_images: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)


class _FieldError(Exception):
    """A field whose value cannot mean what the carrier documents; becomes MalformedResponse."""

    def __init__(self, path: str, expected: str, value: object) -> None:
        shown = repr(value)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        super().__init__(f"field {path}: expected {expected}, got {shown}")


class _Fields:
    """A carrier JSON object read by case-insensitive key, since .NET casing varies."""

    def __init__(self, obj: Mapping[str, Any], path: str) -> None:
        self._obj = obj
        self._values = {key.lower(): value for key, value in obj.items()}
        if len(self._values) != len(obj):
            # "status" and "Status" in one object: no telling which the carrier meant.
            raise _FieldError(path or "answer", "keys distinct regardless of case", sorted(obj))
        self._path = path
        self._read: set[str] = set()

    def value(self, key: str) -> Any:
        lower = key.lower()
        self._read.add(lower)
        return self._values.get(lower)

    def read(self, key: str, reader: Callable[[Any, str], _T]) -> _T:
        """The field read by `reader`, which names the field's path when it refuses the value."""
        return reader(self.value(key), self._path + key)

    def unread(self) -> dict[str, Any]:
        """The fields not read so far, spelled as the carrier sent them."""
        return {key: value for key, value in self._obj.items() if key.lower() not in self._read}


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


# Longest text kept from the carrier, by the database column it lands in: statuses and their
# codes (shipments.status, status_code; status_events.status, status_code) hold 40,
# shipments.mailer_type 20; free text is cut at _TEXT_LIMIT so one answer cannot fill a row.
STATUS_LIMIT = 40
MAILER_TYPE_LIMIT = 20
_TEXT_LIMIT = 2000
# PostgreSQL's integer columns (status_id, delay_code, quantity).
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
# Amounts and measures beyond this are no parcel's: refused rather than stored.
_MAGNITUDE_LIMIT = 10**15
# Python's float() and Decimal() accept Unicode digits ("٣") and underscores; the carrier
# sends neither, and a value that only Python reads as a number is not one.
_NUMERIC_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def _text(value: object, path: str, limit: int = _TEXT_LIMIT) -> str | None:
    if isinstance(value, str):
        return value.strip()[:limit].rstrip() or None
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)[:limit]
    raise _FieldError(path, "text", value)


def _text_within(limit: int) -> Callable[[object, str], str | None]:
    """A text reader that cuts what it reads to `limit` characters (its column's length)."""
    return lambda value, path: _text(value, path, limit)


def _identifier(value: object, path: str, limit: int = _TEXT_LIMIT) -> str | None:
    """An ID the carrier may send as a number or a string, kept as text."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _text(value, path, limit)


def ascii_integer(text: str | None) -> int | None:
    """`text` as an integer if it is ASCII digits in PostgreSQL's integer range, else None.

    `str.isdigit` accepts "²", which `int()` refuses; `isdecimal` alone accepts "٣".
    """
    if text is None or not (text.isascii() and text.isdecimal()):
        return None
    number = int(text)
    return number if number <= _INT_MAX else None


def _numeric(value: object, path: str, expected: str) -> int | float | str | None:
    """A number or numeric text as the carrier sent it; None when blank."""
    if _blank(value):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _FieldError(path, expected, value)
    if isinstance(value, str):
        value = value.strip()
        if not _NUMERIC_TEXT.fullmatch(value):
            raise _FieldError(path, expected, value)
    return value


def _number(value: object, path: str) -> float | None:
    raw = _numeric(value, path, "a number")
    if raw is None:
        return None
    try:
        number = float(raw)
    except (ValueError, OverflowError):
        raise _FieldError(path, "a number", value) from None
    if not math.isfinite(number) or abs(number) >= _MAGNITUDE_LIMIT:
        raise _FieldError(path, f"a finite number below {_MAGNITUDE_LIMIT:.0e}", value)
    return number


def _integer(value: object, path: str) -> int | None:
    number = _number(value, path)
    if number is None:
        return None
    if not number.is_integer():
        raise _FieldError(path, "a whole number", value)
    if not _INT_MIN <= number <= _INT_MAX:
        raise _FieldError(path, "a whole number within 32 bits", value)
    return int(number)


def _money(value: object, path: str) -> Decimal | None:
    raw = _numeric(value, path, "an amount")
    if raw is None:
        return None
    try:
        # repr() of a float is its shortest exact decimal form: 1.1 stays 1.1, not 1.100000...
        amount = Decimal(repr(raw) if isinstance(raw, float) else str(raw))
    except InvalidOperation:
        raise _FieldError(path, "an amount", value) from None
    if not amount.is_finite() or abs(amount) >= _MAGNITUDE_LIMIT:
        raise _FieldError(path, f"a finite amount below {_MAGNITUDE_LIMIT:.0e}", value)
    return amount


def _delay_code(value: object, path: str) -> int | None:
    code = _integer(value, path)
    # The carrier sends 0 for "no delay"; no delay reason has code 0.
    return code or None


# Some Python 3.11 releases refuse more than 6 fractional digits; .NET sends 7.
_EXTRA_FRACTION_DIGITS = re.compile(r"(?<=[.,]\d{6})\d+")


def _time(value: object, path: str) -> datetime | None:
    """A carrier time as UTC: ISO-8601 with an offset, or a naive Vietnam wall-clock time."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _FieldError(path, "a time", value)
    text = value.strip()
    if not text:
        return None
    try:
        moment = _from_isoformat(text)
        if moment.year == 1:
            return None  # .NET's DateTime.MinValue: the carrier's way of saying "not set"
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=CARRIER_TIMEZONE)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise _FieldError(path, "a time", value) from None


def _from_isoformat(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return datetime.fromisoformat(_EXTRA_FRACTION_DIGITS.sub("", text))


def _objects(value: object, path: str) -> list[_Fields]:
    """A list of JSON objects; null and empty mean none, and one object alone is a list of one."""
    if _blank(value):
        return []
    if isinstance(value, dict):
        return [_Fields(value, f"{path}.")]
    if not isinstance(value, list):
        raise _FieldError(path, "a list", value)
    rows = []
    for index, item in enumerate(value):
        if item is None:
            continue
        if not isinstance(item, dict):
            raise _FieldError(f"{path}[{index}]", "an object", item)
        rows.append(_Fields(item, f"{path}[{index}]."))
    return rows


def _strings(value: object, path: str) -> tuple[str, ...]:
    """A list of strings; one string alone is a list of one."""
    if _blank(value):
        return ()
    if isinstance(value, str):
        return (value.strip(),)
    if not isinstance(value, list):
        raise _FieldError(path, "a list of text", value)
    texts = (_text(item, f"{path}[{index}]") for index, item in enumerate(value))
    return tuple(text for text in texts if text is not None)


def _status(row: _Fields) -> tuple[Status | None, str | None, str | None]:
    """The status, the raw ID as text and the Vietnamese code; the code decides without an ID."""
    status_raw = row.read("status", _status_id)
    status_name = row.read("statusName", _text_within(STATUS_LIMIT))
    status = parse_status(status_raw if status_raw is not None else status_name)
    return status, status_raw, status_name


def _status_id(value: object, path: str) -> str | None:
    """A status ID as text; digits past 32 bits name no status and are refused."""
    text = _identifier(value, path, STATUS_LIMIT)
    if text is not None and text.isascii() and text.isdecimal() and ascii_integer(text) is None:
        raise _FieldError(path, "a status ID within 32 bits", value)
    return text


def parse_tracking(body: bytes, order_code: str) -> TrackingResult:
    """The carrier's answer for `order_code`, or the CarrierError it amounts to."""
    payload = _decode(body, order_code)
    try:
        return _tracking_result(payload, order_code)
    except _FieldError as error:
        raise MalformedResponse(str(error), order_code=order_code) from error


def _decode(body: bytes, order_code: str) -> dict[str, Any]:
    def malformed(message: str) -> NoReturn:
        raise MalformedResponse(message, order_code=order_code)

    if not body.strip():
        malformed("response body was empty")
    if body.lstrip()[:1] == b"<":
        malformed("response was HTML, not JSON")
    try:
        payload = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except _Refused as error:
        malformed(f"response refused: {error}")
    except (ValueError, RecursionError) as error:
        # UnicodeDecodeError and JSONDecodeError are both ValueErrors.
        raise MalformedResponse(
            f"response was not valid JSON ({len(body)} bytes; truncated?)", order_code=order_code
        ) from error
    if not isinstance(payload, dict):
        malformed(f"response was a JSON {type(payload).__name__}, not an object")
    try:
        return _bounded(payload, nul=b"\\u0000" in body)
    except _Refused as error:
        malformed(f"response refused: {error}")


# Deeper than any real answer (which nests three levels); PostgreSQL's JSONB and json.dumps
# have limits of their own that a hostile answer would reach first.
_MAX_DEPTH = 32


class _Refused(ValueError):
    """Valid JSON that no carrier answer can be: too deep, or a number beyond a float."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused("a number too large for JSON")
    return value


def _bounded(payload: dict[str, Any], *, nul: bool) -> dict[str, Any]:
    """A decoded answer refused if nested too deep; with its NUL characters taken out when it
    has any (`nul`), since PostgreSQL refuses them in text and JSONB."""
    _check_depth(payload)
    cleaned: dict[str, Any] = _without_nul(payload) if nul else payload
    return cleaned


def _check_depth(payload: Any) -> None:
    """Refuse JSON nested deeper than _MAX_DEPTH levels, one level of containers at a time
    (the scalars are only looked at, never walked into)."""
    level = [payload]
    depth = 0
    while level:
        if depth >= _MAX_DEPTH:
            raise _Refused(f"JSON nested deeper than {_MAX_DEPTH} levels")
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        depth += 1


def _without_nul(value: Any) -> Any:
    """`value` with every NUL character taken out of its strings and keys."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {key.replace("\x00", ""): _without_nul(item) for key, item in value.items()}
    return value


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _tracking_result(payload: dict[str, Any], order_code: str) -> TrackingResult:
    top = _Fields(payload, "")
    error_code = top.read("errorCode", _text)
    if error_code is not None:
        raise carrier_error(error_code, top.read("errorMessage", _text), order_code=order_code)
    top.value("errorMessage")  # some answers say "Success" here; it is not an unknown field

    status, status_raw, status_name = _status(top)
    answered_code = top.read("orderCode", _text)
    if answered_code is None and status_raw is None and status_name is None:
        raise _FieldError("orderCode", "an order code or an errorCode", None)
    # A different order's answer must never be recorded against this one.
    if answered_code is not None and answered_code.upper() != order_code.strip().upper():
        raise _FieldError("orderCode", repr(order_code), answered_code)

    return TrackingResult(
        order_code=order_code,
        status=status,
        status_raw=status_raw,
        status_name=status_name,
        tracking_name=top.read("trackingName", _text),
        delay_code=top.read("delayCode", _delay_code),
        delay_note=top.read("delayNote", _text),
        delivery_notes=top.read("deliveryNotes", _text),
        delivery_date=top.read("deliveryDate", _time),
        receiver_name=top.read("receiverName", _text),
        mailer_type=top.read("mailerTypeID", _text_within(MAILER_TYPE_LIMIT)),
        length=top.read("length", _number),
        width=top.read("width", _number),
        height=top.read("height", _number),
        real_weight=top.read("realWeight", _number),
        cal_weight=top.read("calWeight", _number),
        weight=top.read("weight", _number),
        quantity=top.read("quantity", _integer),
        price=top.read("price", _money),
        price_fr=top.read("priceFR", _money),
        far_region_fee_amount=top.read("farRegionFeeAmount", _money),
        fuel_fee_amount=top.read("fuelFeeAmount", _money),
        vat_amount=top.read("vatAmount", _money),
        total_service_cost=top.read("totalServiceCost", _money),
        accept_date=top.read("acceptDate", _time),
        external_code=top.read("externalCode", _identifier),
        price_info=tuple(_price_item(row) for row in top.read("priceInfo", _objects)),
        statuses=tuple(_status_entry(row) for row in top.read("statuses", _objects)),
        trackings=tuple(_tracking_entry(row) for row in top.read("trackings", _objects)),
        estimate_routes=top.value("estimateRoutes"),
        confirm_images=top.read("confirmImage", _strings),
        extra=top.unread(),
        raw=payload,
    )


def _price_item(row: _Fields) -> PriceItem:
    return PriceItem(
        service_name=row.read("serviceName", _text),
        service_id=row.read("serviceID", _identifier),
        cost=row.read("cost", _money),
    )


def _status_entry(row: _Fields) -> StatusEntry:
    status, status_raw, status_name = _status(row)
    return StatusEntry(
        time=row.read("time", _time),
        status=status,
        status_raw=status_raw,
        status_name=status_name,
        tracking_name=row.read("trackingName", _text),
    )


def _tracking_entry(row: _Fields) -> TrackingEntry:
    return TrackingEntry(
        status_id=row.read("statusID", _identifier),
        status_name=row.read("statusName", _text),
        post_office_id=row.read("postOfficeID", _identifier),
        post_office_name=row.read("postOfficeName", _text),
        province_id=row.read("provinceID", _identifier),
        province_name=row.read("provinceName", _text),
        date_change=row.read("dateChange", _time),
        notes=row.read("notes", _text),
    )
