"""The 247Express tracking client: one HTTP attempt per call, turned into a typed result.

The carrier is read through httpx over the aiohttp transport (plain httpx's own async transport
is too slow for the poll rate this product needs). Everything the carrier can answer ends as
either a `TrackingResult` or one of the `CarrierError` subclasses below; retrying is the
caller's decision, because every attempt costs quota.

API keys travel in the query string, so they are kept out of every message this module makes,
every exception it raises (including their causes) and every log line of the HTTP libraries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any, ClassVar, NoReturn, Self, TypeVar
from urllib.parse import quote, quote_plus
from zoneinfo import ZoneInfo

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient

from worker.domain.vocabulary import ErrorCode, Status, parse_status, validate_order_code

__all__ = [
    "CARRIER_TIMEZONE",
    "DEFAULT_TIMEOUT",
    "ERROR_CLASSES",
    "MAX_BODY_BYTES",
    "TRACKING_PATH",
    "ApiKeyLimit",
    "ApiKeyNotFound",
    "CarrierClient",
    "CarrierError",
    "CarrierErrorCode",
    "CarrierHTTPStatusError",
    "CarrierInternalError",
    "CarrierTimeout",
    "CarrierTransportError",
    "MalformedResponse",
    "MissingApiKey",
    "MissingOrderCode",
    "OrderCodeFormatError",
    "OrderCodeNotFound",
    "OrderCodeNotInAccount",
    "OrderCodeQueryExpired",
    "OrderCodeTooLong",
    "OrderCodeTooShort",
    "PriceItem",
    "StatusEntry",
    "TrackingEntry",
    "TrackingResult",
    "UnknownCarrierErrorCode",
    "ascii_integer",
    "carrier_error",
    "parse_tracking",
]

TRACKING_PATH = "/api/Order/v1/Tracking"
# Times the carrier sends without an offset are wall-clock times in Vietnam.
CARRIER_TIMEZONE = ZoneInfo("Asia/Ho_Chi_Minh")
DEFAULT_TIMEOUT = httpx.Timeout(15, connect=5)
# A real answer is a few KB; anything past this (decompressed, so a gzip bomb too) is refused.
MAX_BODY_BYTES = 2 * 1024 * 1024

_T = TypeVar("_T")


# --- Errors ---------------------------------------------------------------------------------


class CarrierError(Exception):
    """A tracking call for `order_code` did not produce a tracking result."""

    _retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, order_code: str) -> None:
        super().__init__(message)
        self.message = message
        self.order_code = order_code

    @property
    def retryable(self) -> bool:
        """Whether polling this shipment again later may succeed (each retry costs quota)."""
        return self._retryable

    def __str__(self) -> str:
        return f"order {self.order_code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(order_code={self.order_code!r}, message={self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments defeat Exception's default pickling, and these
        # errors may cross process boundaries (Celery results, multiprocessing).
        return (_rebuild_error, (type(self), self.__dict__.copy()))


def _rebuild_error(cls: type[CarrierError], state: dict[str, Any]) -> CarrierError:
    error = cls.__new__(cls)
    Exception.__init__(error, state["message"])
    error.__dict__.update(state)
    return error


class CarrierTransportError(CarrierError):
    """The carrier could not be reached, or the connection broke before a full answer."""

    _retryable = True


class CarrierTimeout(CarrierTransportError):
    """The carrier did not answer in time."""


class CarrierHTTPStatusError(CarrierError):
    """The carrier answered with an HTTP status other than 2xx and no carrier error code."""

    # Request timeout and rate limiting by a proxy in front of the carrier are transient too.
    _TRANSIENT_4XX: ClassVar[frozenset[int]] = frozenset({408, 429})

    def __init__(self, message: str, *, order_code: str, status_code: int) -> None:
        super().__init__(message, order_code=order_code)
        self.status_code = status_code

    @property
    def retryable(self) -> bool:
        return self.status_code >= 500 or self.status_code in self._TRANSIENT_4XX


class MalformedResponse(CarrierError):
    """The carrier's answer is not a tracking response (HTML, truncated JSON, wrong types)."""

    _retryable = True


class CarrierErrorCode(CarrierError):
    """The carrier answered with an `errorCode`; one subclass per known code."""

    code: ClassVar[ErrorCode | None] = None

    def __init__(
        self, message: str, *, order_code: str, code_raw: str, carrier_message: str | None
    ) -> None:
        super().__init__(message, order_code=order_code)
        self.code_raw = code_raw
        self.carrier_message = carrier_message


class MissingApiKey(CarrierErrorCode):
    code = ErrorCode.MISSING_APIKEY


class MissingOrderCode(CarrierErrorCode):
    code = ErrorCode.MISSING_ORDERCODE


class OrderCodeTooShort(CarrierErrorCode):
    code = ErrorCode.ORDERCODE_MIN_LENGTH


class OrderCodeTooLong(CarrierErrorCode):
    code = ErrorCode.ORDERCODE_MAX_LENGTH


class OrderCodeNotFound(CarrierErrorCode):
    code = ErrorCode.ORDERCODE_NOT_FOUND


class OrderCodeNotInAccount(CarrierErrorCode):
    code = ErrorCode.ORDERCODE_DOES_NOT_BELONG_TO_YOUR_ACCOUNT


class ApiKeyNotFound(CarrierErrorCode):
    code = ErrorCode.APIKEY_NOT_FOUND


class ApiKeyLimit(CarrierErrorCode):
    code = ErrorCode.APIKEY_LIMIT


class CarrierInternalError(CarrierErrorCode):
    """The carrier's `EXCEPTION`: an unknown error on its side, usually passing."""

    code = ErrorCode.EXCEPTION
    _retryable = True


class OrderCodeFormatError(CarrierErrorCode):
    code = ErrorCode.ORDERCODE_FORMAT_EXCEPTION


class OrderCodeQueryExpired(CarrierErrorCode):
    code = ErrorCode.ORDERCODE_QUERY_EXPIRED


class UnknownCarrierErrorCode(CarrierErrorCode):
    """An error code this version does not know; treated like the carrier's `EXCEPTION`."""

    _retryable = True


ERROR_CLASSES: Mapping[ErrorCode, type[CarrierErrorCode]] = {
    cls.code: cls
    for cls in (
        MissingApiKey,
        MissingOrderCode,
        OrderCodeTooShort,
        OrderCodeTooLong,
        OrderCodeNotFound,
        OrderCodeNotInAccount,
        ApiKeyNotFound,
        ApiKeyLimit,
        CarrierInternalError,
        OrderCodeFormatError,
        OrderCodeQueryExpired,
    )
    if cls.code is not None
}


def carrier_error(
    code_raw: str, carrier_message: str | None, *, order_code: str
) -> CarrierErrorCode:
    """The exception for a carrier error code, known or not."""
    code_raw = code_raw.strip()
    try:
        cls: type[CarrierErrorCode] = ERROR_CLASSES[ErrorCode(code_raw.upper())]
    except ValueError:
        cls = UnknownCarrierErrorCode
    text = carrier_message or (cls.code.message if cls.code else "no message")
    return cls(
        f"carrier answered {code_raw}: {text}",
        order_code=order_code,
        code_raw=code_raw,
        carrier_message=carrier_message,
    )


# --- The tracking result --------------------------------------------------------------------


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


# --- Parsing --------------------------------------------------------------------------------


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
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        # UnicodeDecodeError and JSONDecodeError are both ValueErrors.
        raise MalformedResponse(
            f"response was not valid JSON ({len(body)} bytes; truncated?)", order_code=order_code
        ) from error
    if not isinstance(payload, dict):
        malformed(f"response was a JSON {type(payload).__name__}, not an object")
    try:
        cleaned: dict[str, Any] = _cleaned(payload, nul=b"\\u0000" in body)
    except ValueError as error:
        raise MalformedResponse(f"response refused: {error}", order_code=order_code) from None
    return cleaned


# Deeper than any real answer (which nests three levels); PostgreSQL's JSONB and json.dumps
# have limits of their own that a hostile answer would reach first.
_MAX_DEPTH = 32


def _cleaned(value: Any, *, nul: bool, depth: int = 0) -> Any:
    """`value` with NUL characters removed (PostgreSQL refuses them in text and JSONB),
    refused if nested deeper than _MAX_DEPTH or holding a non-finite number (not JSON)."""
    if isinstance(value, str):
        return value.replace("\x00", "") if nul else value
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("a number too large for JSON")
    if isinstance(value, dict | list):
        if depth >= _MAX_DEPTH:
            raise ValueError(f"JSON nested deeper than {_MAX_DEPTH} levels")
        if isinstance(value, list):
            return [_cleaned(item, nul=nul, depth=depth + 1) for item in value]
        return {
            _cleaned(key, nul=nul): _cleaned(item, nul=nul, depth=depth + 1)
            for key, item in value.items()
        }
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


# --- Keeping API keys out of messages and logs ----------------------------------------------

_REDACTED = "[redacted]"
_APIKEY_PARAM = re.compile(r"(apikey=)[^&\s'\"#]*", re.IGNORECASE)
# The HTTP libraries log full request URLs (httpx at INFO) and describe responses, connections
# and exceptions with them; records made by these loggers are redacted before any handler.
_LOGGERS_SEEING_URLS = (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.proxy",
    "aiohttp.client",
    "aiohttp.internal",
    "asyncio",
    "py.warnings",
)


def _redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    return _APIKEY_PARAM.sub(rf"\1{_REDACTED}", text)


def _secret_forms(api_key: str) -> tuple[str, ...]:
    """The key as written and as it may appear percent-encoded in a URL, longest first."""
    forms = {api_key, quote(api_key, safe=""), quote_plus(api_key, safe="")}
    return tuple(sorted(forms, key=len, reverse=True))


class _RedactApiKeys(logging.Filter):
    """Replaces `apikey=` query values in a record's message, traceback and stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            if _APIKEY_PARAM.search(message):
                record.msg, record.args = _redact(message), None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = _redact(record.exc_text)
            if record.stack_info:
                record.stack_info = _redact(record.stack_info)
        except Exception:  # noqa: S110 - a broken record is the logging system's to report
            pass
        return True


_LOG_FILTER = _RedactApiKeys()


def _redact_http_logs() -> None:
    """Installs the redacting filter once on every logger that may see a carrier URL."""
    for name in _LOGGERS_SEEING_URLS:
        logger = logging.getLogger(name)
        if _LOG_FILTER not in logger.filters:
            logger.addFilter(_LOG_FILTER)


def _scrubbed(error: BaseException, secrets: tuple[str, ...]) -> BaseException | None:
    """`error` with the key removed from its message and its causes', or None if it cannot be.

    aiohttp and httpx put the request URL, key included, into some exception messages; a
    traceback logged later would print them. A cause whose text cannot be cleaned is cut off.
    """
    if not _scrub(error, secrets):
        return None
    current, seen = error, {id(error)}
    while True:
        cause = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        if cause is None or id(cause) in seen:
            return error
        seen.add(id(cause))
        if not _scrub(cause, secrets):
            current.__cause__ = current.__context__ = None
            current.__suppress_context__ = True
            return error
        current = cause


def _scrub(error: BaseException, secrets: tuple[str, ...]) -> bool:
    """Redacts the key in `error`'s arguments; whether its text is now free of the key."""
    try:
        error.args = tuple(_redact(a, secrets) if isinstance(a, str) else a for a in error.args)
        text = f"{error}{error!r}"
    except Exception:
        return False
    return not any(secret in text for secret in secrets)


# --- The client -----------------------------------------------------------------------------


class CarrierClient:
    """Tracks orders over one pooled keep-alive connection pool, bound to one event loop.

    Use `async with CarrierClient(base_url) as carrier: await carrier.track(code, key)`; make
    one client per event loop (aiohttp's pool cannot move between loops).
    """

    # Polls arrive in batches; a pooled connection should outlive the gap between two.
    _KEEPALIVE_SECONDS = 30.0

    def __init__(
        self,
        base_url: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport` replaces the aiohttp transport (tests, or benchmarks comparing them)."""
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.max_connections = max_connections
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        parts = (self.timeout.pool, self.timeout.connect, self.timeout.write, self.timeout.read)
        # aiohttp restarts its read timer with every chunk, so a server trickling bytes could
        # hold a poll forever; the sum of the phases bounds the whole attempt.
        self._deadline = None if None in parts else sum(p for p in parts if p is not None)
        _redact_http_logs()

    def __repr__(self) -> str:
        return f"CarrierClient(base_url={self.base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the pooled connections."""
        if self._http is not None:
            await self._http.aclose()

    @property
    def transport_name(self) -> str:
        """The HTTP transport in use, for benchmarks and diagnostics."""
        return type(self._transport).__name__ if self._transport else AiohttpTransport.__name__

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None:
            self._loop = loop
            self._http = HttpxAiohttpClient(
                base_url=self.base_url,
                timeout=self.timeout,
                transport=self._transport or AiohttpTransport(client=self._session),
                headers={"Accept": "application/json", "User-Agent": "shipmon"},
            )
        elif loop is not self._loop:
            raise RuntimeError(
                "this CarrierClient belongs to another event loop; make one per loop"
            )
        return self._http

    def _session(self) -> aiohttp.ClientSession:
        """The aiohttp session behind the transport, made on first use inside the loop."""
        connector = aiohttp.TCPConnector(
            limit=self.max_connections,
            keepalive_timeout=self._KEEPALIVE_SECONDS,
            ssl=httpx.create_ssl_context(),
        )
        session = aiohttp.ClientSession(connector=connector)
        # aiohttp silently sends a GET a second time when the connection drops before the
        # answer; each attempt costs quota, so retrying stays the caller's decision. The
        # attribute is private (aiohttp >= 3.11); tests fail if it stops doing this.
        session._retry_connection = False
        return session

    async def track(self, order_code: str, api_key: str) -> TrackingResult:
        """The carrier's tracking of `order_code`, in one HTTP attempt; raises CarrierError."""
        refused = ErrorCode.MISSING_APIKEY if not api_key else validate_order_code(order_code)
        if refused is not None:
            # The carrier would refuse it too, and the attempt would still cost quota.
            raise ERROR_CLASSES[refused](
                f"{refused.value}: {refused.message} (not sent to the carrier)",
                order_code=order_code,
                code_raw=refused.value,
                carrier_message=None,
            )
        http = self._client()
        secrets = _secret_forms(api_key)
        params = {"ordercode": order_code, "apikey": api_key}
        try:
            async with (
                asyncio.timeout(self._deadline),
                http.stream("GET", TRACKING_PATH, params=params) as response,
            ):
                body = await _read_body(response, order_code)
        except (httpx.RequestError, aiohttp.ClientError, TimeoutError) as error:
            failure = _transport_failure(error, order_code, secrets, self._deadline)
            raise failure from _scrubbed(error, secrets)
        try:
            if response.is_success:
                return parse_tracking(body, order_code)
            raise _status_failure(response, body, order_code)
        except CarrierErrorCode as error:
            # The carrier's errorMessage is its own text; an echo of the key must not travel on.
            if error.carrier_message is not None:
                error.carrier_message = _redact(error.carrier_message, secrets)
            error.message = _redact(error.message, secrets)
            error.args = (error.message,)
            raise


async def _read_body(response: httpx.Response, order_code: str) -> bytes:
    """The decoded body, read no further than MAX_BODY_BYTES; past that, MalformedResponse."""
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise MalformedResponse(
                f"response body is over {MAX_BODY_BYTES} bytes once decompressed "
                "(a tracking answer is a few KB); not read further",
                order_code=order_code,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _status_failure(response: httpx.Response, body: bytes, order_code: str) -> CarrierError:
    """The error for a non-2xx answer: the carrier's own error code if the body has one."""
    try:
        parse_tracking(body, order_code)
    except CarrierErrorCode as error:
        return error
    except CarrierError:
        pass
    reason = f" {response.reason_phrase}" if response.reason_phrase else ""
    return CarrierHTTPStatusError(
        f"HTTP {response.status_code}{reason} from carrier",
        order_code=order_code,
        status_code=response.status_code,
    )


def _transport_failure(
    error: BaseException, order_code: str, secrets: tuple[str, ...], deadline: float | None
) -> CarrierError:
    """Our error for an exception raised while sending or receiving, described for ops."""
    # httpx-aiohttp maps aiohttp's errors coarsely (a dropped connection becomes ConnectTimeout),
    # so the aiohttp cause, when there is one, decides.
    cause = error.__cause__ if isinstance(error.__cause__, aiohttp.ClientError) else error
    detail = _redact(f"{type(cause).__name__}: {cause}", secrets)
    if isinstance(cause, httpx.DecodingError):
        return MalformedResponse(
            f"response body could not be decoded ({detail})", order_code=order_code
        )
    if type(cause) is TimeoutError:
        return CarrierTimeout(f"no complete answer within {deadline:g} s", order_code=order_code)
    if isinstance(cause, aiohttp.ConnectionTimeoutError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return CarrierTimeout(
            f"timed out connecting to the carrier ({detail})", order_code=order_code
        )
    if isinstance(cause, TimeoutError | httpx.TimeoutException):
        return CarrierTimeout(
            f"timed out waiting for the carrier ({detail})", order_code=order_code
        )
    if isinstance(cause, aiohttp.ClientConnectorError | httpx.ConnectError):
        what = "could not connect to the carrier"
    elif isinstance(cause, aiohttp.ServerDisconnectedError | httpx.RemoteProtocolError):
        what = "the carrier closed the connection before answering"
    elif isinstance(cause, aiohttp.ClientPayloadError | httpx.ReadError):
        what = "the response body was cut off"
    elif isinstance(cause, aiohttp.ClientResponseError):
        what = "the carrier sent an invalid HTTP response"
    else:
        what = "the connection to the carrier failed"
    return CarrierTransportError(f"{what} ({detail})", order_code=order_code)
