"""Bad input: order codes, accounts and endpoints that must be refused cleanly.

Every refused order code gets the carrier's own error code, nothing of it is stored, and the
valid codes sent alongside it are registered as if it had not been there. Accounts, endpoints
and email recipients with malformed or huge values are refused by the command line with a
readable error (exit status 2), never a traceback, and leave nothing behind.
"""

from __future__ import annotations

import json
import secrets
import socket
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from tests.conftest import RunServers, make_account
from worker.carrier.errors import CarrierError
from worker.carrier.parse import TrackingResult, parse_tracking
from worker.cli import app
from worker.core.config import get_settings
from worker.core.db import transaction
from worker.domain.models import Account, EmailRecipient, Shipment, WebhookEndpoint
from worker.domain.vocabulary import ErrorCode
from worker.tracking.intake import register_orders

ALLOWED = frozenset(string.ascii_letters + string.digits + "_-")

# The list of bad order codes, each with the carrier's error code for it.
BAD_CODES: list[tuple[str, ErrorCode]] = [
    ("", ErrorCode.MISSING_ORDERCODE),
    ("ABCD", ErrorCode.ORDERCODE_MIN_LENGTH),
    ("A" * 21, ErrorCode.ORDERCODE_MAX_LENGTH),
    ("SPX 12345", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    (" SPX12345", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ("SPX12345\n", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ("ĐƠNHÀNG0001", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ("Mãvậnđơn99", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ("📦📦📦📦📦", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ("SPX📦12345", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ("ＳＰＸ１２３４５", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),  # full-width letters and digits
    ("SPX'12345", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ('SPX"12345', ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ("1' OR '1'='1", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ("x');DROP TABLE x;--", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ("'; DROP TABLE shipments; --", ErrorCode.ORDERCODE_MAX_LENGTH),
    ("SPX\x0012345", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ("\x00\x00\x00\x00\x00", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ("SPX%2712345", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
    ("SPX/../12345", ErrorCode.ORDERCODE_FORMAT_EXCEPTION),
]


def expected_error(code: str) -> ErrorCode | None:
    """The carrier's rule, written out: present, 5 to 20 characters, ASCII letters, digits, _-."""
    if code == "":
        return ErrorCode.MISSING_ORDERCODE
    if len(code) < 5:
        return ErrorCode.ORDERCODE_MIN_LENGTH
    if len(code) > 20:
        return ErrorCode.ORDERCODE_MAX_LENGTH
    if not set(code) <= ALLOWED:
        return ErrorCode.ORDERCODE_FORMAT_EXCEPTION
    return None


def codes_of(session: Session, account: Account) -> list[str]:
    return list(
        session.scalars(
            select(Shipment.order_code)
            .where(Shipment.account_id == account.id)
            .order_by(Shipment.order_code)
        )
    )


# --- Intake ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "error"), BAD_CODES, ids=[repr(c)[:24] for c, _ in BAD_CODES])
def test_a_bad_code_is_refused_with_the_carriers_error_and_nothing_stored(
    session: Session, code: str, error: ErrorCode
) -> None:
    account = make_account(session)
    neighbour = make_account(session)
    register_orders(session, neighbour.name, ["NEIGHBOUR01"])

    result = register_orders(session, account.name, ["GOOD00001", code, "GOOD00002"])

    assert [(r.order_code, r.error) for r in result.refused] == [(code, error)]
    assert result.registered == ["GOOD00001", "GOOD00002"]
    assert codes_of(session, account) == ["GOOD00001", "GOOD00002"]
    assert codes_of(session, neighbour) == ["NEIGHBOUR01"]
    # The answer a Celery caller gets back is JSON, with the code exactly as it was sent.
    answer = json.loads(json.dumps(result.as_dict()))
    assert answer["refused"] == [{"order_code": code, "error": error.value}]


def test_ten_thousand_bad_codes_at_once_are_each_refused(session: Session) -> None:
    account = make_account(session)
    register_orders(session, account.name, ["KEPT00001"])
    bad = [f"BAD {i:05d}" for i in range(10_000)]

    result = register_orders(session, account.name, [*bad, "GOOD00001"])

    assert len(result.refused) == 10_000
    assert {r.error for r in result.refused} == {ErrorCode.ORDERCODE_FORMAT_EXCEPTION}
    assert [r.order_code for r in result.refused] == bad
    assert result.registered == ["GOOD00001"]
    assert codes_of(session, account) == ["GOOD00001", "KEPT00001"]


def test_thousands_of_good_codes_at_once_are_registered_once(session: Session) -> None:
    account = make_account(session)
    # More than one INSERT statement holds.
    good = [f"BULK{i:06d}" for i in range(2_500)]

    first = register_orders(session, account.name, good + good[:10])
    again = register_orders(session, account.name, good)

    assert first.registered == good
    assert again.already_registered == good
    assert session.scalar(select(func.count()).where(Shipment.account_id == account.id)) == 2_500


@pytest.mark.parametrize("code", [12345678, 1.5, None, ["SPX12345"], {"code": "SPX12345"}, True])
def test_a_code_that_is_no_string_is_refused_not_a_crash(session: Session, code: Any) -> None:
    # A merchant's backend sends JSON to the Celery task: numbers, nulls and lists happen.
    account = make_account(session)

    result = register_orders(session, account.name, ["GOOD00001", code])

    assert [r.order_code for r in result.refused] == [code]
    assert result.refused[0].error in (
        ErrorCode.MISSING_ORDERCODE,
        ErrorCode.ORDERCODE_FORMAT_EXCEPTION,
    )
    assert codes_of(session, account) == ["GOOD00001"]


# Mostly codes near the rule's edges: allowed characters with now and then one that is not.
code_text = st.text(
    alphabet=st.sampled_from(sorted(ALLOWED)) | st.sampled_from(list(" 'ĐàÀ📦\x00\n;%é-_")),
    max_size=24,
) | st.text(max_size=24)


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(code_text, max_size=8))
def test_intake_stores_exactly_the_codes_the_carrier_would_accept(
    session: Session, codes: list[str]
) -> None:
    account = make_account(session)

    result = register_orders(session, account.name, codes)

    accepted = [c for c in dict.fromkeys(codes) if expected_error(c) is None]
    assert result.registered == accepted
    assert [(r.order_code, r.error) for r in result.refused] == [
        (c, expected_error(c)) for c in codes if expected_error(c) is not None
    ]
    assert codes_of(session, account) == sorted(accepted)


# --- The carrier parser: no status row is ever dropped silently -------------------------------

STATUS_SPELLINGS = ["21", 23, "DANGVANCHUYEN", "DANGDIPHAT", "PHATTHANHCONG", "Delivered"]
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["", "2026-13-40 25:61:00", "yesterday", "0001-01-01T00:00:00"])
)


def parsed_or_error(raw: bytes, order_code: str) -> TrackingResult | CarrierError:
    try:
        return parse_tracking(raw, order_code)
    except CarrierError as error:
        return error


def tracking_answer(order_code: str, rows: list[dict[str, Any]]) -> bytes:
    return json.dumps(
        {"errorCode": None, "errorMessage": None, "orderCode": order_code, "statuses": rows},
        ensure_ascii=False,
    ).encode()


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.lists(st.sampled_from(STATUS_SPELLINGS), min_size=1, max_size=6),
    st.data(),
)
def test_a_damaged_status_row_fails_the_whole_answer_or_is_kept(
    spellings: list[Any], data: st.DataObject
) -> None:
    rows: list[dict[str, Any]] = [
        {
            "time": (T0 + timedelta(hours=i)).isoformat(),
            "status": spelling,
            "statusName": None,
            "trackingName": None,
        }
        for i, spelling in enumerate(spellings)
    ]
    damaged = data.draw(st.integers(0, len(rows) - 1))
    field = data.draw(st.sampled_from(["time", "status", "statusName"]))
    if data.draw(st.booleans()):
        rows[damaged][field] = data.draw(json_scalars)
    else:
        del rows[damaged][field]

    result = parsed_or_error(tracking_answer("SPX12345", rows), "SPX12345")
    if isinstance(result, CarrierError):
        # Refused whole: the poll counts as failed, nothing of the answer is recorded.
        assert result.order_code == "SPX12345"
        return
    # Taken as an answer: then every row the carrier sent is in it, in the carrier's order.
    assert len(result.statuses) == len(rows)
    intact = [i for i in range(len(rows)) if i != damaged]
    for i in intact:
        assert result.statuses[i].time == T0 + timedelta(hours=i)


# --- Accounts, endpoints and recipients through the command line ------------------------------


@dataclass
class Shipmon:
    """Runs `shipmon` commands in this process against the test servers, and remembers the
    account names the test used so they can be deleted."""

    servers: RunServers
    runner: CliRunner = field(default_factory=CliRunner)
    names: list[str] = field(default_factory=list)

    def __call__(self, *args: str, input: str | None = None, **env: str) -> Result:
        get_settings.cache_clear()
        try:
            return self.runner.invoke(app, list(args), input=input, env=self.servers.env(**env))
        finally:
            get_settings.cache_clear()


@pytest.fixture
def shipmon(servers: RunServers) -> Iterator[Shipmon]:
    run = Shipmon(servers)
    yield run
    with transaction(servers.database_url) as s:
        s.execute(delete(Account).where(Account.name.in_(run.names)))


def new_account(shipmon: Shipmon) -> str:
    name = f"bad-input-{secrets.token_hex(4)}"
    shipmon.names.append(name)
    added = shipmon("account", "add", name, "--api-key", f"KEY-{secrets.token_hex(8)}")
    assert added.exit_code == 0, added.output
    return name


def stored(servers: RunServers, model: type[Any], **where: Any) -> int:
    with transaction(servers.database_url) as s:
        query = select(func.count()).select_from(model)
        for column, value in where.items():
            query = query.where(getattr(model, column) == value)
        return int(s.scalar(query) or 0)


def account_id(servers: RunServers, name: str) -> int:
    with transaction(servers.database_url) as s:
        return s.scalars(select(Account.id).where(Account.name == name)).one()


def assert_refused(result: Result) -> None:
    """Refused the way the command line refuses: status 2, a message, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "error" in result.output.lower() or "invalid" in result.output.lower()
    assert "Traceback" not in result.output


def test_track_refuses_bad_codes_from_arguments_stdin_and_files(
    shipmon: Shipmon, servers: RunServers, tmp_path: Path
) -> None:
    name = new_account(shipmon)
    argv_codes = [c for c, _ in BAD_CODES if c and "\x00" not in c]
    from_args = shipmon("track", "--account", name, "GOOD00001", *argv_codes)
    assert from_args.exit_code == 1
    for code in argv_codes:
        assert f"{code!r}\t" in from_args.stdout
    # Standard input and files cannot carry a newline inside a code, but can carry a NUL byte.
    from_stdin = shipmon("track", "--account", name, "-", input="GOOD00002\nSPX\x0012345\n")
    assert from_stdin.exit_code == 1
    assert "'SPX\\x0012345'\tORDERCODE_FORMAT_EXCEPTION" in from_stdin.stdout
    many = tmp_path / "codes.txt"
    many.write_text("\n".join(f"BAD {i}" for i in range(10_000)) + "\nGOOD00003\n")
    from_file = shipmon("track", "--account", name, "--file", str(many), "--json")
    assert from_file.exit_code == 1
    answer = json.loads(from_file.stdout)
    assert len(answer["refused"]) == 10_000
    assert answer["registered"] == ["GOOD00003"]

    with transaction(servers.database_url) as s:
        account = s.scalars(select(Account).where(Account.name == name)).one()
        assert codes_of(s, account) == ["GOOD00001", "GOOD00002", "GOOD00003"]


@pytest.mark.parametrize(
    "name",
    ["", "has space", "ĐơnHàng", "a" * 101, "-leading-dash", "x';DROP TABLE accounts;--", "a\x00b"],
    ids=["empty", "space", "vietnamese", "101-chars", "dash", "sql", "nul"],
)
def test_account_add_refuses_a_bad_name(shipmon: Shipmon, servers: RunServers, name: str) -> None:
    before = stored(servers, Account)
    assert_refused(shipmon("account", "add", name, "--api-key", "KEY-12345678"))
    assert stored(servers, Account) == before


@pytest.mark.parametrize(
    "args",
    [
        ["--api-key", ""],
        ["--api-key", "has space"],
        ["--api-key", "k" * 201],
        ["--api-key", "khóa-bí-mật"],
        ["--api-key", "KEY-1", "--daily-quota", "0"],
        ["--api-key", "KEY-1", "--daily-quota", "-5"],
        ["--api-key", "KEY-1", "--daily-quota", str(10**12)],
        ["--api-key", "KEY-1", "--ops-email", "nobody"],
        ["--api-key", "KEY-1", "--ops-email", "a" * 400 + "@example.com"],
    ],
    ids=[
        "empty-key", "spaced-key", "huge-key", "vietnamese-key", "zero-quota", "negative-quota",
        "huge-quota", "bad-email", "huge-email",
    ],
)  # fmt: skip
def test_account_add_refuses_bad_values(
    shipmon: Shipmon, servers: RunServers, args: list[str]
) -> None:
    name = f"bad-input-{secrets.token_hex(4)}"
    shipmon.names.append(name)
    assert_refused(shipmon("account", "add", name, *args))
    assert stored(servers, Account, name=name) == 0


@pytest.mark.parametrize(
    "key_input",
    ["", "\n", "has space\n", "k" * 5000, "khóa-bí-mật\n", "KEY-\x00-1\n"],
    ids=["nothing", "empty-line", "spaced", "huge-line", "vietnamese", "nul"],
)
def test_account_add_refuses_a_bad_key_from_standard_input(
    shipmon: Shipmon, servers: RunServers, key_input: str
) -> None:
    name = f"bad-input-{secrets.token_hex(4)}"
    shipmon.names.append(name)
    assert_refused(shipmon("account", "add", name, "--api-key", "-", input=key_input))
    assert stored(servers, Account, name=name) == 0


def test_account_add_refuses_a_duplicate_name_and_keeps_the_first(
    shipmon: Shipmon, servers: RunServers
) -> None:
    name = new_account(shipmon)
    first_id = account_id(servers, name)
    assert_refused(shipmon("account", "add", name, "--api-key", "ANOTHER-KEY"))
    assert "already exists" in shipmon("account", "add", name, "--api-key", "K-2").output
    assert stored(servers, Account, name=name) == 1
    assert account_id(servers, name) == first_id


BAD_URLS = [
    "not a url",
    "example.com/hook",
    "ftp://example.com/hook",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "http://",
    "http:///hook",
    "http://example.com:99999/hook",
    "http://example.com:port/hook",
    "https://" + "a" * 10_000 + ".example.com/hook",
    "https://example.com/" + "p" * 100_000,
]


@pytest.mark.parametrize(
    "url",
    BAD_URLS,
    ids=["words", "no-scheme", "ftp", "file", "javascript", "gopher", "no-host", "empty-host",
         "port-range", "port-text", "huge-host", "huge-path"],
)  # fmt: skip
def test_endpoint_add_refuses_a_url_it_cannot_call(
    shipmon: Shipmon, servers: RunServers, url: str
) -> None:
    name = new_account(shipmon)
    owner = account_id(servers, name)
    refused = shipmon("endpoint", "add", name, url, SHIPMON_WEBHOOK_ALLOW_PRIVATE="true")
    assert_refused(refused)
    assert stored(servers, WebhookEndpoint, account_id=owner) == 0


def test_endpoint_add_refuses_an_unknown_account(shipmon: Shipmon, servers: RunServers) -> None:
    before = stored(servers, WebhookEndpoint)
    refused = shipmon("endpoint", "add", "nobody-" + secrets.token_hex(4), "https://example.com/h")
    assert_refused(refused)
    assert stored(servers, WebhookEndpoint) == before


@pytest.mark.parametrize(
    "address",
    ["nobody", "two@@example.com", "a b@example.com", "a" * 400 + "@example.com", "x@y\x00.com"],
    ids=["no-at", "two-ats", "space", "huge", "nul"],
)
def test_email_add_refuses_a_bad_address(
    shipmon: Shipmon, servers: RunServers, address: str
) -> None:
    name = new_account(shipmon)
    owner = account_id(servers, name)
    assert_refused(shipmon("email", "add", name, address))
    assert stored(servers, EmailRecipient, account_id=owner) == 0


def test_email_add_refuses_a_duplicate_recipient(shipmon: Shipmon, servers: RunServers) -> None:
    name = new_account(shipmon)
    owner = account_id(servers, name)
    assert shipmon("email", "add", name, "ops@example.com").exit_code == 0
    assert_refused(shipmon("email", "add", name, "ops@example.com"))
    assert stored(servers, EmailRecipient, account_id=owner) == 1


def test_endpoint_add_warns_of_a_host_that_does_not_resolve_yet_and_adds_it(
    shipmon: Shipmon, servers: RunServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        # Answered here, as a resolver without the name would: no lookup leaves the machine.
        if host == "hooks.not-yet.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host == "hooks.inside.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 0))]
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    name = new_account(shipmon)
    owner = account_id(servers, name)
    added = shipmon("endpoint", "add", name, "https://hooks.not-yet.example/in", "--json")
    assert added.exit_code == 0, added.output
    assert "warning: hooks.not-yet.example does not resolve" in added.output
    assert "checked at every delivery" in added.output
    assert stored(servers, WebhookEndpoint, account_id=owner) == 1
    # A name that resolves to a private address is still refused at once.
    refused = shipmon("endpoint", "add", name, "https://hooks.inside.example/in")
    assert_refused(refused)
    assert "10.0.0.7" in refused.output
    assert stored(servers, WebhookEndpoint, account_id=owner) == 1
