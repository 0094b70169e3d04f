"""The carrier's vocabulary: statuses, delay reasons, error codes and order-code rules.

Everything else in shipmon speaks in these types; the carrier's raw words (statusName,
delayCode, errorCode) are turned into them at the boundary and nowhere else.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Status(StrEnum):
    """A shipment's status, by its English name, with the carrier's ID and Vietnamese code."""

    ACCEPTED = "ACCEPTED"
    PICKED_UP = "PICKED_UP"
    IN_TRANSIT = "IN_TRANSIT"
    DELIVERING = "DELIVERING"
    PENDING_FOR_PROCEED = "PENDING_FOR_PROCEED"
    PENDING_FOR_RETURN = "PENDING_FOR_RETURN"
    DELIVERED = "DELIVERED"
    RETURNED = "RETURNED"
    LOST = "LOST"
    CANCEL = "CANCEL"
    CONFISCATED = "CONFISCATED"

    @property
    def carrier_id(self) -> int:
        return _CARRIER_IDS[self]

    @property
    def code(self) -> str:
        """The carrier's Vietnamese status code, e.g. DANGDIPHAT."""
        return _CODES[self]

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


_CARRIER_IDS: dict[Status, int] = {
    Status.ACCEPTED: 21,
    Status.PICKED_UP: 23,
    Status.IN_TRANSIT: 24,
    Status.DELIVERING: 25,
    Status.PENDING_FOR_PROCEED: 16,
    Status.PENDING_FOR_RETURN: 27,
    Status.DELIVERED: 30,
    Status.RETURNED: 28,
    Status.LOST: 19,
    Status.CANCEL: 18,
    Status.CONFISCATED: 32,
}

_CODES: dict[Status, str] = {
    Status.ACCEPTED: "DATIEPNHAN",
    Status.PICKED_UP: "DALAYHANG",
    Status.IN_TRANSIT: "DANGVANCHUYEN",
    Status.DELIVERING: "DANGDIPHAT",
    Status.PENDING_FOR_PROCEED: "CHOXULY",
    Status.PENDING_FOR_RETURN: "CHOCHUYENHOAN",
    Status.DELIVERED: "PHATTHANHCONG",
    Status.RETURNED: "DACHUYENHOAN",
    Status.LOST: "THATLAC",
    Status.CANCEL: "HUY",
    Status.CONFISCATED: "TICHTHU",
}

TERMINAL_STATUSES = frozenset(
    {Status.DELIVERED, Status.RETURNED, Status.LOST, Status.CANCEL, Status.CONFISCATED}
)

# Every spelling the carrier has been seen to use, mapped to one status.
_LOOKUP: dict[str, Status] = {
    **{s.value: s for s in Status},
    **{code: s for s, code in _CODES.items()},
    **{str(i): s for s, i in _CARRIER_IDS.items()},
    "HOANTAT": Status.DELIVERED,  # legacy code for a successful delivery
}


def parse_status(value: object) -> Status | None:
    """The status for a carrier ID (string or int), Vietnamese code or English name, else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        return None
    return _LOOKUP.get(value.strip().upper())


DELAY_REASONS: dict[int, str] = {
    1: "Wrong address.",
    2: "The recipient is not at the address, the recipient's house is closed.",
    3: "Addresses on envelopes and delivery slips are different. Mean when the dispatcher "
    "mistakenly pasted the delivery information slip on the package.",
    4: "Address not found.",
    5: "Wrong route delivered in logistics.",
    6: "The recipient changes another address.",
    7: "The recipient does not know this information. Mean recipient does not receive "
    "notification of delivery information.",
    8: "The recipient doesn't want to receive",
    9: "The recipient has no free time to receive.",
    10: "The recipient is requested to delivery at another time.",
    11: "Locked recipient's phone/subscriber, unable to contact the recipient.",
    12: "The recipient does not answer the phone, unable to contact the recipient.",
    13: "The recipient is not at home/at work.",
    14: "No recipient at delivery address.",
    15: "The recipient is notified to go to the post office to pick up the goods.",
    16: "The receiver requested to inspect the goods, but the package is of a type that is not "
    "allowed to check the goods.",
    19: "The recipient has no money.",
    21: "The recipient do not work on Saturdays.",
    22: "Recipients do not work holidays.",
    24: "Bad weather: Heavy rain/Flood/Storm/Flood/Natural disaster.",
    26: "The sender requested no delivery and return.",
    30: "The contents of the parcel were damaged during delivery.",
    31: "Part of the parcel is missing during delivery.",
    33: "Lost parcel during delivery.",
    35: "Incorrect recipient's phone number or incorrect phone number.",
    40: "Another reason.",
    41: "The order requires the recipient to present ID card to receive, but the ID card is not "
    "valid(ID card/ID card lost/damaged).",
    43: "When the sender requests to hand-deliver to the recipient, but when contacting again, "
    "the recipient requests to deliver to someone else.",
    46: "Wrong order information.",
    52: "Customer changes delivery address",
    53: "The customer requests to cancel the order",
}


def delay_reason(code: int | None) -> str | None:
    """The English text of a delay code; unknown codes get a text that says so."""
    if code is None:
        return None
    return DELAY_REASONS.get(code, f"Unknown delay reason {code}.")


class ErrorCode(StrEnum):
    """The carrier's error codes (seed list plus ORDERCODE_QUERY_EXPIRED)."""

    MISSING_APIKEY = "MISSING_APIKEY"
    MISSING_ORDERCODE = "MISSING_ORDERCODE"
    ORDERCODE_MIN_LENGTH = "ORDERCODE_MIN_LENGTH"
    ORDERCODE_MAX_LENGTH = "ORDERCODE_MAX_LENGTH"
    ORDERCODE_NOT_FOUND = "ORDERCODE_NOT_FOUND"
    ORDERCODE_DOES_NOT_BELONG_TO_YOUR_ACCOUNT = "ORDERCODE_DOES_NOT_BELONG_TO_YOUR_ACCOUNT"
    APIKEY_NOT_FOUND = "APIKEY_NOT_FOUND"
    APIKEY_LIMIT = "APIKEY_LIMIT"
    EXCEPTION = "EXCEPTION"
    ORDERCODE_FORMAT_EXCEPTION = "ORDERCODE_FORMAT_EXCEPTION"
    ORDERCODE_QUERY_EXPIRED = "ORDERCODE_QUERY_EXPIRED"

    @property
    def message(self) -> str:
        return ERROR_MESSAGES[self]


ERROR_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.MISSING_APIKEY: "Missing Apikey",
    ErrorCode.MISSING_ORDERCODE: "Missing Ordercode",
    ErrorCode.ORDERCODE_MIN_LENGTH: "OrderCode less than 5 characters",
    ErrorCode.ORDERCODE_MAX_LENGTH: "The maximum number of OrderCode is 20 characters",
    ErrorCode.ORDERCODE_NOT_FOUND: "OrderCode is not found",
    ErrorCode.ORDERCODE_DOES_NOT_BELONG_TO_YOUR_ACCOUNT: (
        "Ordercode does not belong to your account"
    ),
    ErrorCode.APIKEY_NOT_FOUND: "Apikey is not found",
    ErrorCode.APIKEY_LIMIT: "Look up more than 200,000 times/day",
    ErrorCode.EXCEPTION: "Unknown error, please contact 247",
    ErrorCode.ORDERCODE_FORMAT_EXCEPTION: "The ordercode contain special characters (except _-)",
    ErrorCode.ORDERCODE_QUERY_EXPIRED: "The tracking lookup period is over",
}

ORDER_CODE_MIN_LENGTH = 5
ORDER_CODE_MAX_LENGTH = 20
# ASCII only: \w would admit Vietnamese letters, which the carrier refuses.
ORDER_CODE_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
# The same rule as a PostgreSQL regular expression, for the shipments table's CHECK constraint.
ORDER_CODE_SQL_PATTERN = "^[A-Za-z0-9_-]{5,20}$"


def validate_order_code(code: object) -> ErrorCode | None:
    """The carrier-style error code that refuses this order code, or None if it is valid."""
    if code is None or code == "":
        return ErrorCode.MISSING_ORDERCODE
    if not isinstance(code, str):
        # Codes reach intake as JSON through the Celery task: a number or a list is no code.
        return ErrorCode.ORDERCODE_FORMAT_EXCEPTION
    if len(code) < ORDER_CODE_MIN_LENGTH:
        return ErrorCode.ORDERCODE_MIN_LENGTH
    if len(code) > ORDER_CODE_MAX_LENGTH:
        return ErrorCode.ORDERCODE_MAX_LENGTH
    if not ORDER_CODE_PATTERN.fullmatch(code):
        return ErrorCode.ORDERCODE_FORMAT_EXCEPTION
    return None


class EventType(StrEnum):
    """The webhook and email event types of the external contract."""

    STATUS_CHANGED = "shipment.status_changed"
    DELAYED = "shipment.delayed"
    TRACKING_EVENT = "shipment.tracking_event"
    NOT_FOUND = "shipment.not_found"
    STALLED = "shipment.stalled"
    POLLING_STOPPED = "shipment.polling_stopped"
