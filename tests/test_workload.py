"""The carrier's world: workload parsing, drawn lifecycles and the tracking bodies they show."""

from __future__ import annotations

import copy
import itertools
import json
import re
import statistics
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from worker.domain.vocabulary import ErrorCode, Status, validate_order_code
from worker.sim.workload import (
    DEFAULT_WORKLOAD,
    Carrier,
    ConflictError,
    UnknownAccountError,
    UnknownOrderError,
    Workload,
    WorkloadError,
    default_workload,
    generate_orders,
    load_workload,
    parse_workload,
)

VN = ZoneInfo("Asia/Ho_Chi_Minh")
# A Monday morning, local time.
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=VN)
KEY = "1111-1111-1111-1111-111111111"
OTHER_KEY = "2222-2222-2222-2222-222222222"
ISO7 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}\+07:00$")
LOCAL = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
NEVER_FOUND = {"unknown_hours": {"lognormal": {"median": 5, "sigma": 0}}, "never_found": 1.0}


@pytest.fixture
def workload() -> Workload:
    return default_workload()


def make_carrier(workload: Workload, seed: int = 7, **options: Any) -> Carrier:
    carrier = Carrier(workload, seed=seed, **options)
    carrier.add_account("shop-a", KEY)
    carrier.add_account("shop-b", OTHER_KEY)
    return carrier


def workload_with(**changes: Any) -> Workload:
    data = copy.deepcopy(DEFAULT_WORKLOAD)
    data.update(changes)
    return parse_workload(data)


def local(at: datetime) -> datetime:
    return at.astimezone(VN)


# --- workload files ---


def test_the_builtin_workload_matches_the_reference_shape(workload: Workload) -> None:
    assert workload.initial is Status.ACCEPTED
    assert workload.statuses[Status.DELIVERING].next[Status.DELIVERED] == pytest.approx(0.86)
    assert workload.statuses[Status.PENDING_FOR_PROCEED].delay_codes[2] == pytest.approx(0.25)
    assert workload.faults.slow_ms == (80, 900)


def test_load_workload_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_text(json.dumps(DEFAULT_WORKLOAD), encoding="utf-8")
    assert load_workload(path) == default_workload()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not JSON"),
        ("[]", "must hold a JSON object"),
        (json.dumps({**DEFAULT_WORKLOAD, "initial": "SHIPPED"}), "initial"),
        (json.dumps({**DEFAULT_WORKLOAD, "timezone": "Mars/Olympus"}), "unknown time zone"),
    ],
)
def test_bad_workload_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(WorkloadError, match=message):
        load_workload(path)


def test_a_missing_workload_file_is_a_workload_error(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="cannot read"):
        load_workload(tmp_path / "absent.json")


def test_next_probabilities_must_sum_to_one() -> None:
    data = copy.deepcopy(DEFAULT_WORKLOAD)
    data["statuses"]["DELIVERING"]["next"] = {"DELIVERED": 0.5, "PENDING_FOR_PROCEED": 0.2}
    with pytest.raises(WorkloadError, match=r"statuses\.DELIVERING\.next.*sum to 1"):
        parse_workload(data)


def test_a_lifecycle_that_can_never_end_is_refused() -> None:
    data = copy.deepcopy(DEFAULT_WORKLOAD)
    data["statuses"]["DELIVERING"]["next"] = {"PENDING_FOR_PROCEED": 1.0}
    data["statuses"]["PENDING_FOR_PROCEED"]["next"] = {"DELIVERING": 1.0}
    with pytest.raises(WorkloadError, match="no terminal status can be reached"):
        parse_workload(data)


def test_a_status_leading_nowhere_is_refused() -> None:
    data = copy.deepcopy(DEFAULT_WORKLOAD)
    del data["statuses"]["PENDING_FOR_RETURN"]
    with pytest.raises(WorkloadError, match="leads to PENDING_FOR_RETURN, which has no rule"):
        parse_workload(data)


# --- lifecycles ---


def test_the_same_seed_draws_the_same_world_whatever_the_creation_order(
    workload: Workload,
) -> None:
    codes = [f"ORDER{n:05d}" for n in range(40)]
    first, second, other = make_carrier(workload), make_carrier(workload), make_carrier(workload, 8)
    for code in codes:
        first.add_order(KEY, code, T0)
        other.add_order(KEY, code, T0)
    for code in reversed(codes):
        second.add_order(KEY, code, T0)
    later = T0 + timedelta(days=3)
    for code in codes:
        assert first.transitions(code) == second.transitions(code)
        assert first.tracking_body(code, later) == second.tracking_body(code, later)
    assert [first.transitions(c) for c in codes] != [other.transitions(c) for c in codes]


def test_transitions_happen_only_within_the_status_active_hours(workload: Workload) -> None:
    carrier = make_carrier(workload)
    leaves_outside = 0
    for n in range(400):
        code = f"HOURS{n:05d}"
        carrier.add_order(KEY, code, T0 + timedelta(minutes=37 * n))
        history = carrier.transitions(code)
        for (_, left), (entered, _) in itertools.pairwise(history):
            start, end = workload.statuses[left].active_hours
            if not start <= local(entered).hour < end:
                leaves_outside += 1
    assert leaves_outside == 0


def test_a_transition_due_at_night_waits_for_the_window_opening() -> None:
    # ACCEPTED always dwells exactly 1 hour and may move on only from 07:00 to 19:00.
    data = copy.deepcopy(DEFAULT_WORKLOAD)
    data["statuses"]["ACCEPTED"]["dwell_hours"] = {"lognormal": {"median": 1, "sigma": 0}}
    carrier = make_carrier(parse_workload(data))
    evening = datetime(2026, 3, 2, 18, 30, tzinfo=VN)
    carrier.add_order(KEY, "NIGHT0001", evening, status=Status.ACCEPTED)
    second = carrier.transitions("NIGHT0001")[1][0]
    assert local(second) == datetime(2026, 3, 3, 7, 0, tzinfo=VN)
    carrier.add_order(KEY, "DAY000001", datetime(2026, 3, 2, 10, 0, tzinfo=VN), status="ACCEPTED")
    assert local(carrier.transitions("DAY000001")[1][0]) == datetime(2026, 3, 2, 11, 0, tzinfo=VN)


def test_a_transition_due_on_an_inactive_day_waits_for_the_next_active_day() -> None:
    # DELIVERING dwells exactly 1 hour and moves on only from 08:00 to 20:00, Monday to Friday.
    data = copy.deepcopy(DEFAULT_WORKLOAD)
    rule = data["statuses"]["DELIVERING"]
    rule["dwell_hours"] = {"lognormal": {"median": 1, "sigma": 0}}
    rule["active_days"] = [1, 2, 3, 4, 5]
    rule["scans_per_day"] = 24
    carrier = make_carrier(parse_workload(data))
    friday_evening = datetime(2026, 3, 6, 19, 30, tzinfo=VN)
    carrier.add_order(KEY, "WEEKEND01", friday_evening, status=Status.DELIVERING)
    second = carrier.transitions("WEEKEND01")[1][0]
    assert local(second) == datetime(2026, 3, 9, 8, 0, tzinfo=VN)  # Monday's opening
    saturday_noon = datetime(2026, 3, 7, 12, 0, tzinfo=VN)
    carrier.add_order(KEY, "WEEKEND02", saturday_noon, status=Status.DELIVERING)
    assert local(carrier.transitions("WEEKEND02")[1][0]) == datetime(2026, 3, 9, 8, 0, tzinfo=VN)
    tuesday = datetime(2026, 3, 3, 10, 0, tzinfo=VN)
    carrier.add_order(KEY, "WEEKDAY01", tuesday, status=Status.DELIVERING)
    assert local(carrier.transitions("WEEKDAY01")[1][0]) == datetime(2026, 3, 3, 11, 0, tzinfo=VN)


def test_no_scans_on_an_inactive_day() -> None:
    # DELIVERING dwells exactly 100 hours, scanned on weekdays only.
    data = copy.deepcopy(DEFAULT_WORKLOAD)
    rule = data["statuses"]["DELIVERING"]
    rule["dwell_hours"] = {"lognormal": {"median": 100, "sigma": 0}}
    rule["active_days"] = [1, 2, 3, 4, 5]
    rule["scans_per_day"] = 24
    carrier = make_carrier(parse_workload(data))
    carrier.add_order(KEY, "WEEKEND03", datetime(2026, 3, 6, 9, 0, tzinfo=VN), status="DELIVERING")
    body = carrier.tracking_body("WEEKEND03", datetime(2026, 3, 10, 12, 0, tzinfo=VN))
    days = Counter(
        datetime.strptime(row["dateChange"], "%Y-%m-%d %H:%M:%S").isoweekday()
        for row in body["trackings"]
    )
    assert days[6] == days[7] == 0
    assert days[5] > 5 and days[1] > 5  # Friday's and Monday's active hours are scanned


@pytest.mark.parametrize("days", [[], [0], [8]])
def test_active_days_must_be_iso_weekdays(days: list[int]) -> None:
    data = copy.deepcopy(DEFAULT_WORKLOAD)
    data["statuses"]["DELIVERING"]["active_days"] = days
    with pytest.raises(WorkloadError, match="active_days"):
        parse_workload(data)


def test_every_day_is_active_unless_the_file_says_otherwise(workload: Workload) -> None:
    assert all(rule.active_days == set(range(1, 8)) for rule in workload.statuses.values())


def test_next_statuses_follow_the_workload_probabilities(workload: Workload) -> None:
    carrier = make_carrier(workload)
    following: Counter[Status] = Counter()
    for n in range(3000):
        code = f"NEXT{n:06d}"
        carrier.add_order(KEY, code, T0, status=Status.DELIVERING)
        following[carrier.transitions(code)[1][1]] += 1
    assert set(following) == {Status.DELIVERED, Status.PENDING_FOR_PROCEED}
    assert 0.82 < following[Status.DELIVERED] / 3000 < 0.90


def test_every_lifecycle_ends_in_a_terminal_status(workload: Workload) -> None:
    carrier = make_carrier(workload)
    endings: Counter[Status] = Counter()
    for n in range(500):
        code = f"END{n:06d}"
        carrier.add_order(KEY, code, T0, status=Status.ACCEPTED)
        history = carrier.transitions(code)
        assert [at for at, _ in history] == sorted(at for at, _ in history)
        endings[history[-1][1]] += 1
    assert all(status.terminal for status in endings)
    assert endings.most_common(1)[0][0] is Status.DELIVERED


def test_orders_are_unknown_until_the_registration_delay_has_passed(workload: Workload) -> None:
    carrier = make_carrier(workload)
    delays = []
    for n in range(1000):
        code = f"REG{n:06d}"
        carrier.add_order(KEY, code, T0)
        history = carrier.transitions(code)
        if not history:
            continue
        registered, first = history[0]
        assert first is Status.ACCEPTED
        delays.append((registered - T0).total_seconds() / 3600)
        before = carrier.tracking_body(code, registered - timedelta(seconds=1))
        assert before["errorCode"] == ErrorCode.ORDERCODE_NOT_FOUND
        assert before["orderCode"] is None
        assert carrier.tracking_body(code, registered)["orderCode"] == code
    assert 0.4 < statistics.median(delays) < 0.62  # lognormal median 0.5 h


def test_the_never_found_share_is_never_known() -> None:
    carrier = make_carrier(workload_with(registration={**NEVER_FOUND, "never_found": 0.3}))
    lost = 0
    for n in range(1000):
        code = f"GHOST{n:05d}"
        carrier.add_order(KEY, code, T0)
        if not carrier.transitions(code):
            lost += 1
            body = carrier.tracking_body(code, T0 + timedelta(days=400))
            assert body["errorCode"] == ErrorCode.ORDERCODE_NOT_FOUND
    assert 240 < lost < 360


def test_an_order_given_a_status_is_known_at_once_in_it(workload: Workload) -> None:
    carrier = make_carrier(workload)
    carrier.add_order(KEY, "KNOWN0001", T0, status="25")
    assert carrier.transitions("KNOWN0001")[0] == (T0, Status.DELIVERING)
    assert carrier.tracking_body("KNOWN0001", T0)["status"] == "25"


def test_advance_makes_the_next_transition_happen_now(workload: Workload) -> None:
    carrier = make_carrier(workload)
    carrier.add_order(KEY, "ADV000001", T0, status=Status.IN_TRANSIT)
    now = T0 + timedelta(minutes=5)
    assert carrier.advance("ADV000001", now, to=Status.PENDING_FOR_PROCEED, delay_code=12) is (
        Status.PENDING_FOR_PROCEED
    )
    history = carrier.transitions("ADV000001")
    assert history[:2] == [(T0, Status.IN_TRANSIT), (now, Status.PENDING_FOR_PROCEED)]
    assert history[-1][1].terminal
    body = carrier.tracking_body("ADV000001", now)
    assert (body["status"], body["delayCode"]) == ("16", "12")
    assert [row["status"] for row in body["statuses"]] == ["24", "16"]
    drawn = carrier.advance("ADV000001", now + timedelta(minutes=1))
    assert drawn in workload.statuses[Status.PENDING_FOR_PROCEED].next


def test_advance_registers_an_order_the_carrier_does_not_know_yet() -> None:
    carrier = make_carrier(workload_with(registration=NEVER_FOUND))
    carrier.add_order(KEY, "LATE00001", T0)
    assert carrier.transitions("LATE00001") == []
    assert carrier.advance("LATE00001", T0 + timedelta(seconds=1)) is Status.ACCEPTED
    assert carrier.transitions("LATE00001")[0] == (T0 + timedelta(seconds=1), Status.ACCEPTED)


def test_advance_refuses_an_order_that_has_ended(workload: Workload) -> None:
    carrier = make_carrier(workload)
    carrier.add_order(KEY, "DONE00001", T0, status=Status.DELIVERED)
    with pytest.raises(ConflictError, match="cannot move on"):
        carrier.advance("DONE00001", T0 + timedelta(hours=1))
    with pytest.raises(UnknownOrderError):
        carrier.advance("NOSUCH001", T0)


def test_adding_refuses_unknown_keys_duplicates_and_bad_codes(workload: Workload) -> None:
    carrier = make_carrier(workload)
    with pytest.raises(UnknownAccountError):
        carrier.add_order("no-such-key", "ORDER0001", T0)
    carrier.add_order(KEY, "ORDER0001", T0)
    with pytest.raises(ConflictError):
        carrier.add_order(OTHER_KEY, "ORDER0001", T0)
    with pytest.raises(ValueError, match="ORDERCODE_FORMAT_EXCEPTION"):
        carrier.add_order(KEY, "BAD CODE!", T0)
    with pytest.raises(ConflictError):
        carrier.add_account("again", KEY)
    with pytest.raises(ValueError, match="timezone-aware"):
        carrier.add_order(KEY, "NAIVE0001", datetime(2026, 3, 2, 9, 0))


def test_delay_codes_are_drawn_on_entering_and_cleared_by_a_new_attempt(
    workload: Workload,
) -> None:
    carrier = make_carrier(workload)
    allowed = {str(code) for code in workload.statuses[Status.PENDING_FOR_PROCEED].delay_codes}
    for n in range(200):
        code = f"DELAY{n:05d}"
        carrier.add_order(KEY, code, T0, status=Status.PENDING_FOR_PROCEED)
        assert carrier.tracking_body(code, T0)["delayCode"] in allowed
        for at, status in carrier.transitions(code)[1:]:
            body = carrier.tracking_body(code, at)
            if status in (Status.DELIVERING, Status.DELIVERED):
                assert body["delayCode"] is None
                assert body["delayNote"] is None
            elif status is Status.PENDING_FOR_RETURN:
                assert body["delayCode"] in allowed  # a return keeps the reason
                assert body["delayNote"]


def test_scans_come_at_each_change_and_at_the_daily_rate_between(workload: Workload) -> None:
    carrier = make_carrier(workload)
    in_transit_hours = 0.0
    dwell_scans = 0
    for n in range(300):
        code = f"SCAN{n:06d}"
        carrier.add_order(KEY, code, T0, status=Status.IN_TRANSIT)
        history = carrier.transitions(code)
        leave = history[1][0]
        body = carrier.tracking_body(code, leave - timedelta(microseconds=1))
        changes = len(body["statuses"])
        assert changes == 1
        dwell_scans += len(body["trackings"]) - changes
        in_transit_hours += (leave - T0).total_seconds() / 3600
        final = carrier.tracking_body(code, history[-1][0])
        scan_times = [row["dateChange"] for row in final["trackings"]]
        assert scan_times == sorted(scan_times)
        assert len(final["trackings"]) >= len(final["statuses"])
    per_day = dwell_scans / in_transit_hours * 24
    assert 2.4 < per_day < 3.6  # scans_per_day 3


# --- the tracking body ---


def test_a_delivered_body_has_the_carrier_fields_and_formats(workload: Workload) -> None:
    carrier = make_carrier(workload)
    carrier.add_order(KEY, "FMT000001", T0)
    history = carrier.transitions("FMT000001")
    end = history[-1][0]
    carrier.advance("FMT000001", end + timedelta(hours=1), to=Status.DELIVERED)
    body = carrier.tracking_body("FMT000001", end + timedelta(hours=2))
    assert body["errorCode"] is None
    assert body["errorMessage"] is None
    assert body["orderCode"] == "FMT000001"
    assert (body["status"], body["statusName"], body["trackingName"]) == (
        "30", "PHATTHANHCONG", "Phát thành công",
    )  # fmt: skip
    assert isinstance(body["externalCode"], str)
    assert body["mailerTypeID"] in {"HH", "TL"}
    assert body["receiverName"]
    assert body["calWeight"] >= body["realWeight"] > 0
    assert body["totalServiceCost"] == (
        body["price"] + body["priceFR"] + body["farRegionFeeAmount"] + body["fuelFeeAmount"]
        + body["vatAmount"]
    )  # fmt: skip
    assert (
        sum(item["cost"] for item in body["priceInfo"]) + body["vatAmount"]
        == (body["totalServiceCost"])
    )
    assert body["confirmImage"]
    assert all(url.startswith("https://") for url in body["confirmImage"])
    assert body["deliveryNotes"]
    for field in ("deliveryDate", "acceptDate"):
        assert ISO7.match(body[field]), body[field]
        assert datetime.fromisoformat(body[field]).utcoffset() == timedelta(hours=7)
    assert datetime.fromisoformat(body["deliveryDate"]) == end + timedelta(hours=1)
    assert LOCAL.match(body["estimateRoutes"])
    times = [datetime.fromisoformat(row["time"]) for row in body["statuses"]]
    assert times == sorted(times)
    assert all(ISO7.match(row["time"]) for row in body["statuses"])
    assert [row["status"] for row in body["statuses"]] == [
        str(status.carrier_id) for _, status in carrier.transitions("FMT000001")
    ]
    assert all(isinstance(row["status"], str) for row in body["statuses"])
    for row in body["trackings"]:
        assert set(row) == {
            "statusID", "statusName", "postOfficeID", "postOfficeName", "provinceID",
            "provinceName", "dateChange", "notes",
        }  # fmt: skip
        assert isinstance(row["statusID"], int)
        parsed = datetime.strptime(row["dateChange"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=VN)
        assert T0 <= parsed <= end + timedelta(hours=2)


def test_a_fresh_body_has_no_delivery_fields(workload: Workload) -> None:
    carrier = make_carrier(workload)
    carrier.add_order(KEY, "NEW000001", T0, status=Status.ACCEPTED)
    body = carrier.tracking_body("NEW000001", T0)
    assert (body["status"], body["statusName"]) == ("21", "DATIEPNHAN")
    assert body["acceptDate"] is None
    assert body["deliveryDate"] is None
    assert body["confirmImage"] == []
    assert len(body["statuses"]) == len(body["trackings"]) == 1


def test_terminal_orders_expire_after_the_lookup_period(workload: Workload) -> None:
    carrier = make_carrier(workload, query_expiry_days=90)
    carrier.add_order(KEY, "OLD000001", T0, status=Status.DELIVERED)
    assert carrier.tracking_body("OLD000001", T0 + timedelta(days=89))["status"] == "30"
    expired = carrier.tracking_body("OLD000001", T0 + timedelta(days=91))
    assert expired["errorCode"] == ErrorCode.ORDERCODE_QUERY_EXPIRED
    assert expired["errorMessage"] == ErrorCode.ORDERCODE_QUERY_EXPIRED.message


# --- lookups and quotas ---


def lookup(carrier: Carrier, apikey: str | None, code: str | None, at: datetime) -> Any:
    return json.loads(carrier.track_json(apikey, code, at))["errorCode"]


def test_lookups_check_key_then_code_then_ownership(workload: Workload) -> None:
    carrier = make_carrier(workload)
    carrier.add_order(KEY, "MINE00001", T0, status=Status.IN_TRANSIT)
    assert lookup(carrier, None, "MINE00001", T0) == "MISSING_APIKEY"
    assert lookup(carrier, "nope", "MINE00001", T0) == "APIKEY_NOT_FOUND"
    for bad in ("", "ABCD", "A" * 21, "ABC DE"):
        assert lookup(carrier, KEY, bad, T0) == validate_order_code(bad)
    assert lookup(carrier, KEY, "NOSUCH01", T0) == "ORDERCODE_NOT_FOUND"
    assert lookup(carrier, OTHER_KEY, "MINE00001", T0) == (
        "ORDERCODE_DOES_NOT_BELONG_TO_YOUR_ACCOUNT"
    )
    assert lookup(carrier, KEY, "MINE00001", T0) is None


def test_the_key_quota_runs_out_and_resets_at_local_midnight(workload: Workload) -> None:
    carrier = Carrier(workload, seed=1)
    carrier.add_account("small", KEY, daily_quota=3)
    carrier.add_order(KEY, "QUOTA0001", T0, status=Status.IN_TRANSIT)
    evening = datetime(2026, 3, 2, 23, 59, 59, tzinfo=VN)
    answers = [lookup(carrier, KEY, "QUOTA0001", evening) for _ in range(4)]
    assert answers == [None, None, None, "APIKEY_LIMIT"]
    assert carrier.usage(evening).per_key == {KEY: 4}
    midnight = datetime(2026, 3, 3, 0, 0, tzinfo=VN)
    assert lookup(carrier, KEY, "QUOTA0001", midnight) is None
    assert carrier.usage(midnight).per_key == {KEY: 1}
    assert carrier.usage(midnight).day == midnight.date()


def test_every_request_counts_toward_the_global_cap(workload: Workload) -> None:
    carrier = make_carrier(workload, global_daily_quota=3)
    carrier.add_order(KEY, "GLOBAL001", T0, status=Status.IN_TRANSIT)
    assert lookup(carrier, None, "GLOBAL001", T0) == "MISSING_APIKEY"
    assert lookup(carrier, "nope", "GLOBAL001", T0) == "APIKEY_NOT_FOUND"
    assert lookup(carrier, KEY, "GLOBAL001", T0) is None
    assert lookup(carrier, OTHER_KEY, "GLOBAL001", T0) == "APIKEY_LIMIT"
    assert carrier.usage(T0).total == 4


def test_track_returns_the_same_answer_as_track_json(workload: Workload) -> None:
    carrier = make_carrier(workload)
    carrier.add_order(KEY, "SAME00001", T0, status=Status.IN_TRANSIT)
    assert carrier.track(KEY, "SAME00001", T0) == carrier.tracking_body("SAME00001", T0)


# --- arrivals ---


def test_generated_orders_fill_each_day_weighted_to_daytime(workload: Workload) -> None:
    start = datetime(2026, 3, 2, 0, 0, tzinfo=VN)
    arrivals = list(generate_orders(workload, start, orders_per_day=2000, days=2, seed=3))
    assert len(arrivals) == 4000
    times = [at for at, _, _ in arrivals]
    assert times == sorted(times)
    assert start <= times[0]
    assert times[-1] < start + timedelta(days=2)
    codes = [code for _, _, code in arrivals]
    assert len(set(codes)) == len(codes)
    assert all(validate_order_code(code) is None for code in codes)
    hours = Counter(local(at).hour for at in times)
    assert sum(hours[h] for h in range(9, 17)) > 5 * sum(hours[h] for h in range(0, 5))
    accounts = Counter(account for _, account, _ in arrivals)
    assert 0.55 < accounts["shop-a"] / 4000 < 0.65
    assert arrivals == list(generate_orders(workload, start, orders_per_day=2000, days=2, seed=3))


def test_generated_orders_start_at_the_start_time(workload: Workload) -> None:
    noon = datetime(2026, 3, 2, 12, 0, tzinfo=VN)
    arrivals = list(generate_orders(workload, noon, orders_per_day=1000, days=1))
    assert arrivals
    assert all(noon <= at < noon + timedelta(hours=12) for at, _, _ in arrivals)
    assert len(arrivals) < 1000


def test_a_refused_advance_leaves_the_order_as_it_was(workload: Workload) -> None:
    carrier = make_carrier(workload)
    carrier.add_order(KEY, "KEEP00001", T0, status=Status.IN_TRANSIT)
    before = carrier.transitions("KEEP00001")
    with pytest.raises(ValueError, match="unknown status"):
        carrier.advance("KEEP00001", T0 + timedelta(minutes=1), to="SHIPPED")
    assert carrier.transitions("KEEP00001") == before


# --- status pushes ---


def world_with_order(workload: Workload) -> Carrier:
    world = make_carrier(workload)
    world.add_order(KEY, "EX0001", T0, status="ACCEPTED")
    return world


def test_changes_hand_out_each_drawn_transition_once_when_the_clock_passes_it(
    workload: Workload,
) -> None:
    world = world_with_order(workload)
    world.watch(T0)
    drawn = world.transitions("EX0001")[1:]  # the first was entered before watching
    assert drawn
    assert world.changes(T0) == []
    halfway = drawn[len(drawn) // 2][0]
    first = world.changes(halfway)
    assert [(c.at, c.status) for c in first] == [t for t in drawn if t[0] <= halfway]
    rest = world.changes(drawn[-1][0] + timedelta(days=1))
    assert [(c.at, c.status) for c in first + rest] == drawn
    assert world.changes(drawn[-1][0] + timedelta(days=2)) == []
    descriptions = [c.body["Description"] for c in first + rest]
    statuses = [Status.ACCEPTED, *(status for _, status in drawn)]
    assert descriptions == [
        f"Change order status: {before.code} ==> {after.code}"
        for before, after in itertools.pairwise(statuses)
    ]
    assert all(ISO7.match(c.body["Time"]) for c in first + rest)


def test_a_transition_redrawn_by_advance_is_never_handed_out(workload: Workload) -> None:
    world = world_with_order(workload)
    world.watch(T0)
    planned_at, planned = world.transitions("EX0001")[1]
    early = T0 + (planned_at - T0) / 2
    world.advance("EX0001", early, to="CANCEL")
    changes = world.changes(planned_at + timedelta(days=30))
    assert [(c.at, c.status) for c in changes] == [(early, Status.CANCEL)]
    assert planned is not Status.CANCEL


def test_nothing_is_handed_out_unwatched_or_after_unwatch(workload: Workload) -> None:
    world = world_with_order(workload)
    later = T0 + timedelta(days=30)
    assert world.changes(later) == []
    world.watch(T0)
    world.unwatch()
    assert world.changes(later) == []
