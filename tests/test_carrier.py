"""The carrier client: parsing every answer the carrier gives, and every way a call can fail."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import logging
import pickle
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
import respx
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.carrier.client import MAX_BODY_BYTES, TRACKING_PATH, CarrierClient
from worker.carrier.errors import (
    ERROR_CLASSES,
    ApiKeyLimit,
    ApiKeyNotFound,
    CarrierError,
    CarrierErrorCode,
    CarrierHTTPStatusError,
    CarrierInternalError,
    CarrierTimeout,
    CarrierTransportError,
    MalformedResponse,
    MissingApiKey,
    OrderCodeNotFound,
    OrderCodeTooShort,
    UnknownCarrierErrorCode,
    carrier_error,
)
from worker.carrier.parse import (
    MAILER_TYPE_LIMIT,
    STATUS_LIMIT,
    TrackingResult,
    ascii_integer,
    parse_tracking,
)
from worker.domain.models import Shipment, StatusEvent
from worker.domain.vocabulary import ErrorCode, Status
from worker.runtime.celery import POLL_TIME_LIMIT
from worker.sim.sandbox import running_sandbox
from worker.sim.workload import Faults
from worker.tracking.poller import APPLY_RETRY_DELAYS, LOOKUP_BUDGET, track_all

ORDER = "SGN123456789"


def seed_answer(**overrides: Any) -> dict[str, Any]:
    """A tracking answer with every field of the carrier's documentation, as it sends them."""
    answer: dict[str, Any] = {
        "errorMessage": None,
        "errorCode": None,
        "orderCode": ORDER,
        "externalCode": "SHOP-778",
        "status": "25",
        "statusName": "DANGDIPHAT",
        "trackingName": "Đang đi phát",
        "delayCode": 12,
        "delayNote": "Khách không nghe máy",
        "deliveryNotes": "Gọi trước khi giao",
        "deliveryDate": None,
        "receiverName": "Nguyễn Văn A",
        "mailerTypeID": "HH",
        "length": 30,
        "width": "20.5",
        "height": 10.0,
        "realWeight": 1.2,
        "calWeight": "1.5",
        "weight": 1.5,
        "quantity": "2",
        "price": 25000,
        "priceFR": "0",
        "farRegionFeeAmount": 5000.5,
        "fuelFeeAmount": 1250,
        "vatAmount": 2500,
        "totalServiceCost": "33750.5",
        "priceInfo": [
            {"serviceName": "Chuyển phát nhanh", "serviceID": 1, "cost": 25000},
            {"serviceName": "Phụ phí xăng dầu", "serviceID": "FUEL", "cost": "1250"},
        ],
        "statuses": [
            {
                "time": "2019-08-07T11:24:12.4946223+07:00",
                "status": "21",
                "statusName": "DATIEPNHAN",
                "trackingName": "Đã tiếp nhận",
            },
            {
                "time": "2019-08-08 08:00:00",
                "status": 25,
                "statusName": "DANGDIPHAT",
                "trackingName": "Đang đi phát",
            },
        ],
        "trackings": [
            {
                "statusID": 1,
                "statusName": "Nhận hàng",
                "postOfficeID": "HCM01",
                "postOfficeName": "Bưu cục Quận 1",
                "provinceID": 79,
                "provinceName": "Hồ Chí Minh",
                "dateChange": "2019-08-07T11:30:00+07:00",
                "notes": None,
            },
            {
                "statusID": "5",
                "statusName": "Đang phát",
                "postOfficeID": None,
                "postOfficeName": None,
                "provinceID": None,
                "provinceName": None,
                "dateChange": "2019-08-08 07:45:10",
                "notes": "Shipper: 0909000000",
            },
        ],
        "estimateRoutes": {"from": "HCM", "to": "HN", "days": [1, 2]},
        "confirmImage": ["https://img.247express.vn/a.jpg", "https://img.247express.vn/b.jpg"],
        "acceptDate": "2019-08-07T11:24:12.4946223+07:00",
        "customerCode": "C0042",
    }
    answer.update(overrides)
    return answer


def body(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode()


def utc(*parts: int) -> datetime:
    return datetime(*parts).replace(tzinfo=UTC)  # type: ignore[arg-type]


# --- Parsing ------------------------------------------------------------------------------


def test_every_documented_field_is_read() -> None:
    result = parse_tracking(body(seed_answer()), ORDER)

    assert result.order_code == ORDER
    assert (result.status, result.status_raw, result.status_name) == (
        Status.DELIVERING,
        "25",
        "DANGDIPHAT",
    )
    assert result.tracking_name == "Đang đi phát"
    assert (result.delay_code, result.delay_note) == (12, "Khách không nghe máy")
    assert result.delivery_notes == "Gọi trước khi giao"
    assert result.delivery_date is None
    assert (result.receiver_name, result.mailer_type) == ("Nguyễn Văn A", "HH")
    assert (result.length, result.width, result.height) == (30.0, 20.5, 10.0)
    assert (result.real_weight, result.cal_weight, result.weight) == (1.2, 1.5, 1.5)
    assert result.quantity == 2
    assert result.price == Decimal(25000)
    assert result.price_fr == Decimal(0)
    assert result.far_region_fee_amount == Decimal("5000.5")
    assert result.fuel_fee_amount == Decimal(1250)
    assert result.vat_amount == Decimal(2500)
    assert result.total_service_cost == Decimal("33750.5")
    assert [(p.service_name, p.service_id, p.cost) for p in result.price_info] == [
        ("Chuyển phát nhanh", "1", Decimal(25000)),
        ("Phụ phí xăng dầu", "FUEL", Decimal(1250)),
    ]
    first, second = result.statuses
    assert first.time == utc(2019, 8, 7, 4, 24, 12, 494622)
    assert (first.status, first.status_raw, first.status_name) == (
        Status.ACCEPTED,
        "21",
        "DATIEPNHAN",
    )
    assert first.tracking_name == "Đã tiếp nhận"
    assert second.time == utc(2019, 8, 8, 1, 0, 0)
    assert (second.status, second.status_raw) == (Status.DELIVERING, "25")
    scan, last_scan = result.trackings
    assert (scan.status_id, scan.status_name) == ("1", "Nhận hàng")
    assert (scan.post_office_id, scan.post_office_name) == ("HCM01", "Bưu cục Quận 1")
    assert (scan.province_id, scan.province_name) == ("79", "Hồ Chí Minh")
    assert scan.date_change == utc(2019, 8, 7, 4, 30)
    assert scan.notes is None
    assert last_scan.status_id == "5"
    assert last_scan.post_office_id is None
    assert last_scan.date_change == utc(2019, 8, 8, 0, 45, 10)
    assert last_scan.notes == "Shipper: 0909000000"
    assert result.estimate_routes == {"from": "HCM", "to": "HN", "days": [1, 2]}
    assert result.confirm_images == (
        "https://img.247express.vn/a.jpg",
        "https://img.247express.vn/b.jpg",
    )
    assert result.accept_date == utc(2019, 8, 7, 4, 24, 12, 494622)
    assert result.external_code == "SHOP-778"
    assert result.extra == {"customerCode": "C0042"}
    assert result.raw == seed_answer()


STATUS_SPELLINGS = [
    pytest.param(spelling, status, id=f"{status.name}-{kind}")
    for status in Status
    for kind, spelling in (
        ("id-string", str(status.carrier_id)),
        ("id-int", status.carrier_id),
        ("code", status.code),
        ("english", status.value),
    )
] + [pytest.param("HOANTAT", Status.DELIVERED, id="DELIVERED-legacy-HOANTAT")]


@pytest.mark.parametrize(("spelling", "status"), STATUS_SPELLINGS)
def test_every_status_spelling_is_understood(spelling: object, status: Status) -> None:
    answer = seed_answer(
        status=spelling, statuses=[{"time": "2024-01-02 10:00:00", "status": spelling}]
    )

    result = parse_tracking(body(answer), ORDER)

    assert result.status is status
    assert result.status_raw == str(spelling)
    assert result.statuses[0].status is status
    assert result.statuses[0].status_raw == str(spelling)


def test_the_vietnamese_code_decides_when_the_status_id_is_missing() -> None:
    answer = seed_answer(status=None, statusName="PHATTHANHCONG", statuses=[{"statusName": "HUY"}])

    result = parse_tracking(body(answer), ORDER)

    assert (result.status, result.status_raw) == (Status.DELIVERED, None)
    assert result.statuses[0].status is Status.CANCEL


@pytest.mark.parametrize("raw", ["99", 99, "DANGBAY", ""])
def test_an_unknown_status_is_kept_raw_and_does_not_fail(raw: object) -> None:
    answer = seed_answer(status=raw, statusName="TRANGTHAIMOI", statuses=[{"status": raw}])

    result = parse_tracking(body(answer), ORDER)

    expected_raw = str(raw) or None
    assert (result.status, result.status_raw, result.status_name) == (
        None,
        expected_raw,
        "TRANGTHAIMOI",
    )
    assert (result.statuses[0].status, result.statuses[0].status_raw) == (None, expected_raw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2019-08-07T11:24:12.4946223+07:00", utc(2019, 8, 7, 4, 24, 12, 494622)),
        ("2019-08-07T11:24:12.49+07:00", utc(2019, 8, 7, 4, 24, 12, 490000)),
        ("2019-08-07T11:24:12+0700", utc(2019, 8, 7, 4, 24, 12)),
        ("2019-08-07T04:24:12Z", utc(2019, 8, 7, 4, 24, 12)),
        ("2019-08-06T23:24:12-05:00", utc(2019, 8, 7, 4, 24, 12)),
        ("2019-08-07 11:24:12", utc(2019, 8, 7, 4, 24, 12)),
        ("2019-08-07T11:24:12", utc(2019, 8, 7, 4, 24, 12)),
        ("2019-08-07T11:24:12.1234567", utc(2019, 8, 7, 4, 24, 12, 123456)),
        ("2019-08-07 00:30:00", utc(2019, 8, 6, 17, 30)),
        ("2019-08-07", utc(2019, 8, 6, 17, 0)),
        ("0001-01-01T00:00:00", None),
        ("", None),
        (None, None),
    ],
)
def test_times_become_utc(text: str | None, expected: datetime | None) -> None:
    result = parse_tracking(body(seed_answer(acceptDate=text, deliveryDate=text)), ORDER)

    assert result.accept_date == expected
    assert result.delivery_date == expected
    if expected is not None:
        assert result.accept_date is not None and result.accept_date.utcoffset() is not None


@pytest.mark.parametrize(
    "text", ["yesterday", "2019-13-01 10:00:00", "07/08/2019 11:24", 1565151852]
)
def test_a_time_that_is_no_time_is_malformed(text: object) -> None:
    answer = seed_answer(trackings=[{"dateChange": "2019-08-07 10:00:00"}, {"dateChange": text}])

    with pytest.raises(MalformedResponse, match=r"trackings\[1\]\.dateChange") as caught:
        parse_tracking(body(answer), ORDER)

    assert caught.value.order_code == ORDER


def test_a_bare_answer_with_nulls_and_no_lists_is_accepted() -> None:
    answer = {"orderCode": ORDER, "status": "21", "statusName": None, "priceInfo": None}

    result = parse_tracking(body(answer), ORDER)

    assert result.status is Status.ACCEPTED
    assert (result.price_info, result.statuses, result.trackings) == ((), (), ())
    assert result.confirm_images == ()
    assert (result.delay_code, result.quantity, result.price, result.accept_date) == (
        None,
        None,
        None,
        None,
    )
    assert result.extra == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ()),
        ([], ()),
        ("", ()),
        ("https://img/a.jpg", ("https://img/a.jpg",)),
        (
            ["https://img/a.jpg", None, "", "https://img/b.jpg"],
            ("https://img/a.jpg", "https://img/b.jpg"),
        ),
    ],
)
def test_confirm_images_come_as_a_list_a_string_or_nothing(
    value: object, expected: tuple[str, ...]
) -> None:
    assert parse_tracking(body(seed_answer(confirmImage=value)), ORDER).confirm_images == expected


def test_one_object_instead_of_a_list_and_null_rows_are_tolerated() -> None:
    answer = seed_answer(
        statuses={"time": "2024-01-02 10:00:00", "status": "23"}, trackings=[None, {"notes": "x"}]
    )

    result = parse_tracking(body(answer), ORDER)

    assert [entry.status for entry in result.statuses] == [Status.PICKED_UP]
    assert [scan.notes for scan in result.trackings] == ["x"]


def test_keys_are_read_whatever_their_casing() -> None:
    answer = {"OrderCode": ORDER, "Status": "30", "DelayCode": "0", "ConfirmImage": "u"}

    result = parse_tracking(body(answer), ORDER)

    assert (result.status, result.delay_code, result.confirm_images) == (
        Status.DELIVERED,
        None,
        ("u",),
    )


@pytest.mark.parametrize(
    ("overrides", "field_path"),
    [
        ({"length": {"cm": 30}}, "length"),
        ({"quantity": 2.5}, "quantity"),
        ({"quantity": True}, "quantity"),
        ({"price": "25.000 đ"}, "price"),
        ({"delayCode": "soon"}, "delayCode"),
        ({"status": ["25"]}, "status"),
        ({"receiverName": {"first": "A"}}, "receiverName"),
        ({"trackings": "none today"}, "trackings"),
        ({"trackings": [{"notes": "ok"}, 7]}, r"trackings\[1\]"),
        ({"priceInfo": [{"cost": [1]}]}, r"priceInfo\[0\]\.cost"),
        ({"confirmImage": [["a"]]}, r"confirmImage\[0\]"),
    ],
)
def test_a_field_of_a_senseless_type_is_malformed_and_named(
    overrides: dict[str, Any], field_path: str
) -> None:
    with pytest.raises(MalformedResponse, match=f"field {field_path}"):
        parse_tracking(body(seed_answer(**overrides)), ORDER)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", "HTML, not JSON"),
        (b"  \r\n<html>Service Unavailable</html>", "HTML, not JSON"),
        (b"", "empty"),
        (b'{"orderCode": "SGN123456789", "status": "2', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b'{"orderCode": "SGN123456789", "price": NaN}', "not valid JSON"),
        (b"[1, 2]", "JSON list, not an object"),
        (b'"OK"', "JSON str, not an object"),
        (b"{}", "an order code or an errorCode"),
        (body(seed_answer(orderCode="OTHER00001")), "orderCode"),
    ],
)
def test_an_answer_that_is_no_tracking_is_malformed(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedResponse, match=message) as caught:
        parse_tracking(raw, ORDER)

    assert caught.value.retryable
    assert ORDER in str(caught.value)


def test_every_cut_of_a_real_answer_is_malformed() -> None:
    whole = body(seed_answer())

    for end in range(len(whole)):
        with pytest.raises(MalformedResponse):
            parse_tracking(whole[:end], ORDER)


# --- Carrier error codes -----------------------------------------------------------------


def test_every_error_code_has_its_own_class() -> None:
    assert set(ERROR_CLASSES) == set(ErrorCode)
    assert len(set(ERROR_CLASSES.values())) == len(ErrorCode)
    for code, cls in ERROR_CLASSES.items():
        assert issubclass(cls, CarrierErrorCode)
        assert cls.code is code


@pytest.mark.parametrize("code", list(ErrorCode))
def test_an_error_answer_raises_its_class(code: ErrorCode) -> None:
    answer = {"errorMessage": code.message, "errorCode": code.value, "orderCode": None}

    with pytest.raises(CarrierErrorCode) as caught:
        parse_tracking(body(answer), ORDER)

    error = caught.value
    assert type(error) is ERROR_CLASSES[code]
    assert (error.code, error.code_raw, error.carrier_message) == (code, code.value, code.message)
    assert error.order_code == ORDER
    assert str(error) == f"order {ORDER}: carrier answered {code.value}: {code.message}"


def test_an_unknown_error_code_is_kept_and_retried_like_exception() -> None:
    answer = {"errorMessage": None, "errorCode": "SERVER_BUSY", "orderCode": None}

    with pytest.raises(UnknownCarrierErrorCode) as caught:
        parse_tracking(body(answer), ORDER)

    assert (caught.value.code, caught.value.code_raw) == (None, "SERVER_BUSY")
    assert caught.value.retryable


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (CarrierTransportError("refused", order_code=ORDER), True),
        (CarrierTimeout("slow", order_code=ORDER), True),
        (MalformedResponse("html", order_code=ORDER), True),
        (CarrierHTTPStatusError("x", order_code=ORDER, status_code=500), True),
        (CarrierHTTPStatusError("x", order_code=ORDER, status_code=503), True),
        (CarrierHTTPStatusError("x", order_code=ORDER, status_code=429), True),
        (CarrierHTTPStatusError("x", order_code=ORDER, status_code=404), False),
        (CarrierHTTPStatusError("x", order_code=ORDER, status_code=403), False),
        *[
            (carrier_error(code.value, None, order_code=ORDER), code is ErrorCode.EXCEPTION)
            for code in ErrorCode
        ],
    ],
    ids=repr,
)
def test_retryable_errors_are_the_passing_ones(error: CarrierError, retryable: bool) -> None:
    assert error.retryable is retryable


def test_errors_survive_pickling() -> None:
    errors: list[CarrierError] = [
        CarrierHTTPStatusError("HTTP 502 from carrier", order_code=ORDER, status_code=502),
        carrier_error("APIKEY_LIMIT", "Look up more than 200,000 times/day", order_code=ORDER),
        CarrierTimeout("slow", order_code=ORDER),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert (str(copy), copy.__dict__, copy.retryable) == (
            str(error),
            error.__dict__,
            error.retryable,
        )


# --- Properties: whatever comes in, the result is a TrackingResult or a CarrierError ---------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["25", "HOANTAT", "2019-08-07 11:24:12", "2019-08-07T11:24:12.4946223+07:00"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)
FIELDS = [name for name in seed_answer() if name != "orderCode"]
rows = st.lists(
    st.dictionaries(st.sampled_from(["time", "status", "statusName", "dateChange"]), json_values),
    max_size=3,
)
random_answers = st.builds(
    lambda code, fields, statuses, trackings: {
        "orderCode": code,
        **fields,
        "statuses": statuses,
        "trackings": trackings,
    },
    st.sampled_from([ORDER, ORDER.lower(), None, 5]),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8),
    rows | json_values,
    rows | json_values,
)
# A real answer with a few fields dropped or replaced by anything at all.
mutated_answers = st.builds(
    lambda dropped, replaced: {
        **{k: v for k, v in seed_answer().items() if k not in dropped},
        **replaced,
    },
    st.sets(st.sampled_from(FIELDS), max_size=6),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=2),
)
answers = mutated_answers | random_answers


def parsed_or_carrier_error(raw: bytes) -> TrackingResult | CarrierError:
    try:
        return parse_tracking(raw, ORDER)
    except CarrierError as error:
        return error


@settings(max_examples=100, deadline=None, database=None)
@given(answers)
def test_any_json_answer_parses_or_raises_a_carrier_error(answer: dict[str, Any]) -> None:
    outcome = parsed_or_carrier_error(body(answer))

    if isinstance(outcome, TrackingResult):
        times = [outcome.accept_date, outcome.delivery_date]
        times += [entry.time for entry in outcome.statuses]
        times += [scan.date_change for scan in outcome.trackings]
        assert all(t is None or t.tzinfo is UTC for t in times)
    else:
        assert outcome.order_code == ORDER


@settings(max_examples=100, deadline=None, database=None)
@given(json_values)
def test_any_json_value_parses_or_raises_a_carrier_error(value: object) -> None:
    parsed_or_carrier_error(body(value))


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.binary(max_size=64)
    | st.builds(
        lambda n, b: body(seed_answer())[:n] + b, st.integers(0, 2000), st.binary(max_size=8)
    )
)
def test_any_bytes_parse_or_raise_a_carrier_error(raw: bytes) -> None:
    parsed_or_carrier_error(raw)


def test_deep_nesting_is_malformed_not_a_crash() -> None:
    with pytest.raises(MalformedResponse):
        parse_tracking(b'{"estimateRoutes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ORDER)


def test_json_nested_past_the_limit_or_a_number_past_a_float_is_refused() -> None:
    def nested(levels: int) -> bytes:
        return b'{"estimateRoutes": ' + b"[" * levels + b"]" * levels + b"}"

    with pytest.raises(MalformedResponse, match="nested deeper than 32 levels"):
        parse_tracking(nested(32), ORDER)  # the answer object is level 0, its lists 1 to 32
    # One level less passes the depth check and is refused for what it lacks instead.
    with pytest.raises(MalformedResponse, match="field orderCode"):
        parse_tracking(nested(31), ORDER)
    with pytest.raises(MalformedResponse, match="a number too large for JSON"):
        parse_tracking(b'{"price": 1e999}', ORDER)


# --- The client against a real HTTP server on loopback -----------------------------------

API_KEY = "1111-2222-3333-SECRET"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Runs an async test in a fresh event loop."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


@dataclass
class FakeCarrier:
    """A tracking endpoint on 127.0.0.1 that answers with `handler` and remembers its callers."""

    base_url: str
    runner: web.AppRunner
    queries: list[dict[str, str]] = field(default_factory=list)
    peers: set[tuple[str, int]] = field(default_factory=set)

    def open_connections(self) -> int:
        assert self.runner.server is not None
        return len(self.runner.server.connections)


@contextlib.asynccontextmanager
async def fake_carrier(handler: Handler) -> AsyncIterator[FakeCarrier]:
    carrier: FakeCarrier

    async def tracking(request: web.Request) -> web.StreamResponse:
        carrier.queries.append(dict(request.query))
        carrier.peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        return await handler(request)

    app = web.Application()
    app.router.add_get(TRACKING_PATH, tracking)
    # No access log: it is the carrier's log, and would print the key this test hides.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    carrier = FakeCarrier(base_url=f"http://127.0.0.1:{port}", runner=runner)
    try:
        yield carrier
    finally:
        await runner.cleanup()


async def answer_json(request: web.Request) -> web.StreamResponse:
    return web.json_response(seed_answer(orderCode=request.query["ordercode"]))


async def answer_500(request: web.Request) -> web.StreamResponse:
    return web.Response(status=500, text="Internal Server Error")


async def answer_html(request: web.Request) -> web.StreamResponse:
    html = "<html><head><title>Maintenance</title></head><body>Back soon</body></html>"
    return web.Response(text=html, content_type="text/html")


async def answer_truncated_json(request: web.Request) -> web.StreamResponse:
    return web.Response(body=body(seed_answer())[:300], content_type="application/json")


async def answer_cut_off(request: web.Request) -> web.StreamResponse:
    # Promise a full body, send half, and hang up: the connection dies mid-answer.
    whole = body(seed_answer())
    response = web.StreamResponse(headers={"Content-Length": str(len(whole))})
    await response.prepare(request)
    await response.write(whole[:200])
    assert request.transport is not None
    request.transport.close()
    return response


async def answer_bad_gzip(request: web.Request) -> web.StreamResponse:
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    return web.Response(body=b"\x1f\x8b not really gzip", headers=headers)


async def answer_never(request: web.Request) -> web.StreamResponse:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def answer_trickle(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    while True:  # each byte resets a read timeout; only a deadline ends this
        await response.write(b" ")
        await asyncio.sleep(0.02)


async def hang_up(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.close()
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def refusing_port() -> tuple[socket.socket, int]:
    """A loopback port that refuses connections: bound, never listening, held by the test."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


@run_async
async def test_a_tracking_call_sends_the_code_and_key_and_parses_the_answer() -> None:
    async with fake_carrier(answer_json) as carrier, CarrierClient(carrier.base_url) as client:
        result = await client.track(ORDER, API_KEY)

    assert client.transport_name == "AiohttpTransport"
    assert result.status is Status.DELIVERING
    assert result.order_code == ORDER
    assert carrier.queries == [{"ordercode": ORDER, "apikey": API_KEY}]


@pytest.mark.parametrize(
    ("handler", "error_type", "message"),
    [
        (answer_500, CarrierHTTPStatusError, "HTTP 500 Internal Server Error from carrier"),
        (answer_html, MalformedResponse, "HTML, not JSON"),
        (answer_truncated_json, MalformedResponse, "not valid JSON"),
        (answer_bad_gzip, MalformedResponse, "could not be decoded"),
        (answer_cut_off, CarrierTransportError, "cut off"),
        (hang_up, CarrierTransportError, "closed the connection"),
        (answer_never, CarrierTimeout, "timed out waiting for the carrier"),
        (answer_trickle, CarrierTimeout, "no complete answer within 0.8 s"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
@run_async
async def test_a_failing_carrier_raises_a_retryable_error_naming_the_order(
    handler: Handler, error_type: type[CarrierError], message: str
) -> None:
    async with (
        fake_carrier(handler) as carrier,
        CarrierClient(carrier.base_url, timeout=0.2) as client,
    ):
        with pytest.raises(CarrierError) as caught:
            await client.track(ORDER, API_KEY)

    assert type(caught.value) is error_type
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"order {ORDER}: ")
    assert caught.value.retryable
    if isinstance(caught.value, CarrierTransportError):
        assert caught.value.__cause__ is not None
    assert len(carrier.queries) == 1  # one attempt: retrying is the caller's choice


@run_async
async def test_a_refused_connection_is_a_transport_error() -> None:
    held, port = refusing_port()
    with held:
        async with CarrierClient(f"http://127.0.0.1:{port}", timeout=1) as client:
            with pytest.raises(CarrierTransportError, match="could not connect") as caught:
                await client.track(ORDER, API_KEY)

    assert type(caught.value) is CarrierTransportError
    assert caught.value.retryable


@pytest.mark.parametrize("status", [400, 403, 404])
@run_async
async def test_a_client_error_status_is_not_retryable(status: int) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text="<html>nope</html>", content_type="text/html")

    async with fake_carrier(answer) as carrier, CarrierClient(carrier.base_url) as client:
        with pytest.raises(CarrierHTTPStatusError) as caught:
            await client.track(ORDER, API_KEY)

    assert caught.value.status_code == status
    assert not caught.value.retryable


@pytest.mark.parametrize(("status", "code"), [(200, "APIKEY_LIMIT"), (500, "EXCEPTION")])
@run_async
async def test_a_carrier_error_code_wins_over_the_http_status(status: int, code: str) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        payload = {"errorCode": code, "errorMessage": "from the carrier", "orderCode": None}
        return web.json_response(payload, status=status)

    async with fake_carrier(answer) as carrier, CarrierClient(carrier.base_url) as client:
        with pytest.raises(CarrierErrorCode) as caught:
            await client.track(ORDER, API_KEY)

    assert (
        type(caught.value) is {"APIKEY_LIMIT": ApiKeyLimit, "EXCEPTION": CarrierInternalError}[code]
    )
    assert caught.value.carrier_message == "from the carrier"


@pytest.mark.parametrize(
    ("order_code", "api_key", "error_type"),
    [("SGN1", API_KEY, OrderCodeTooShort), (ORDER, "", MissingApiKey)],
)
@run_async
async def test_a_call_the_carrier_would_refuse_is_not_sent(
    order_code: str, api_key: str, error_type: type[CarrierErrorCode]
) -> None:
    async with fake_carrier(answer_json) as carrier, CarrierClient(carrier.base_url) as client:
        with pytest.raises(error_type, match="not sent to the carrier"):
            await client.track(order_code, api_key)

    assert carrier.queries == []


@run_async
async def test_a_not_found_answer_raises_order_code_not_found() -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"errorCode": "ORDERCODE_NOT_FOUND", "errorMessage": "OrderCode is not found"}
        )

    async with fake_carrier(answer) as carrier, CarrierClient(carrier.base_url) as client:
        with pytest.raises(OrderCodeNotFound) as caught:
            await client.track(ORDER, API_KEY)

    assert not caught.value.retryable


@run_async
async def test_connections_are_reused_bounded_and_closed() -> None:
    async with fake_carrier(answer_json) as carrier:
        client = CarrierClient(carrier.base_url, max_connections=3)
        for _ in range(10):
            await client.track(ORDER, API_KEY)
        assert len(carrier.peers) == 1  # keep-alive: one connection for sequential calls

        await asyncio.gather(*(client.track(ORDER, API_KEY) for _ in range(60)))
        assert len(carrier.queries) == 70
        assert len(carrier.peers) <= 3
        assert carrier.open_connections() <= 3

        await client.aclose()
        async with asyncio.timeout(5):
            while carrier.open_connections():
                await asyncio.sleep(0.01)


@run_async
async def test_failures_do_not_leak_connections() -> None:
    async with fake_carrier(answer_never) as carrier:
        client = CarrierClient(carrier.base_url, timeout=0.1, max_connections=2)
        for _ in range(6):
            with pytest.raises(CarrierTimeout):
                await client.track(ORDER, API_KEY)
        await client.aclose()
        async with asyncio.timeout(5):
            while carrier.open_connections():
                await asyncio.sleep(0.01)


def test_a_client_stays_with_its_event_loop() -> None:
    client = CarrierClient("http://127.0.0.1:9")

    async def use_then_close() -> None:
        async with fake_carrier(answer_json) as carrier:
            client.base_url = carrier.base_url
            await client.track(ORDER, API_KEY)
            await client.aclose()

    asyncio.run(use_then_close())
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(client.track(ORDER, API_KEY))


# --- The API key never shows ----------------------------------------------------------------


class Recorder(logging.Handler):
    """Every record, fully formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@run_async
async def test_the_api_key_appears_in_no_log_line_message_or_traceback() -> None:
    # Characters a URL must escape: the key shows both as written and percent-encoded.
    api_key = "s3cr3t+key/with=odd&chars"
    recorder = Recorder()
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)
    errors: list[CarrierError] = []

    async def attempt(client: CarrierClient) -> None:
        try:
            await client.track(ORDER, api_key)
        except CarrierError as error:
            errors.append(error)

    try:
        for handler in (answer_json, answer_500, answer_html, answer_cut_off, hang_up):
            async with (
                fake_carrier(handler) as carrier,
                CarrierClient(carrier.base_url, timeout=0.2) as client,
            ):
                await attempt(client)
                await attempt(client)
                assert api_key not in repr(client)
        async with (
            fake_carrier(answer_never) as carrier,
            CarrierClient(carrier.base_url, timeout=0.2, max_connections=1) as client,
        ):
            # The second call waits for the only connection, held by the first: aiohttp names
            # the full URL in the message of that timeout.
            await asyncio.gather(attempt(client), attempt(client))
            assert any("connecting" in str(error) for error in errors)
        held, port = refusing_port()
        with held:
            async with CarrierClient(f"http://127.0.0.1:{port}") as client:
                await attempt(client)
        for error in errors:
            logging.getLogger("shipmon.test").error("poll failed", exc_info=error)
    finally:
        root.removeHandler(recorder)
        root.setLevel(previous_level)

    assert len(errors) == 11  # every call but the two answered ones failed
    logged = "\n".join(recorder.lines)
    assert "HTTP Request: GET" in logged and "apikey=[redacted]" in logged  # logging was on
    shown = [logged] + [
        text
        for error in errors
        for text in (str(error), repr(error), "".join(traceback.format_exception(error)))
    ]
    for form in {api_key, quote(api_key, safe=""), quote_plus(api_key), quote(api_key)}:
        for text in shown:
            assert form not in text


@run_async
async def test_a_carrier_message_echoing_the_key_is_redacted() -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        message = f"Apikey {request.query['apikey']} is not found"
        return web.json_response({"errorCode": "APIKEY_NOT_FOUND", "errorMessage": message})

    async with fake_carrier(answer) as carrier, CarrierClient(carrier.base_url) as client:
        with pytest.raises(ApiKeyNotFound) as caught:
            await client.track(ORDER, API_KEY)

    assert caught.value.carrier_message == "Apikey [redacted] is not found"
    assert API_KEY not in "".join(traceback.format_exception(caught.value)) + repr(caught.value)


# --- A mocked transport, for failures a real server cannot easily stage --------------------


@pytest.mark.parametrize(
    ("side_effect", "error_type"),
    [
        (httpx.ConnectError("connection reset"), CarrierTransportError),
        (httpx.ConnectTimeout("connect timed out"), CarrierTimeout),
        (httpx.ReadTimeout("read timed out"), CarrierTimeout),
        (httpx.RemoteProtocolError("bad status line"), CarrierTransportError),
        (httpx.Response(503, headers={"Retry-After": "30"}), CarrierHTTPStatusError),
    ],
    ids=lambda value: type(value).__name__,
)
@run_async
async def test_httpx_failures_map_to_carrier_errors(
    side_effect: Exception | httpx.Response, error_type: type[CarrierError]
) -> None:
    router = respx.MockRouter(base_url="https://carrier.test")
    route = router.get(TRACKING_PATH, params={"ordercode": ORDER, "apikey": API_KEY})
    route.mock(side_effect=[side_effect])
    transport = httpx.MockTransport(router.async_handler)

    async with CarrierClient("https://carrier.test", transport=transport) as client:
        with pytest.raises(CarrierError) as caught:
            await client.track(ORDER, API_KEY)

    assert type(caught.value) is error_type
    assert caught.value.retryable
    assert route.call_count == 1
    assert client.transport_name == "MockTransport"


# --- hostile answers: every value cleaned and bounded ----------------------------------------


def _answer(**fields: object) -> bytes:
    body: dict[str, object] = {
        "orderCode": "HOSTILE01",
        "status": "25",
        "statusName": "DANGDIPHAT",
        "statuses": [{"time": "2026-11-23T09:00:00+07:00", "status": "25"}],
    }
    return json.dumps(body | fields).encode()


def test_nul_bytes_are_stripped_from_every_value_and_the_raw_answer() -> None:
    result = parse_tracking(
        _answer(trackingName="Đang\u0000 phát", extraField={"k\u0000": ["a\u0000b"]}), "HOSTILE01"
    )
    assert result.tracking_name == "Đang phát"
    assert result.extra == {"extraField": {"k": ["ab"]}}
    assert "\x00" not in json.dumps(result.raw)


@pytest.mark.parametrize(
    ("field", "attribute", "limit"),
    [("statusName", "status_name", 40), ("mailerTypeID", "mailer_type", 20)],
)
def test_over_long_text_is_cut_to_its_column(field: str, attribute: str, limit: int) -> None:
    result = parse_tracking(_answer(**{field: "X" * 5000}), "HOSTILE01")
    assert getattr(result, attribute) == "X" * limit


def test_an_over_long_unknown_status_is_cut_to_its_column() -> None:
    result = parse_tracking(_answer(status="Y" * 500, statusName=None), "HOSTILE01")
    assert result.status_raw == "Y" * 40


@pytest.mark.parametrize(
    "fields",
    [
        {"status": str(2**31)},
        {"status": 2**31},
        {"quantity": 2**31},
        {"quantity": str(2**40)},
        {"delayCode": "99999999999"},
        {"price": 10**30},
        {"length": 1e300},
        {"quantity": "٣"},
        {"quantity": "²"},
        {"delayCode": "１２"},
        {"price": "1_000"},
        {
            "estimateRoutes": [
                [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]
            ]
        },
    ],
)
def test_numbers_out_of_range_or_not_ascii_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(MalformedResponse):
        parse_tracking(_answer(**fields), "HOSTILE01")


def test_a_unicode_digit_status_is_kept_raw_but_is_no_status_id() -> None:
    result = parse_tracking(_answer(status="²", statusName=None), "HOSTILE01")
    assert result.status is None
    assert result.status_raw == "²"
    assert ascii_integer(result.status_raw) is None
    assert ascii_integer("٣") is None
    assert ascii_integer(str(2**31)) is None
    assert ascii_integer("25") == 25


def test_duplicated_keys_keep_the_last_and_keys_differing_in_case_are_refused() -> None:
    assert parse_tracking(b'{"status":"30",' + _answer()[1:], "HOSTILE01").status_raw == "25"
    with pytest.raises(MalformedResponse, match="distinct regardless of case"):
        parse_tracking(b'{"STATUS":"18",' + _answer()[1:], "HOSTILE01")


async def _oversized(request: web.Request) -> web.StreamResponse:
    if request.query["ordercode"] == "GZIPBOMB1":
        inflated = b'{"orderCode":"' + b"0" * (8 * MAX_BODY_BYTES) + b'"}'
        return web.Response(
            body=gzip.compress(inflated),
            content_type="application/json",
            headers={"Content-Encoding": "gzip"},
        )
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        for _ in range(50):
            await response.write(b" " * (1024 * 1024))
    return response


@pytest.mark.parametrize("order_code", ["GZIPBOMB1", "HUGEBODY1"])
@run_async
async def test_a_body_past_the_cap_is_malformed_and_not_read_on(order_code: str) -> None:
    app = web.Application()
    app.router.add_get(TRACKING_PATH, _oversized)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with CarrierClient(f"http://127.0.0.1:{port}", timeout=10) as client:
            with pytest.raises(MalformedResponse, match="over 2097152 bytes"):
                await client.track(order_code, "KEY-1")
    finally:
        await runner.cleanup()


@run_async
async def test_lookups_past_the_batch_budget_become_timeouts() -> None:
    with running_sandbox(faults=Faults(), seed=3) as sandbox:
        sandbox.add_account("budget", "KEY-BUDGET")
        for code in ("BUDGET001", "BUDGET002"):
            sandbox.add_order("KEY-BUDGET", code, status="DELIVERING")
        sandbox.set_faults({})
        async with CarrierClient(sandbox.base_url, timeout=30) as client:
            answered = await track_all(client, "KEY-BUDGET", ["BUDGET001"], 1, budget=5)
            sandbox.set_faults({"timeout": 1.0, "hang_seconds": 20})
            hung = await track_all(client, "KEY-BUDGET", ["BUDGET002"], 1, budget=0.5)
    assert isinstance(answered[0], TrackingResult)
    assert isinstance(hung[0], CarrierTimeout)
    assert "batch's 0.5 s" in hung[0].message


def test_a_poll_task_applies_its_lookups_within_its_time_limit() -> None:
    # Lookups, then waiting out PostgreSQL, leave time to apply before Celery kills the task.
    assert LOOKUP_BUDGET + sum(APPLY_RETRY_DELAYS) + 15 <= POLL_TIME_LIMIT


def test_text_limits_match_the_columns() -> None:
    columns = Shipment.__table__.c
    assert columns.status.type.length == STATUS_LIMIT
    assert columns.status_code.type.length == STATUS_LIMIT
    assert StatusEvent.__table__.c.status.type.length == STATUS_LIMIT
    assert columns.mailer_type.type.length == MAILER_TYPE_LIMIT
