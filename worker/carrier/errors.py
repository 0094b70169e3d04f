"""What a tracking call can end in besides a tracking result: one exception per way to fail.

Every error names its order and says whether polling again later may help (`retryable`); the
poller decides what to do with it, because every retry costs quota.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from worker.domain.vocabulary import ErrorCode

__all__ = [
    "ERROR_CLASSES",
    "ApiKeyLimit",
    "ApiKeyNotFound",
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
    "UnknownCarrierErrorCode",
    "carrier_error",
]


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
    """The call carried no API key."""

    code = ErrorCode.MISSING_APIKEY


class MissingOrderCode(CarrierErrorCode):
    """The call carried no order code."""

    code = ErrorCode.MISSING_ORDERCODE


class OrderCodeTooShort(CarrierErrorCode):
    """The order code is shorter than the carrier's 5 characters."""

    code = ErrorCode.ORDERCODE_MIN_LENGTH


class OrderCodeTooLong(CarrierErrorCode):
    """The order code is longer than the carrier's 20 characters."""

    code = ErrorCode.ORDERCODE_MAX_LENGTH


class OrderCodeNotFound(CarrierErrorCode):
    """The carrier knows no order with this code."""

    code = ErrorCode.ORDERCODE_NOT_FOUND


class OrderCodeNotInAccount(CarrierErrorCode):
    """The order exists but belongs to another carrier account."""

    code = ErrorCode.ORDERCODE_DOES_NOT_BELONG_TO_YOUR_ACCOUNT


class ApiKeyNotFound(CarrierErrorCode):
    """The carrier knows no such API key."""

    code = ErrorCode.APIKEY_NOT_FOUND


class ApiKeyLimit(CarrierErrorCode):
    """The API key has used its lookups for the carrier day."""

    code = ErrorCode.APIKEY_LIMIT


class CarrierInternalError(CarrierErrorCode):
    """The carrier's `EXCEPTION`: an unknown error on its side, usually passing."""

    code = ErrorCode.EXCEPTION
    _retryable = True


class OrderCodeFormatError(CarrierErrorCode):
    """The order code holds characters other than letters, digits, `_`, `-`."""

    code = ErrorCode.ORDERCODE_FORMAT_EXCEPTION


class OrderCodeQueryExpired(CarrierErrorCode):
    """The carrier no longer answers for this order: its lookup period is over."""

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
