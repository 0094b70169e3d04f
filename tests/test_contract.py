"""The carrier client against the sandbox: every status, every error code, every fault.

The sandbox emulates the carrier's tracking API; these tests hold the two to one contract, so
a change to either that the other does not understand fails here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from worker.carrier.client import TRACKING_PATH, CarrierClient
from worker.carrier.errors import (
    ERROR_CLASSES,
    CarrierError,
    CarrierErrorCode,
    CarrierHTTPStatusError,
    CarrierTimeout,
    CarrierTransportError,
    MalformedResponse,
)
from worker.carrier.parse import TrackingResult, parse_tracking
from worker.domain.vocabulary import ErrorCode, Status
from worker.sim.sandbox import ManualClock, SandboxHandle, running_sandbox
from worker.sim.workload import Faults

NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)  # 10:00 in Vietnam, a working hour
KEY = "4f1c-88a0-2b7e-91d3-5c0a7e6f2"
OTHER_KEY = "0d2e-1f3a-4b5c-6d7e-8f9a0b1c2"
ORDER = "SGN000000001"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
def sandbox(clock: ManualClock) -> Iterator[SandboxHandle]:
    with running_sandbox(clock=clock, faults=Faults()) as handle:
        handle.add_account("shop", KEY)
        handle.add_account("other-shop", OTHER_KEY)
        yield handle


def track(sandbox: SandboxHandle, order_code: str, api_key: str = KEY, **client: Any) -> Any:
    """The client's tracking of one order: its TrackingResult, or the CarrierError it raised."""

    async def call() -> TrackingResult | CarrierError:
        async with CarrierClient(sandbox.base_url, **client) as carrier:
            try:
                return await carrier.track(order_code, api_key)
            except CarrierError as error:
                return error

    return asyncio.run(call())


def requests_of(sandbox: SandboxHandle) -> int:
    return int(sandbox.stats()["requests"]["total"])


# --- Statuses ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", list(Status))
def test_every_status_reads_as_the_sandbox_shows_it(sandbox: SandboxHandle, status: Status) -> None:
    sandbox.add_order(KEY, ORDER, status=status.value)

    result = track(sandbox, ORDER)

    assert isinstance(result, TrackingResult)
    assert (result.status, result.status_raw, result.status_name) == (
        status,
        str(status.carrier_id),
        status.code,
    )
    assert result.raw == sandbox.order(ORDER)["tracking"]
    assert result.statuses[-1].status is status
    assert result.statuses[-1].time == NOW


def test_a_delay_code_and_each_transition_are_read(
    sandbox: SandboxHandle, clock: ManualClock
) -> None:
    sandbox.add_order(KEY, ORDER, status=Status.ACCEPTED.value)
    clock.advance(timedelta(minutes=1))
    sandbox.advance(ORDER, to=Status.PICKED_UP.value)
    clock.advance(timedelta(minutes=1))
    truth = sandbox.advance(ORDER, to=Status.DELIVERING.value, delay_code=12)

    result = track(sandbox, ORDER)

    assert isinstance(result, TrackingResult)
    assert (result.status, result.delay_code) == (Status.DELIVERING, 12)
    assert [(entry.status, entry.time) for entry in result.statuses] == [
        (Status.ACCEPTED, NOW),
        (Status.PICKED_UP, NOW + timedelta(minutes=1)),
        (Status.DELIVERING, NOW + timedelta(minutes=2)),
    ]
    assert [(e.status, e.time) for e in result.statuses] == [
        (Status(step["status"]), datetime.fromisoformat(step["at"])) for step in truth["history"]
    ]
    scan_times = [scan.date_change for scan in result.trackings]
    assert scan_times
    assert all(t is not None and t.tzinfo is UTC for t in scan_times)


# --- Error codes ------------------------------------------------------------------------

# Codes the client refuses itself, without spending a lookup, for these inputs.
REFUSED_LOCALLY: dict[ErrorCode, tuple[str, str]] = {
    ErrorCode.MISSING_APIKEY: (ORDER, ""),
    ErrorCode.MISSING_ORDERCODE: ("", KEY),
    ErrorCode.ORDERCODE_MIN_LENGTH: ("SGN1", KEY),
    ErrorCode.ORDERCODE_MAX_LENGTH: ("SGN" + "0" * 18, KEY),
    ErrorCode.ORDERCODE_FORMAT_EXCEPTION: ("SGN 0001/A", KEY),
}


@pytest.mark.parametrize("code", list(REFUSED_LOCALLY))
def test_a_code_the_sandbox_refuses_is_refused_alike_without_a_lookup(
    sandbox: SandboxHandle, code: ErrorCode
) -> None:
    order_code, api_key = REFUSED_LOCALLY[code]
    answer = sandbox.admin.get(TRACKING_PATH, params={"ordercode": order_code, "apikey": api_key})
    with pytest.raises(ERROR_CLASSES[code]):
        parse_tracking(answer.content, order_code)
    before = requests_of(sandbox)

    error = track(sandbox, order_code, api_key)

    assert type(error) is ERROR_CLASSES[code]
    assert requests_of(sandbox) == before


def not_found(sandbox: SandboxHandle, clock: ManualClock) -> tuple[str, str]:
    return "SGN404404404", KEY


def not_in_account(sandbox: SandboxHandle, clock: ManualClock) -> tuple[str, str]:
    sandbox.add_order(OTHER_KEY, ORDER, status=Status.IN_TRANSIT.value)
    return ORDER, KEY


def unknown_key(sandbox: SandboxHandle, clock: ManualClock) -> tuple[str, str]:
    sandbox.add_order(KEY, ORDER, status=Status.IN_TRANSIT.value)
    return ORDER, "ffff-ffff-ffff-ffff-fffffffff"


def over_the_daily_limit(sandbox: SandboxHandle, clock: ManualClock) -> tuple[str, str]:
    sandbox.add_account("tiny-shop", "1234-5678-9abc-def0-123456789", daily_quota=1)
    sandbox.add_order("1234-5678-9abc-def0-123456789", ORDER, status=Status.IN_TRANSIT.value)
    assert isinstance(track(sandbox, ORDER, "1234-5678-9abc-def0-123456789"), TrackingResult)
    return ORDER, "1234-5678-9abc-def0-123456789"


def carrier_exception(sandbox: SandboxHandle, clock: ManualClock) -> tuple[str, str]:
    sandbox.add_order(KEY, ORDER, status=Status.IN_TRANSIT.value)
    sandbox.set_faults({"carrier_exception": 1.0})
    return ORDER, KEY


def lookup_period_over(sandbox: SandboxHandle, clock: ManualClock) -> tuple[str, str]:
    sandbox.add_order(KEY, ORDER, status=Status.DELIVERED.value)
    clock.advance(timedelta(days=365))
    return ORDER, KEY


Scenario = Callable[[SandboxHandle, ManualClock], tuple[str, str]]
ANSWERED_BY_THE_SANDBOX: dict[ErrorCode, Scenario] = {
    ErrorCode.ORDERCODE_NOT_FOUND: not_found,
    ErrorCode.ORDERCODE_DOES_NOT_BELONG_TO_YOUR_ACCOUNT: not_in_account,
    ErrorCode.APIKEY_NOT_FOUND: unknown_key,
    ErrorCode.APIKEY_LIMIT: over_the_daily_limit,
    ErrorCode.EXCEPTION: carrier_exception,
    ErrorCode.ORDERCODE_QUERY_EXPIRED: lookup_period_over,
}


def test_every_error_code_is_covered() -> None:
    assert set(REFUSED_LOCALLY) | set(ANSWERED_BY_THE_SANDBOX) == set(ErrorCode)


@pytest.mark.parametrize("code", list(ANSWERED_BY_THE_SANDBOX))
def test_every_error_code_the_sandbox_answers_raises_its_class(
    sandbox: SandboxHandle, clock: ManualClock, code: ErrorCode
) -> None:
    order_code, api_key = ANSWERED_BY_THE_SANDBOX[code](sandbox, clock)
    before = requests_of(sandbox)

    error = track(sandbox, order_code, api_key)

    assert isinstance(error, CarrierErrorCode)
    assert type(error) is ERROR_CLASSES[code]
    assert error.code is code
    assert error.order_code == order_code
    assert error.retryable is (code is ErrorCode.EXCEPTION)
    assert requests_of(sandbox) == before + 1


# --- Faults -----------------------------------------------------------------------------


def test_an_http_500_is_a_retryable_status_error(sandbox: SandboxHandle) -> None:
    sandbox.add_order(KEY, ORDER, status=Status.IN_TRANSIT.value)
    sandbox.set_faults({"http_500": 1.0})

    error = track(sandbox, ORDER)

    assert isinstance(error, CarrierHTTPStatusError)
    assert (error.status_code, error.retryable) == (500, True)
    assert sandbox.stats()["faults"] == {"http_500": 1}


def test_a_hang_longer_than_the_timeout_is_a_timeout(sandbox: SandboxHandle) -> None:
    sandbox.add_order(KEY, ORDER, status=Status.IN_TRANSIT.value)
    sandbox.set_faults({"timeout": 1.0, "hang_seconds": 5})

    error = track(sandbox, ORDER, timeout=0.2)

    assert isinstance(error, CarrierTimeout)
    assert error.retryable


def test_a_dropped_connection_is_a_transport_error_after_one_attempt(
    sandbox: SandboxHandle,
) -> None:
    sandbox.add_order(KEY, ORDER, status=Status.IN_TRANSIT.value)
    sandbox.set_faults({"timeout": 1.0, "hang_seconds": 0.05})

    error = track(sandbox, ORDER, timeout=5)

    assert type(error) is CarrierTransportError
    assert error.retryable
    assert requests_of(sandbox) == 1  # no silent resend: each attempt costs quota


def test_malformed_answers_are_retryable_errors_of_their_kind(sandbox: SandboxHandle) -> None:
    sandbox.add_order(KEY, ORDER, status=Status.IN_TRANSIT.value)
    sandbox.set_faults({"malformed": 1.0})

    async def track_many() -> list[TrackingResult | CarrierError]:
        async with CarrierClient(sandbox.base_url) as carrier:
            outcomes: list[TrackingResult | CarrierError] = []
            for _ in range(24):
                try:
                    outcomes.append(await carrier.track(ORDER, KEY))
                except CarrierError as error:
                    outcomes.append(error)
            return outcomes

    outcomes = asyncio.run(track_many())

    assert all(isinstance(o, CarrierError) and o.retryable for o in outcomes)
    html_or_cut = [o for o in outcomes if isinstance(o, MalformedResponse)]
    gateway = [o for o in outcomes if isinstance(o, CarrierHTTPStatusError)]
    assert len(html_or_cut) + len(gateway) == len(outcomes)
    assert {str(o).split(": ", 1)[1].split(" (")[0] for o in html_or_cut} == {
        "response was HTML, not JSON",
        "response was not valid JSON",
    }
    assert gateway and all(o.status_code == 502 for o in gateway)


def test_a_slow_answer_within_the_timeout_is_read_and_beyond_it_times_out(
    sandbox: SandboxHandle,
) -> None:
    sandbox.add_order(KEY, ORDER, status=Status.IN_TRANSIT.value)
    sandbox.set_faults({"slow_ms": [300, 300]})

    assert isinstance(track(sandbox, ORDER, timeout=2), TrackingResult)
    assert isinstance(track(sandbox, ORDER, timeout=0.1), CarrierTimeout)


def test_faults_changed_at_run_time_take_effect_at_once(sandbox: SandboxHandle) -> None:
    sandbox.add_order(KEY, ORDER, status=Status.IN_TRANSIT.value)
    sandbox.set_faults({"http_500": 1.0})
    assert isinstance(track(sandbox, ORDER), CarrierHTTPStatusError)

    sandbox.set_faults({})

    assert isinstance(track(sandbox, ORDER), TrackingResult)


def test_many_concurrent_lookups_cost_one_request_each(sandbox: SandboxHandle) -> None:
    codes = [f"SGN{n:09d}" for n in range(40)]
    for n, code in enumerate(codes):
        sandbox.add_order(KEY, code, status=list(Status)[n % len(Status)].value)

    async def track_all() -> list[TrackingResult]:
        async with CarrierClient(sandbox.base_url, max_connections=8) as carrier:
            return await asyncio.gather(*(carrier.track(code, KEY) for code in codes))

    results = asyncio.run(track_all())

    assert [r.order_code for r in results] == codes
    assert [r.status for r in results] == [list(Status)[n % len(Status)] for n in range(40)]
    assert sandbox.stats()["requests"]["per_key"] == {KEY: 40}
