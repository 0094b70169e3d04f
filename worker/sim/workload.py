"""The carrier's world: workload files and the order lifecycles drawn from them.

A workload file (SPEC §4) describes a population of shipments. `Carrier` turns it into orders
whose whole timeline (registration, every status with its dwell time, delay codes and scans) is
drawn from a seeded random generator when the order is created, and answers tracking lookups
exactly as the 247Express API would at any given time. Nothing here does I/O or reads a clock:
every call takes the time it is asked about, so the sandbox serves it over HTTP in real time and
benchmarks run it in-process in simulated time.

Decisions the workload format leaves open, made here:
- Registration: without a given status, an order is unknown to the carrier
  (ORDERCODE_NOT_FOUND) until `unknown_hours` after it is added; then it enters `initial`.
  A `never_found` share is never registered.
- A transition is due `dwell_hours` after its status was entered; if that falls outside the
  status's `active_hours` (local hours, [start, end)) it happens at the next window's opening.
  `active_days` (ISO weekdays, 1 Monday to 7 Sunday; default every day) narrows the windows to
  those days: a transition due on another day waits for the window of the next active day.
- Delay codes: entering a status whose rule has `delay_codes` draws one (the probabilities may
  sum to less than 1: the rest means no code). Entering DELIVERING or DELIVERED clears the code,
  because a new delivery attempt (or success) makes the old reason stale; any other status keeps
  it, so a return (PENDING_FOR_RETURN, RETURNED) still says why the delivery failed.
- Scans (`trackings[]` rows): one at every status change, plus a Poisson process at
  `scans_per_day` while in a status, thinned to the status's active hours (the rate per active
  hour is raised so the daily count stays `scans_per_day`); none on a day not in `active_days`.
- Time formats, as the real API mixes them: `statuses[].time`, `acceptDate` and `deliveryDate`
  are ISO-8601 with 7 fractional digits and the local offset (`2019-08-07T11:24:12.4946223+07:00`);
  `trackings[].dateChange` and `estimateRoutes` are `yyyy-MM-dd HH:mm:ss` local time.
- Field types: `status` and `statuses[].status` are status IDs as strings ("25");
  `trackings[].statusID` is an integer; `delayCode` is a string ("12") or null;
  `trackings[].statusName` is the Vietnamese label, `statuses[].statusName` the Vietnamese code.
- A lookup for an order terminal for more than `query_expiry_days` answers
  ORDERCODE_QUERY_EXPIRED.
- Status pushes (SPEC §8): once `watch` is called, `changes` hands out every status an order
  enters from then on, when the clock passes it, as the body the carrier pushes. The first
  status of an order is pushed too ("Change order status:  ==> CHOLAYHANG"), since a push for
  an order the merchant does not track yet is how it learns of it. `DeliveryDate` is local
  `yyyy-MM-dd HH:mm:ss` (the push's own format, unlike the lookup's), `Mailman` names the
  postman once the order is out for delivery, and a transition redrawn by `advance` before it
  happened is never pushed.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import json
import math
import random
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker.domain.vocabulary import ErrorCode, Status, parse_status, validate_order_code

JSONDict = dict[str, Any]

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
_SUM_TOLERANCE = 1e-3


class WorkloadError(ValueError):
    """A workload file that cannot be used, with the reason."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Lognormal(_Model):
    """A lognormal distribution by its median and sigma (of the underlying normal)."""

    median: float = Field(gt=0)
    sigma: float = Field(ge=0)

    def draw(self, rng: random.Random) -> float:
        """One value: exp(ln median + sigma * N(0, 1))."""
        return self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0))


class Hours(_Model):
    """A duration in hours, as the workload writes it: `{"lognormal": {...}}`."""

    lognormal: Lognormal


class StatusRule(_Model):
    """How an order behaves while in one status."""

    dwell_hours: Hours
    active_hours: tuple[int, int] = (0, 24)
    active_days: frozenset[Annotated[int, Field(ge=1, le=7)]] = Field(
        default=frozenset(range(1, 8)), min_length=1
    )
    next: dict[Status, Probability]
    delay_codes: dict[Annotated[int, Field(gt=0)], Probability] = Field(default_factory=dict)
    scans_per_day: float = Field(default=0.0, ge=0.0)

    @field_validator("active_hours")
    @classmethod
    def _window(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if not 0 <= start < end <= 24:
            raise ValueError("active_hours must be [start, end) with 0 <= start < end <= 24")
        return value

    @field_validator("next")
    @classmethod
    def _next_sums_to_one(cls, value: dict[Status, float]) -> dict[Status, float]:
        if abs(sum(value.values()) - 1.0) > _SUM_TOLERANCE:
            raise ValueError(f"next probabilities must sum to 1, not {sum(value.values()):g}")
        return value

    @field_validator("delay_codes")
    @classmethod
    def _delays_at_most_one(cls, value: dict[int, float]) -> dict[int, float]:
        if sum(value.values()) > 1.0 + _SUM_TOLERANCE:
            raise ValueError("delay_codes probabilities must sum to at most 1")
        return value


class Registration(_Model):
    """When the carrier starts to know an order."""

    unknown_hours: Hours
    never_found: Probability = 0.0


# Statuses an order can be in without the carrier having picked it up.
_BEFORE_PICKUP = frozenset({Status.ACCEPTED, Status.CANCEL})
# The statuses in which the carrier's push names the postman who has the parcel.
_OUT_FOR_DELIVERY = frozenset({Status.DELIVERING, Status.DELIVERED})


class Faults(_Model):
    """Transport faults the sandbox injects, each a probability per request.

    `carrier_exception` answers the carrier's EXCEPTION error; `hang_seconds` is how long a
    `timeout` fault holds the connection before dropping it; `slow_ms` is [p50, p99] latency;
    `hostile` answers a hostile body (NUL bytes, over-long text, huge numbers, Unicode digits,
    deep nesting, 50 MB and gzip-bomb bodies, wrong types, duplicated keys).
    """

    http_500: Probability = 0.0
    timeout: Probability = 0.0
    malformed: Probability = 0.0
    carrier_exception: Probability = 0.0
    hostile: Probability = 0.0
    slow_ms: tuple[float, float] | None = None
    hang_seconds: float = Field(default=60.0, gt=0)

    @field_validator("slow_ms")
    @classmethod
    def _latency(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError("slow_ms must be [p50, p99] with 0 <= p50 <= p99")
        return value

    @model_validator(mode="after")
    def _at_most_one(self) -> Faults:
        chances = (self.http_500, self.timeout, self.malformed, self.carrier_exception)
        if sum(chances) + self.hostile > 1.0:
            raise ValueError("fault probabilities must sum to at most 1")
        return self


class AccountShare(_Model):
    """A merchant account of the population and its share of the orders."""

    name: str = Field(min_length=1)
    share: float = Field(gt=0)


class Workload(_Model):
    """A population of shipments (SPEC §4)."""

    name: str
    timezone: str = "Asia/Ho_Chi_Minh"
    orders_per_day: int = Field(ge=0)
    days: int = Field(ge=1)
    accounts: list[AccountShare] = Field(min_length=1)
    initial: Status
    registration: Registration
    statuses: dict[Status, StatusRule]
    faults: Faults = Field(default_factory=Faults)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _lifecycles_end(self) -> Workload:
        if self.initial not in self.statuses:
            raise ValueError(f"initial status {self.initial} has no rule in statuses")
        for status, rule in self.statuses.items():
            if status.terminal:
                raise ValueError(f"{status} is terminal: it cannot have a rule")
            for target in rule.next:
                if not target.terminal and target not in self.statuses:
                    raise ValueError(f"{status} leads to {target}, which has no rule")
        # Every status must be able to reach a terminal one, or its orders would never end.
        ending = {s for s, rule in self.statuses.items() if any(t.terminal for t in rule.next)}
        grew = True
        while grew:
            grew = False
            for status, rule in self.statuses.items():
                if status not in ending and any(
                    target in ending for target, chance in rule.next.items() if chance > 0
                ):
                    ending.add(status)
                    grew = True
        stuck = sorted(set(self.statuses) - ending)
        if stuck:
            raise ValueError(f"no terminal status can be reached from {', '.join(stuck)}")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


def parse_workload(data: Mapping[str, Any], source: str = "workload") -> Workload:
    """A workload from its JSON object; WorkloadError says what is wrong and where."""
    try:
        return Workload.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise WorkloadError(f"{source} is not a valid workload: {problems}") from exc


def load_workload(path: Path | str) -> Workload:
    """Read and check a workload file (SPEC §4)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkloadError(f"cannot read workload {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise WorkloadError(f"{path} must hold a JSON object")
    return parse_workload(data, str(path))


# The shape of the reference workload (workloads/vn-ecommerce.json), so the sandbox works
# without any file.
DEFAULT_WORKLOAD: JSONDict = {
    "name": "vn-ecommerce-reference",
    "timezone": "Asia/Ho_Chi_Minh",
    "orders_per_day": 100000,
    "days": 7,
    "accounts": [
        {"name": "shop-a", "share": 0.6},
        {"name": "shop-b", "share": 0.3},
        {"name": "shop-c", "share": 0.1},
    ],
    "initial": "ACCEPTED",
    "registration": {
        "unknown_hours": {"lognormal": {"median": 0.5, "sigma": 1.0}},
        "never_found": 0.005,
    },
    "statuses": {
        "ACCEPTED": {
            "dwell_hours": {"lognormal": {"median": 8, "sigma": 0.7}},
            "active_hours": [7, 19],
            "next": {"PICKED_UP": 0.96, "CANCEL": 0.04},
            "scans_per_day": 0,
        },
        "PICKED_UP": {
            "dwell_hours": {"lognormal": {"median": 4, "sigma": 0.6}},
            "active_hours": [6, 23],
            "next": {"IN_TRANSIT": 1.0},
            "scans_per_day": 1,
        },
        "IN_TRANSIT": {
            "dwell_hours": {"lognormal": {"median": 22, "sigma": 0.6}},
            "active_hours": [0, 24],
            "next": {
                "DELIVERING": 0.993,
                "LOST": 0.004,
                "CONFISCATED": 0.001,
                "PENDING_FOR_RETURN": 0.002,
            },
            "scans_per_day": 3,
        },
        "DELIVERING": {
            "dwell_hours": {"lognormal": {"median": 4, "sigma": 0.5}},
            "active_hours": [8, 20],
            "next": {"DELIVERED": 0.86, "PENDING_FOR_PROCEED": 0.14},
            "scans_per_day": 0.5,
        },
        "PENDING_FOR_PROCEED": {
            "dwell_hours": {"lognormal": {"median": 20, "sigma": 0.5}},
            "active_hours": [8, 18],
            "next": {"DELIVERING": 0.65, "PENDING_FOR_RETURN": 0.35},
            "delay_codes": {
                "2": 0.25,
                "12": 0.2,
                "13": 0.12,
                "10": 0.1,
                "9": 0.08,
                "8": 0.08,
                "1": 0.05,
                "35": 0.05,
                "19": 0.03,
                "40": 0.04,
            },
            "scans_per_day": 0.5,
        },
        "PENDING_FOR_RETURN": {
            "dwell_hours": {"lognormal": {"median": 48, "sigma": 0.5}},
            "active_hours": [6, 22],
            "next": {"RETURNED": 1.0},
            "scans_per_day": 1,
        },
    },
    "faults": {"http_500": 0.005, "timeout": 0.002, "malformed": 0.001, "slow_ms": [80, 900]},
}


def default_workload() -> Workload:
    """The built-in workload, shaped like the reference file."""
    return parse_workload(DEFAULT_WORKLOAD, "the built-in workload")


# --- The carrier's words -------------------------------------------------------------------

TRACKING_NAMES: dict[Status, str] = {
    Status.ACCEPTED: "Đã tiếp nhận",
    Status.PICKED_UP: "Đã lấy hàng",
    Status.IN_TRANSIT: "Đang vận chuyển",
    Status.DELIVERING: "Đang đi phát",
    Status.PENDING_FOR_PROCEED: "Chờ xử lý",
    Status.PENDING_FOR_RETURN: "Chờ chuyển hoàn",
    Status.DELIVERED: "Phát thành công",
    Status.RETURNED: "Đã chuyển hoàn",
    Status.LOST: "Thất lạc",
    Status.CANCEL: "Hủy",
    Status.CONFISCATED: "Tịch thu",
}

# Delivery staff's notes for a failed attempt, by delay code.
_DELAY_NOTES: dict[int, str] = {
    1: "Sai địa chỉ người nhận",
    2: "Người nhận đi vắng, nhà đóng cửa",
    8: "Người nhận không muốn nhận hàng",
    9: "Người nhận bận, hẹn lại",
    10: "Khách hẹn giao lại vào ngày khác",
    12: "Gọi điện không nghe máy",
    13: "Người nhận không có ở nhà/cơ quan",
    19: "Người nhận không đủ tiền thanh toán",
    35: "Sai số điện thoại người nhận",
}
_GENERIC_DELAY_NOTE = "Phát không thành công, chờ phát lại"


@dataclass(frozen=True, slots=True)
class PostOffice:
    """A 247Express post office (or sorting hub) in a province."""

    office_id: str
    name: str
    province_id: int
    province_name: str


def _offices(province_id: int, province: str, short: str, names: list[str]) -> list[PostOffice]:
    hub = PostOffice(f"{short}HUB", f"Trung tâm khai thác {province}", province_id, province)
    return [hub] + [
        PostOffice(f"{short}{n:02d}", f"Bưu cục {name}", province_id, province)
        for n, name in enumerate(names, start=1)
    ]


# Real provinces (with their administrative codes) and districts; the first office is the hub.
_PROVINCES: list[tuple[float, list[PostOffice]]] = [
    (
        30,
        _offices(
            79,
            "Hồ Chí Minh",
            "HCM",
            ["Quận 1", "Quận 3", "Tân Bình", "Gò Vấp", "Bình Thạnh", "Thủ Đức", "Quận 7"],
        ),
    ),
    (
        22,
        _offices(
            1,
            "Hà Nội",
            "HNI",
            ["Cầu Giấy", "Đống Đa", "Hoàn Kiếm", "Hà Đông", "Long Biên", "Thanh Xuân"],
        ),
    ),
    (5, _offices(48, "Đà Nẵng", "DNG", ["Hải Châu", "Thanh Khê", "Sơn Trà"])),
    (5, _offices(31, "Hải Phòng", "HPG", ["Lê Chân", "Ngô Quyền"])),
    (4, _offices(92, "Cần Thơ", "CTO", ["Ninh Kiều", "Cái Răng"])),
    (5, _offices(74, "Bình Dương", "BDG", ["Thủ Dầu Một", "Dĩ An", "Thuận An"])),
    (5, _offices(75, "Đồng Nai", "DNI", ["Biên Hòa", "Long Khánh"])),
    (3, _offices(56, "Khánh Hòa", "KHA", ["Nha Trang", "Cam Ranh"])),
    (3, _offices(40, "Nghệ An", "NAN", ["Vinh", "Cửa Lò"])),
    (2, _offices(46, "Thừa Thiên Huế", "TTH", ["Huế", "Hương Thủy"])),
    (3, _offices(22, "Quảng Ninh", "QNH", ["Hạ Long", "Cẩm Phả"])),
    (2, _offices(68, "Lâm Đồng", "LDG", ["Đà Lạt", "Bảo Lộc"])),
    (3, _offices(38, "Thanh Hóa", "THA", ["Thanh Hóa", "Sầm Sơn"])),
    (3, _offices(27, "Bắc Ninh", "BNH", ["Bắc Ninh", "Từ Sơn"])),
    (2, _offices(89, "An Giang", "AGG", ["Long Xuyên", "Châu Đốc"])),
    (2, _offices(66, "Đắk Lắk", "DLK", ["Buôn Ma Thuột"])),
]
_DESTINATION_CUMULATIVE = list(itertools.accumulate(weight for weight, _ in _PROVINCES))
# Merchants ship mostly from the two big cities.
_ORIGIN_CUMULATIVE = list(
    itertools.accumulate([60.0, 35.0] + [5 / (len(_PROVINCES) - 2)] * (len(_PROVINCES) - 2))
)

_SURNAMES = ["Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng", "Bùi"]
_MIDDLE_NAMES = ["Văn", "Thị", "Minh", "Ngọc", "Thanh", "Hoàng", "Đức", "Thu", "Quốc"]
_GIVEN_NAMES = [
    "An", "Bình", "Chi", "Dũng", "Hà", "Hạnh", "Hùng", "Lan", "Linh", "Mai",
    "Nam", "Phương", "Quân", "Thảo", "Trang", "Tuấn", "Vy", "Khoa", "Huy",
]  # fmt: skip
_NAME_PARTS = (_SURNAMES, _MIDDLE_NAMES, _GIVEN_NAMES)
_DELIVERY_NOTES = [
    "Giao thành công cho người nhận",
    "Người nhận đã ký nhận",
    "Giao cho bảo vệ tòa nhà",
    "Giao cho người thân nhận hộ",
]

# Where each status is scanned: at the sender's office, a hub, or the receiver's office.
_ORIGIN, _HUB, _DESTINATION = 0, 1, 2
_SCAN_PLACES: dict[Status, int] = {
    Status.ACCEPTED: _ORIGIN,
    Status.PICKED_UP: _ORIGIN,
    Status.IN_TRANSIT: _HUB,
    Status.DELIVERING: _DESTINATION,
    Status.PENDING_FOR_PROCEED: _DESTINATION,
    Status.PENDING_FOR_RETURN: _HUB,
    Status.DELIVERED: _DESTINATION,
    Status.RETURNED: _ORIGIN,
    Status.LOST: _HUB,
    Status.CANCEL: _ORIGIN,
    Status.CONFISCATED: _HUB,
}
_CHANGE_NOTES: dict[Status, str] = {
    Status.ACCEPTED: "Đơn hàng đã được tiếp nhận",
    Status.PICKED_UP: "Nhân viên đã lấy hàng tại {office}",
    Status.IN_TRANSIT: "Đã rời {office}",
    Status.DELIVERING: "Bưu tá {office} đang đi phát",
    Status.PENDING_FOR_PROCEED: "Phát không thành công: {delay}",
    Status.PENDING_FOR_RETURN: "Chờ chuyển hoàn về người gửi",
    Status.DELIVERED: "Phát thành công",
    Status.RETURNED: "Đã chuyển hoàn cho người gửi",
    Status.LOST: "Bưu gửi thất lạc trong quá trình vận chuyển",
    Status.CANCEL: "Đơn hàng đã bị hủy",
    Status.CONFISCATED: "Bưu gửi bị cơ quan chức năng tạm giữ",
}
_DWELL_NOTES: dict[Status, list[str]] = {
    Status.ACCEPTED: ["Chờ lấy hàng"],
    Status.PICKED_UP: ["Đã nhập kho {office}"],
    Status.IN_TRANSIT: ["Đã đến {office}", "Đang trung chuyển đến {province}", "Đã rời {office}"],
    Status.DELIVERING: ["Bưu tá đã liên hệ người nhận"],
    Status.PENDING_FOR_PROCEED: ["Lưu kho {office} chờ phát lại"],
    Status.PENDING_FOR_RETURN: ["Đang chuyển hoàn qua {office}"],
}


# --- Orders --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    """A status the order entered, at `at` (epoch seconds)."""

    at: float
    status: Status
    delay_code: int | None
    tick: int  # the seventh fractional digit the carrier's clock shows
    row: JSONDict | None = None  # its `statuses[]` row, once formatted


@dataclass(slots=True)
class _Scan:
    """A `trackings[]` row: a scan at a status change or while in a status."""

    at: float
    status: Status
    change: bool
    variant: int
    row: JSONDict | None = None  # its `trackings[]` row, once formatted


@dataclass(slots=True)
class _Profile:
    """What the order's paperwork says; drawn on first lookup."""

    origin: list[PostOffice]
    destination: list[PostOffice]
    origin_office: PostOffice
    destination_office: PostOffice
    receiver: str
    external_code: str
    mailer_type: str
    length: int
    width: int
    height: int
    real_weight: float
    cal_weight: float
    quantity: int
    price: int
    far_region_fee: int
    fuel_fee: int
    delivery_note: str
    images: int


@dataclass(slots=True)
class _Order:
    code: str
    apikey: str
    rng: random.Random
    created_at: float
    entries: list[_Entry] = field(default_factory=list)
    entry_times: list[float] = field(default_factory=list)
    scans: list[_Scan] = field(default_factory=list)
    scan_times: list[float] = field(default_factory=list)
    registered_at: float | None = None
    profile: _Profile | None = None
    version: int = 0
    # The last answer built, for the (version, statuses seen, scans seen) it was built for.
    cached_at: tuple[int, int, int] = (-1, -1, -1)
    cached_body: JSONDict = field(default_factory=dict)
    cached_json: bytes | None = None


@dataclass(frozen=True, slots=True)
class Account:
    """A carrier account: its key and daily lookup quota."""

    name: str
    apikey: str
    daily_quota: int


@dataclass(frozen=True, slots=True)
class Transition:
    """A status an order entered, when, and the delay code it then showed."""

    at: datetime
    status: Status
    delay_code: int | None


@dataclass(frozen=True, slots=True)
class OrderTruth:
    """What the carrier knows about an order at a time, with no faults."""

    order_code: str
    account: str
    created_at: datetime
    registered_at: datetime | None
    status: Status | None
    delay_code: int | None
    history: list[Transition]
    next_transition: Transition | None
    body: JSONDict


@dataclass(frozen=True, slots=True)
class Usage:
    """Lookups counted in one carrier day."""

    day: date
    total: int
    per_key: dict[str, int]


@dataclass(frozen=True, slots=True)
class Change:
    """A status an order entered, as the carrier pushes it: `body` is the push's JSON object."""

    at: datetime
    order_code: str
    status: Status
    body: JSONDict


class UnknownAccountError(LookupError):
    """No account has this API key."""


class UnknownOrderError(LookupError):
    """No order has this code."""


class ConflictError(ValueError):
    """The request clashes with the world's state (a duplicate, or an order that has ended)."""


_BODY_KEYS = (
    "errorMessage", "errorCode", "orderCode", "externalCode", "status", "statusName",
    "trackingName", "delayCode", "delayNote", "deliveryNotes", "deliveryDate", "receiverName",
    "mailerTypeID", "length", "width", "height", "realWeight", "calWeight", "weight", "quantity",
    "price", "priceFR", "farRegionFeeAmount", "fuelFeeAmount", "vatAmount", "totalServiceCost",
    "priceInfo", "statuses", "trackings", "estimateRoutes", "confirmImage", "acceptDate",
)  # fmt: skip


def error_body(code: ErrorCode) -> JSONDict:
    """The carrier's answer for an error: every field null but errorCode and errorMessage."""
    body: JSONDict = dict.fromkeys(_BODY_KEYS)
    body["errorMessage"] = code.message
    body["errorCode"] = code.value
    return body


def _encode(body: JSONDict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


_ERROR_JSON: dict[ErrorCode, bytes] = {code: _encode(error_body(code)) for code in ErrorCode}


def error_json(code: ErrorCode) -> bytes:
    """error_body(code), encoded as the carrier sends it."""
    return _ERROR_JSON[code]


def _epoch(at: datetime) -> float:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"times must be timezone-aware, got {at!r}")
    return at.timestamp()


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _whole_microseconds(ts: float) -> float:
    """`ts` rounded to the microsecond a datetime holds, so times handed out and back compare
    exactly (datetime.fromtimestamp(result).timestamp() == result)."""
    return round(ts * 1_000_000) / 1_000_000


class Carrier:
    """The carrier's world: accounts, orders and their drawn lifecycles, and the lookup quota.

    Deterministic for a seed: each order draws from its own generator seeded by the world's
    seed and its code, so the order in which orders are created does not matter.
    """

    def __init__(
        self,
        workload: Workload,
        seed: int = 0,
        *,
        key_daily_quota: int = 200_000,
        global_daily_quota: int = 3_000_000,
        query_expiry_days: float = 90.0,
    ) -> None:
        self.workload = workload
        self.seed = seed
        self.key_daily_quota = key_daily_quota
        self.global_daily_quota = global_daily_quota
        self.query_expiry_seconds = query_expiry_days * 86400.0
        self._zone: tzinfo = workload.zone
        self._accounts: dict[str, Account] = {}
        self._orders: dict[str, _Order] = {}
        self._day: date | None = None
        self._day_total = 0
        self._day_per_key: dict[str, int] = {}
        # Entries not pushed yet, by time, while watched: (at, order code, sequence, entry).
        self._upcoming: list[tuple[float, str, int, _Entry]] | None = None
        self._sequence = itertools.count()

    # -- accounts and orders --

    def add_account(self, name: str, apikey: str, daily_quota: int | None = None) -> Account:
        """Open an account with its API key; ConflictError if the key is taken."""
        if not apikey:
            raise ValueError("an API key cannot be empty")
        if apikey in self._accounts:
            raise ConflictError(f"API key of account {self._accounts[apikey].name!r} exists")
        quota = self.key_daily_quota if daily_quota is None else daily_quota
        if quota < 0:
            raise ValueError("daily_quota cannot be negative")
        account = Account(name=name, apikey=apikey, daily_quota=quota)
        self._accounts[apikey] = account
        return account

    def account(self, apikey: str) -> Account:
        """The account of an API key, or UnknownAccountError."""
        try:
            return self._accounts[apikey]
        except KeyError:
            raise UnknownAccountError("no account has this API key") from None

    @property
    def accounts(self) -> list[Account]:
        return list(self._accounts.values())

    def add_order(
        self,
        apikey: str,
        order_code: str,
        at: datetime,
        status: Status | str | None = None,
        delay_code: int | None = None,
    ) -> None:
        """Create an order; its whole lifecycle is drawn now.

        With a status, the carrier knows it at once, in that status; without, it becomes known
        (in the workload's initial status) after the registration delay, or never.
        """
        self.account(apikey)
        refusal = validate_order_code(order_code)
        if refusal is not None:
            raise ValueError(f"order code {order_code!r} refused: {refusal.value}")
        if order_code in self._orders:
            raise ConflictError(f"order {order_code} exists")
        start = _status(status) if status is not None else None
        ts = _epoch(at)
        rng = _generator(self.seed, order_code, "lifecycle")
        order = _Order(code=order_code, apikey=apikey, rng=rng, created_at=ts)
        if start is not None:
            self._enter(order, ts, start, delay_code, given_delay=delay_code is not None)
        else:
            registration = self.workload.registration
            if rng.random() >= registration.never_found:
                delay = registration.unknown_hours.lognormal.draw(rng) * 3600.0
                self._enter(order, ts + delay, self.workload.initial, None, given_delay=False)
        self._draw_rest(order)
        self._orders[order_code] = order

    def advance(
        self,
        order_code: str,
        at: datetime,
        to: Status | str | None = None,
        delay_code: int | None = None,
    ) -> Status:
        """Make the order's next transition happen at `at` and redraw the rest of its life.

        Without `to`, the next status is drawn from the current status's rule (an order not
        yet known to the carrier becomes known, in the initial status). Returns the new status.
        """
        order = self._order(order_code)
        ts = _epoch(at)
        target = _status(to) if to is not None else None
        seen = bisect.bisect_right(order.entry_times, ts)
        if target is None:
            if not seen:
                target = self.workload.initial
            else:
                current = order.entries[seen - 1].status
                rule = self.workload.statuses.get(current)
                if rule is None:
                    raise ConflictError(f"order {order_code} is {current}: it cannot move on")
                target = _pick(order.rng, rule.next)
        self._truncate(order, ts)
        self._enter(order, ts, target, delay_code, given_delay=delay_code is not None)
        self._draw_rest(order)
        return target

    @property
    def order_count(self) -> int:
        return len(self._orders)

    def transitions(self, order_code: str) -> list[tuple[datetime, Status]]:
        """The truth: when the order enters each status, future ones included (UTC)."""
        return [(_utc(e.at), e.status) for e in self._order(order_code).entries]

    def truth(self, order_code: str, at: datetime) -> OrderTruth:
        """What the carrier knows about an order at `at`, and its next transition."""
        order = self._order(order_code)
        ts = _epoch(at)
        seen = bisect.bisect_right(order.entry_times, ts)
        history = [Transition(_utc(e.at), e.status, e.delay_code) for e in order.entries]
        current = history[seen - 1] if seen else None
        return OrderTruth(
            order_code=order.code,
            account=self._accounts[order.apikey].name,
            created_at=_utc(order.created_at),
            registered_at=_utc(order.entries[0].at) if order.entries else None,
            status=current.status if current else None,
            delay_code=current.delay_code if current else None,
            history=history[:seen],
            next_transition=history[seen] if seen < len(history) else None,
            body=self.tracking_body(order_code, at),
        )

    # -- lookups --

    def tracking_body(self, order_code: str, at: datetime) -> JSONDict:
        """The carrier's answer for this order at `at`, with no faults and no key checks.

        The dict is shared with a cache: read it, do not change it.
        """
        order = self._orders.get(order_code)
        if order is None:
            return error_body(ErrorCode.ORDERCODE_NOT_FOUND)
        return self._body(order, _epoch(at))

    def count_request(self, apikey: str | None, at: datetime) -> ErrorCode | None:
        """Count one lookup against the quotas and check its key, as the carrier does first.

        Every request counts toward the global total; those with a known key count toward
        that key too, refused ones included.
        """
        day = datetime.fromtimestamp(_epoch(at), self._zone).date()
        if day != self._day:
            self._day, self._day_total, self._day_per_key = day, 0, {}
        self._day_total += 1
        if not apikey:
            return ErrorCode.MISSING_APIKEY
        account = self._accounts.get(apikey)
        if account is None:
            return ErrorCode.APIKEY_NOT_FOUND
        used = self._day_per_key.get(apikey, 0) + 1
        self._day_per_key[apikey] = used
        if used > account.daily_quota or self._day_total > self.global_daily_quota:
            return ErrorCode.APIKEY_LIMIT
        return None

    def lookup_json(self, apikey: str, order_code: str | None, at: datetime) -> bytes:
        """The encoded answer for a key already checked by count_request: order checks next."""
        refusal = validate_order_code(order_code)
        if refusal is not None:
            return _ERROR_JSON[refusal]
        assert order_code is not None  # validate_order_code refuses None
        order = self._orders.get(order_code)
        ts = _epoch(at)
        if order is None or not order.entry_times or order.entry_times[0] > ts:
            return _ERROR_JSON[ErrorCode.ORDERCODE_NOT_FOUND]
        if order.apikey != apikey:
            return _ERROR_JSON[ErrorCode.ORDERCODE_DOES_NOT_BELONG_TO_YOUR_ACCOUNT]
        return self._body_json(order, ts)

    def track(self, apikey: str | None, order_code: str | None, at: datetime) -> JSONDict:
        """One whole lookup, counted, as the carrier answers it with no faults."""
        return dict(json.loads(self.track_json(apikey, order_code, at)))

    def track_json(self, apikey: str | None, order_code: str | None, at: datetime) -> bytes:
        """One whole lookup, counted, encoded as the carrier sends it."""
        refusal = self.count_request(apikey, at)
        if refusal is not None:
            return _ERROR_JSON[refusal]
        assert apikey is not None  # count_request refuses a missing key
        return self.lookup_json(apikey, order_code, at)

    def usage(self, at: datetime) -> Usage:
        """Lookups counted so far in the carrier day of `at` (local midnight to midnight)."""
        day = datetime.fromtimestamp(_epoch(at), self._zone).date()
        if day != self._day:
            return Usage(day=day, total=0, per_key={})
        return Usage(day=day, total=self._day_total, per_key=dict(self._day_per_key))

    # -- status pushes --

    def watch(self, since: datetime) -> None:
        """From now on, collect every status entered after `since` for `changes` to hand out."""
        ts = _epoch(since)
        self._upcoming = []
        for order in self._orders.values():
            for entry in order.entries[bisect.bisect_right(order.entry_times, ts) :]:
                self._upcoming.append((entry.at, order.code, next(self._sequence), entry))
        heapq.heapify(self._upcoming)

    def unwatch(self) -> None:
        """Stop collecting statuses for pushes and forget those not handed out yet."""
        self._upcoming = None

    def changes(self, upto: datetime) -> list[Change]:
        """The watched statuses entered up to `upto` and not handed out yet, oldest first."""
        upcoming = self._upcoming
        if upcoming is None:
            return []
        ts = _epoch(upto)
        found = []
        while upcoming and upcoming[0][0] <= ts:
            _, code, _, entry = heapq.heappop(upcoming)
            order = self._orders[code]
            index = self._entry_index(order, entry)
            if index is not None:  # None: redrawn by `advance` before it happened
                body = self._push_body(order, index)
                found.append(Change(_utc(entry.at), code, entry.status, body))
        return found

    def _entry_index(self, order: _Order, entry: _Entry) -> int | None:
        first = bisect.bisect_left(order.entry_times, entry.at)
        last = bisect.bisect_right(order.entry_times, entry.at)
        return next((i for i in range(first, last) if order.entries[i] is entry), None)

    def _push_body(self, order: _Order, index: int) -> JSONDict:
        entry = order.entries[index]
        previous = order.entries[index - 1].status.code if index else ""
        profile = order.profile or self._draw_profile(order)
        order.profile = profile
        delivered = entry.status is Status.DELIVERED
        delay = entry.delay_code
        rng = _generator(self.seed, f"{order.code}:{index}:{entry.at}", "push")
        return {
            "ApiKey": order.apikey,
            "OrderCode": order.code,
            "ExternalCode": profile.external_code,
            "ReferenceCode": None,
            "Status": str(entry.status.carrier_id),
            "StatusName": entry.status.code,
            "Description": f"Change order status: {previous} ==> {entry.status.code}",
            "RequestFeedbackCount": 0,
            "DelayCode": delay,
            "DelayNotes": _DELAY_NOTES.get(delay, _GENERIC_DELAY_NOTE) if delay else None,
            "DeliveryNotes": profile.delivery_note if delivered else None,
            "Mailman": self._mailman(order) if entry.status in _OUT_FOR_DELIVERY else None,
            "DeliveryDate": self._local(entry.at) if delivered else None,
            "ReceiverName": profile.receiver,
            "TransactionId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "Time": self._iso(entry),
        }

    def _mailman(self, order: _Order) -> str:
        rng = _generator(self.seed, order.code, "mailman")
        name = " ".join(names[int(rng.random() * len(names))] for names in _NAME_PARTS)
        return f"{name} - 09{int(rng.random() * 10**8):08d}"

    # -- drawing lifecycles --

    def _order(self, order_code: str) -> _Order:
        try:
            return self._orders[order_code]
        except KeyError:
            raise UnknownOrderError(f"no order {order_code}") from None

    def _enter(
        self, order: _Order, ts: float, status: Status, delay_code: int | None, *, given_delay: bool
    ) -> None:
        rng = order.rng
        ts = _whole_microseconds(ts)
        previous = order.entries[-1].delay_code if order.entries else None
        if not given_delay:
            rule = self.workload.statuses.get(status)
            if rule is not None and rule.delay_codes:
                delay_code = _pick_or_none(rng, rule.delay_codes)
            elif status in (Status.DELIVERING, Status.DELIVERED):
                delay_code = None
            else:
                delay_code = previous
        entry = _Entry(ts, status, delay_code, int(rng.random() * 10))
        order.entries.append(entry)
        if self._upcoming is not None:
            heapq.heappush(self._upcoming, (ts, order.code, next(self._sequence), entry))
        order.entry_times.append(ts)
        order.scans.append(_Scan(ts, status, change=True, variant=int(rng.random() * 8)))
        order.scan_times.append(ts)
        order.version += 1

    def _draw_rest(self, order: _Order) -> None:
        """Draw transitions and scans from the last entered status until a terminal one."""
        rng = order.rng
        while order.entries:
            last = order.entries[-1]
            rule = self.workload.statuses.get(last.status)
            if rule is None:
                return  # terminal, or a status the workload does not move on from
            dwell = rule.dwell_hours.lognormal.draw(rng) * 3600.0
            leave = self._next_active(last.at + dwell, rule.active_hours, rule.active_days)
            self._draw_scans(order, last.at, leave, last.status, rule)
            self._enter(order, leave, _pick(rng, rule.next), None, given_delay=False)

    def _draw_scans(
        self, order: _Order, start: float, end: float, status: Status, rule: StatusRule
    ) -> None:
        if rule.scans_per_day <= 0:
            return
        window_start, window_end = rule.active_hours
        active = window_end - window_start
        every_day = len(rule.active_days) == 7
        per_second = rule.scans_per_day / (active * 3600.0)
        rng = order.rng
        ts = start
        while True:
            ts += rng.expovariate(per_second)
            if ts >= end:
                return
            if active < 24 and not self._inside(ts, rule.active_hours):
                continue
            if not every_day and self._weekday(ts) not in rule.active_days:
                continue
            at = _whole_microseconds(ts)
            order.scans.append(_Scan(at, status, change=False, variant=int(rng.random() * 8)))
            order.scan_times.append(at)

    def _inside(self, ts: float, window: tuple[int, int]) -> bool:
        hour = datetime.fromtimestamp(ts, self._zone).hour
        return window[0] <= hour < window[1]

    def _weekday(self, ts: float) -> int:
        return datetime.fromtimestamp(ts, self._zone).isoweekday()

    def _next_active(self, ts: float, window: tuple[int, int], days: frozenset[int]) -> float:
        """`ts` if it falls in the window [start, end) of local hours on one of the ISO weekdays
        `days`, else the next opening on such a day."""
        start, end = window
        every_day = len(days) == 7
        if start == 0 and end == 24 and every_day:
            return ts
        local = datetime.fromtimestamp(ts, self._zone)
        if start <= local.hour < end and (every_day or local.isoweekday() in days):
            return ts
        day = local.date() if local.hour < start else local.date() + timedelta(days=1)
        while day.isoweekday() not in days:
            day += timedelta(days=1)
        return datetime.combine(day, time(start), self._zone).timestamp()

    def _truncate(self, order: _Order, ts: float) -> None:
        """Forget everything drawn after `ts` (kept: what happened up to and including it)."""
        kept = bisect.bisect_right(order.entry_times, ts)
        del order.entries[kept:], order.entry_times[kept:]
        kept = bisect.bisect_right(order.scan_times, ts)
        del order.scans[kept:], order.scan_times[kept:]
        order.version += 1

    # -- the tracking body --

    def _body(self, order: _Order, ts: float) -> JSONDict:
        seen = bisect.bisect_right(order.entry_times, ts)
        if seen and self._expired(order.entries[seen - 1], ts):
            return error_body(ErrorCode.ORDERCODE_QUERY_EXPIRED)
        scanned = bisect.bisect_right(order.scan_times, ts)
        key = (order.version, seen, scanned)
        if order.cached_at != key:
            order.cached_body = self._build_body(order, ts, seen, scanned)
            order.cached_at, order.cached_json = key, None
        return order.cached_body

    def _body_json(self, order: _Order, ts: float) -> bytes:
        body = self._body(order, ts)
        if body["errorCode"] is not None:
            return _ERROR_JSON[ErrorCode(body["errorCode"])]
        if order.cached_json is None:
            order.cached_json = _encode(body)
        return order.cached_json

    def _build_body(self, order: _Order, ts: float, seen: int, scanned: int) -> JSONDict:
        if seen == 0:
            return error_body(ErrorCode.ORDERCODE_NOT_FOUND)
        current = order.entries[seen - 1]
        profile = order.profile or self._draw_profile(order)
        order.profile = profile
        entries = order.entries[:seen]
        statuses = [entry.status for entry in entries]
        returning = Status.PENDING_FOR_RETURN in statuses or Status.RETURNED in statuses
        price_fr = profile.price // 2 if returning else 0
        taxed = profile.price + price_fr + profile.far_region_fee + profile.fuel_fee
        vat = round(taxed * 0.08)
        price_info = [
            {"serviceName": "Chuyển phát nhanh", "serviceID": "CPN", "cost": profile.price},
            {"serviceName": "Phụ phí xăng dầu", "serviceID": "PPXD", "cost": profile.fuel_fee},
        ]
        if profile.far_region_fee:
            price_info.append(
                {"serviceName": "Phụ phí vùng xa", "serviceID": "PPVX",
                 "cost": profile.far_region_fee}
            )  # fmt: skip
        if price_fr:
            price_info.append(
                {"serviceName": "Phí chuyển hoàn", "serviceID": "CH", "cost": price_fr}
            )
        # An order created directly in a later status was picked up by then: the carrier's
        # acceptDate is the pickup, or the first status known if that came after one.
        picked = next((e for e in entries if e.status is Status.PICKED_UP), None)
        if picked is None and entries[0].status not in _BEFORE_PICKUP:
            picked = entries[0]
        delivered = current if current.status is Status.DELIVERED else None
        delay = current.delay_code
        return {
            "errorMessage": None,
            "errorCode": None,
            "orderCode": order.code,
            "externalCode": profile.external_code,
            "status": str(current.status.carrier_id),
            "statusName": current.status.code,
            "trackingName": TRACKING_NAMES[current.status],
            "delayCode": str(delay) if delay is not None else None,
            "delayNote": _DELAY_NOTES.get(delay, _GENERIC_DELAY_NOTE) if delay else None,
            "deliveryNotes": profile.delivery_note if delivered else None,
            "deliveryDate": self._status_row(delivered)["time"] if delivered else None,
            "receiverName": profile.receiver,
            "mailerTypeID": profile.mailer_type,
            "length": profile.length,
            "width": profile.width,
            "height": profile.height,
            "realWeight": profile.real_weight,
            "calWeight": profile.cal_weight,
            "weight": profile.cal_weight,
            "quantity": profile.quantity,
            "price": profile.price,
            "priceFR": price_fr,
            "farRegionFeeAmount": profile.far_region_fee,
            "fuelFeeAmount": profile.fuel_fee,
            "vatAmount": vat,
            "totalServiceCost": taxed + vat,
            "priceInfo": price_info,
            "statuses": [self._status_row(entry) for entry in entries],
            "trackings": [
                scan.row or self._tracking_row(order, profile, scan)
                for scan in order.scans[:scanned]
            ],
            "estimateRoutes": self._local(order.entries[0].at + _promise_seconds(profile)),
            "confirmImage": [
                f"https://img.247express.vn/pod/{order.code}_{n}.jpg"
                for n in range(1, profile.images + 1)
            ]
            if delivered
            else [],
            "acceptDate": self._status_row(picked)["time"] if picked else None,
        }

    def _expired(self, current: _Entry, ts: float) -> bool:
        return current.status.terminal and ts - current.at > self.query_expiry_seconds

    def _status_row(self, entry: _Entry) -> JSONDict:
        if entry.row is not None:
            return entry.row
        entry.row = {
            "time": self._iso(entry),
            "status": str(entry.status.carrier_id),
            "statusName": entry.status.code,
            "trackingName": TRACKING_NAMES[entry.status],
        }
        return entry.row

    def _tracking_row(self, order: _Order, profile: _Profile, scan: _Scan) -> JSONDict:
        place = _SCAN_PLACES[scan.status]
        if place == _ORIGIN:
            office = profile.origin_office
        elif place == _DESTINATION:
            office = profile.destination_office
        else:  # alternate between the two ends' hubs on the way
            office = (profile.origin[0], profile.destination[0])[scan.variant % 2]
        if scan.change:
            template = _CHANGE_NOTES[scan.status]
        else:
            choices = _DWELL_NOTES.get(scan.status, [TRACKING_NAMES[scan.status]])
            template = choices[scan.variant % len(choices)]
        delay = order.entries[bisect.bisect_right(order.entry_times, scan.at) - 1].delay_code
        notes = template.format(
            office=office.name,
            province=profile.destination_office.province_name,
            delay=_DELAY_NOTES.get(delay, _GENERIC_DELAY_NOTE) if delay else _GENERIC_DELAY_NOTE,
        )
        scan.row = {
            "statusID": scan.status.carrier_id,
            "statusName": TRACKING_NAMES[scan.status],
            "postOfficeID": office.office_id,
            "postOfficeName": office.name,
            "provinceID": office.province_id,
            "provinceName": office.province_name,
            "dateChange": self._local(scan.at),
            "notes": notes,
        }
        return scan.row

    def _draw_profile(self, order: _Order) -> _Profile:
        rng = _generator(self.seed, order.code, "profile")
        origin = rng.choices(_PROVINCES, cum_weights=_ORIGIN_CUMULATIVE)[0][1]
        destination = rng.choices(_PROVINCES, cum_weights=_DESTINATION_CUMULATIVE)[0][1]
        roll = rng.random
        length, width, height = 10 + int(roll() * 41), 8 + int(roll() * 33), 2 + int(roll() * 29)
        real_weight = float(max(50, min(30_000, round(600 * math.exp(0.8 * rng.gauss(0, 1)), -1))))
        cal_weight = max(real_weight, float(round(length * width * height / 6, -1)))
        same_region = origin is destination
        base, step = (18_000, 4_000) if same_region else (30_000, 8_000)
        price = base + step * max(0, math.ceil((cal_weight - 500) / 500))
        return _Profile(
            origin=origin,
            destination=destination,
            origin_office=origin[1 + int(roll() * (len(origin) - 1))],
            destination_office=destination[1 + int(roll() * (len(destination) - 1))],
            receiver=" ".join(names[int(roll() * len(names))] for names in _NAME_PARTS),
            external_code=f"SO{int(roll() * 10**9):09d}",
            mailer_type="HH" if roll() < 0.85 else "TL",
            length=length,
            width=width,
            height=height,
            real_weight=real_weight,
            cal_weight=cal_weight,
            quantity=1 if roll() < 0.9 else 2 + int(roll() * 3),
            price=price,
            far_region_fee=10_000 if roll() < 0.15 else 0,
            fuel_fee=int(round(price * 0.15, -2)),
            delivery_note=_DELIVERY_NOTES[int(roll() * len(_DELIVERY_NOTES))],
            images=1 + int(roll() * 2),
        )

    def _iso(self, entry: _Entry) -> str:
        """ISO-8601 with 7 fractional digits and the local offset, like .NET's "o" format."""
        t = datetime.fromtimestamp(entry.at, self._zone)
        return (
            f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
            f".{t.microsecond:06d}{entry.tick}{_offset_text(t)}"
        )

    def _local(self, ts: float) -> str:
        """`yyyy-MM-dd HH:mm:ss` in local time, the carrier's other time format."""
        t = datetime.fromtimestamp(ts, self._zone)
        return f"{t.year:04d}-{t.month:02d}-{t.day:02d} {t.hour:02d}:{t.minute:02d}:{t.second:02d}"


def _offset_text(local: datetime) -> str:
    """The UTC offset of a local time as +HH:MM."""
    minutes = int((local.utcoffset() or timedelta()).total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _generator(seed: int, order_code: str, purpose: str) -> random.Random:
    """A random generator of its own for one order and purpose, fixed by the world's seed."""
    digest = hashlib.blake2b(f"{seed}:{order_code}:{purpose}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _promise_seconds(profile: _Profile) -> float:
    """How long after acceptance the carrier promises delivery."""
    days = 1 if profile.origin is profile.destination else 3
    return days * 86400.0


def _status(value: Status | str) -> Status:
    status = value if isinstance(value, Status) else parse_status(value)
    if status is None:
        raise ValueError(f"unknown status {value!r}")
    return status


def _pick(rng: random.Random, weights: Mapping[Status, float]) -> Status:
    roll = rng.random() * sum(weights.values())
    for status, weight in weights.items():
        roll -= weight
        if roll < 0:
            return status
    return next(reversed(list(weights)))


def _pick_or_none(rng: random.Random, weights: Mapping[int, float]) -> int | None:
    """A code drawn by probability; the probabilities' shortfall from 1 means none."""
    roll = rng.random()
    for code, weight in weights.items():
        roll -= weight
        if roll < 0:
            return code
    return None


# --- Arrivals, for benchmarks and the sandbox's population mode -----------------------------

# Relative share of a day's new orders by local hour: merchants hand over orders through the
# working day and the evening shopping peak, few at night.
ARRIVAL_SHAPE: tuple[float, ...] = (
    0.6, 0.4, 0.3, 0.3, 0.4, 0.8, 1.5, 2.5, 4.0, 5.5, 6.0, 6.0,
    5.0, 5.0, 5.5, 6.0, 6.0, 5.5, 4.5, 4.5, 5.0, 4.5, 3.0, 1.5,
)  # fmt: skip


def generate_orders(
    workload: Workload,
    start: datetime,
    *,
    orders_per_day: int | None = None,
    days: int | None = None,
    seed: int = 0,
) -> Iterator[tuple[datetime, str, str]]:
    """New orders as (arrival time in UTC, account name, order code), in time order.

    Day k is the local day (workload time zone) k days after the one holding `start`; each
    has exactly `orders_per_day` arrivals (default: the workload's) at local hours weighted by
    ARRIVAL_SHAPE, uniform within the hour, split among accounts by share. Arrivals before
    `start` are skipped. Codes are unique per seed and valid carrier order codes.
    """
    rng = random.Random(f"arrivals:{seed}")
    zone = workload.zone
    per_day = workload.orders_per_day if orders_per_day is None else orders_per_day
    first = datetime.combine(start.astimezone(zone).date(), time(0), zone)
    names = [account.name for account in workload.accounts]
    shares = [account.share for account in workload.accounts]
    start_ts = _epoch(start)
    serial = 0
    for day in range(workload.days if days is None else days):
        midnight = datetime.combine(first.date() + timedelta(days=day), time(0), zone).timestamp()
        hours = rng.choices(range(24), weights=ARRIVAL_SHAPE, k=per_day)
        arrivals = sorted(midnight + (hour + rng.random()) * 3600.0 for hour in hours)
        for ts in arrivals:
            serial += 1
            account = rng.choices(names, weights=shares)[0]
            if ts >= start_ts:
                yield _utc(ts), account, f"EX{seed % 1000:03d}{serial:09d}"
