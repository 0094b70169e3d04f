"""Moving stored secrets to a new SHIPMON_SECRET_KEY, and rotating one endpoint's secret."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import TEST_SECRET_KEY, RunServers, make_account
from worker.core.crypto import SecretKeyMismatch, decrypt, encrypt
from worker.domain.models import Account, WebhookEndpoint
from worker.notify.webhooks.endpoints import RotationInProgress, add_endpoint, rotate_secret
from worker.notify.webhooks.signing import signing_secrets
from worker.ops.rotation import UnreadableSecret, rotate_stored_secrets

NEW_KEY = "new-secret-key-0123456789-abcdefghijklmnop"
NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def _sessions(connection: Connection) -> sessionmaker[Session]:
    """Sessions whose commits are savepoints of the test's transaction, rolled back after it."""
    return sessionmaker(bind=connection, join_transaction_mode="create_savepoint")


def _stored(session: Session) -> list[str]:
    tokens: list[str | None] = list(session.scalars(select(Account.api_key_encrypted)))
    for e in session.scalars(select(WebhookEndpoint)):
        tokens += [e.secret_encrypted, e.previous_secret_encrypted]
    return [t for t in tokens if t is not None]


def test_rotation_reencrypts_every_secret_in_batches_and_carries_on_when_run_again(
    session: Session, connection: Connection
) -> None:
    accounts = [make_account(session, api_key=f"carrier-key-{n:04d}") for n in range(5)]
    endpoint, first = add_endpoint(
        session, accounts[0], "http://127.0.0.1:9/hook", None,
        secret_key=TEST_SECRET_KEY, allow_private=True,
    )  # fmt: skip
    second = rotate_secret(endpoint, secret_key=TEST_SECRET_KEY, now=NOW)
    # One secret already moved, as by a run that stopped half way.
    accounts[3].api_key_encrypted = encrypt("carrier-key-0003", NEW_KEY)
    session.commit()
    before = len(_stored(session))

    rotated = rotate_stored_secrets(_sessions(connection), NEW_KEY, [TEST_SECRET_KEY], batch_size=2)
    assert rotated.already_current >= 1
    assert rotated.reencrypted + rotated.already_current == before
    session.expire_all()
    for token in _stored(session):
        decrypt(token, NEW_KEY, [])  # opens with the new key alone
    for n, account in enumerate(accounts):
        assert decrypt(account.api_key_encrypted, NEW_KEY, []) == f"carrier-key-{n:04d}"
    assert signing_secrets(endpoint, NEW_KEY, NOW + timedelta(hours=1)) == [second, first]

    again = rotate_stored_secrets(_sessions(connection), NEW_KEY, [TEST_SECRET_KEY])
    assert (again.reencrypted, again.already_current) == (0, before)


def test_rotation_stops_at_a_secret_no_key_opens_and_keeps_what_it_did(
    session: Session, connection: Connection
) -> None:
    make_account(session, api_key="carrier-key-good")
    lost = make_account(session, api_key="carrier-key-lost")
    lost.api_key_encrypted = encrypt("carrier-key-lost", "an-unknown-key-" * 3)
    session.commit()
    with pytest.raises(UnreadableSecret, match="SHIPMON_OLD_SECRET_KEYS") as info:
        rotate_stored_secrets(_sessions(connection), NEW_KEY, [TEST_SECRET_KEY], batch_size=1)
    assert f"id {lost.id}" in str(info.value)
    session.expire_all()
    with pytest.raises(SecretKeyMismatch):
        decrypt(lost.api_key_encrypted, NEW_KEY, [])


def test_a_second_rotation_within_the_overlap_is_refused(session: Session) -> None:
    endpoint, first = add_endpoint(
        session, make_account(session), "http://127.0.0.1:9/hook", None,
        secret_key=TEST_SECRET_KEY, allow_private=True,
    )  # fmt: skip
    second = rotate_secret(endpoint, secret_key=TEST_SECRET_KEY, now=NOW)
    with pytest.raises(RotationInProgress, match="2026-12-03 08:00 UTC"):
        rotate_secret(endpoint, secret_key=TEST_SECRET_KEY, now=NOW + timedelta(hours=23))
    # Both secrets the receivers may hold still sign.
    assert signing_secrets(endpoint, TEST_SECRET_KEY, NOW + timedelta(hours=23)) == [
        second,
        first,
    ]
    third = rotate_secret(endpoint, secret_key=TEST_SECRET_KEY, now=NOW + timedelta(hours=24))
    later = NOW + timedelta(hours=25)
    assert signing_secrets(endpoint, TEST_SECRET_KEY, later) == [third, second]


def _shipmon(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def test_cli_rotates_keys_and_shows_webhook_urls_without_credentials(
    servers: RunServers,
) -> None:
    env = servers.env(SHIPMON_WEBHOOK_ALLOW_PRIVATE="true", SHIPMON_API_KEY="carrier-key-rotated")
    name = f"rot-{uuid.uuid4().hex[:6]}"
    assert _shipmon(env, "account", "add", name).returncode == 0
    url = "http://hook-user:hook-pass@127.0.0.1:9/hook"
    added = _shipmon(env, "endpoint", "add", name, url, "--json")
    assert added.returncode == 0, added.stderr
    assert "hook-pass" not in added.stdout
    listed = _shipmon(env, "endpoint", "list", "--account", name, "--json")
    assert json.loads(listed.stdout)[0]["url"] == "http://***@127.0.0.1:9/hook"
    endpoint_id = str(json.loads(added.stdout)["id"])
    assert _shipmon(env, "endpoint", "rotate-secret", endpoint_id).returncode == 0
    refused = _shipmon(env, "endpoint", "rotate-secret", endpoint_id)
    assert refused.returncode == 2 and "rotate again after" in refused.stderr

    without_old = _shipmon(env | {"SHIPMON_SECRET_KEY": NEW_KEY}, "secrets", "rotate")
    assert without_old.returncode == 2 and "SHIPMON_OLD_SECRET_KEYS" in without_old.stderr
    moving = env | {"SHIPMON_SECRET_KEY": NEW_KEY, "SHIPMON_OLD_SECRET_KEYS": TEST_SECRET_KEY}
    try:
        rotated = _shipmon(moving, "secrets", "rotate")
        assert rotated.returncode == 0, rotated.stderr
        assert "re-encrypted" in rotated.stdout
        # The new key alone now opens them; the old one no longer does.
        after = _shipmon(env | {"SHIPMON_SECRET_KEY": NEW_KEY}, "endpoint", "test", endpoint_id)
        assert "cannot be decrypted" not in after.stderr
        before = _shipmon(env, "endpoint", "test", endpoint_id)
        assert before.returncode == 2 and "cannot be decrypted" in before.stderr
    finally:
        # The run's database is shared with later tests, which use the test key.
        back = env | {"SHIPMON_OLD_SECRET_KEYS": NEW_KEY}
        assert _shipmon(back, "secrets", "rotate").returncode == 0
