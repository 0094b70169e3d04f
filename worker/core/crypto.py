"""Encryption at rest for API keys and webhook secrets, keyed by SHIPMON_SECRET_KEY."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from worker.core.config import MIN_SECRET_KEY_LENGTH, get_settings


class SecretKeyMismatch(Exception):
    """A stored secret cannot be decrypted with the configured SHIPMON_SECRET_KEY."""


@lru_cache(maxsize=8)
def _fernet(secret_key: str) -> Fernet:
    if len(secret_key) < MIN_SECRET_KEY_LENGTH:
        # An empty key (a key file cut short) would encrypt happily, and lose every secret.
        raise ValueError(
            f"the secret key has {len(secret_key)} characters; it needs "
            f"{MIN_SECRET_KEY_LENGTH}+: set SHIPMON_SECRET_KEY to the key the secrets were "
            "stored with"
        )
    # Any string of 32+ characters works as a secret key; HKDF turns it into a cipher key.
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"shipmon at-rest encryption"
    ).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def _keyring(secret_key: str, old_keys: Sequence[str] | None) -> MultiFernet:
    if old_keys is None:
        old_keys = [k.get_secret_value() for k in get_settings().old_secret_keys]
    return MultiFernet([_fernet(secret_key), *(_fernet(k) for k in old_keys)])


def encrypt(plaintext: str, secret_key: str) -> str:
    """The plaintext, encrypted and authenticated, as URL-safe text."""
    return _fernet(secret_key).encrypt(plaintext.encode()).decode()


def decrypt(token: str, secret_key: str, old_keys: Sequence[str] | None = None) -> str:
    """The plaintext of `encrypt`'s output, under `secret_key` or one of the old keys.

    The old keys default to SHIPMON_OLD_SECRET_KEYS, so that every process keeps reading the
    secrets `shipmon secrets rotate` has not reached yet.
    """
    try:
        return _keyring(secret_key, old_keys).decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretKeyMismatch(
            "a stored secret cannot be decrypted: SHIPMON_SECRET_KEY differs from the key it "
            "was stored with; set the original key (or, while rotating keys, list it in "
            "SHIPMON_OLD_SECRET_KEYS)"
        ) from None


def reencrypt(token: str, secret_key: str, old_keys: Sequence[str]) -> str | None:
    """The token encrypted with `secret_key`, or None when it already is."""
    try:
        _fernet(secret_key).decrypt(token.encode())
    except InvalidToken:
        return encrypt(decrypt(token, secret_key, old_keys), secret_key)
    return None
