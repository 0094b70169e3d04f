"""Encryption at rest for API keys and webhook secrets, keyed by SHIPMON_SECRET_KEY."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
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


@lru_cache(maxsize=8)
def _digest_key(secret_key: str) -> bytes:
    # A key of its own, so a digest reveals nothing about the cipher key.
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"shipmon lookup digest"
    ).derive(secret_key.encode())


def keyed_digest(text: str, secret_key: str) -> str:
    """HMAC-SHA256 of `text` under a key derived from `secret_key`: finds a secret by value."""
    return hmac.new(_digest_key(secret_key), text.encode(), hashlib.sha256).hexdigest()


# scrypt's cost: about 16 MiB and tens of milliseconds a check, as OWASP suggests for it.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    """A salted scrypt hash of `password`, as `scrypt$N$r$p$salt$hash` (hex)."""
    salt = os.urandom(16)
    derived = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${derived.hex()}"


def password_matches(password: str, stored: str) -> bool:
    """Whether `password` is the one `stored` (from `hash_password`) was made from."""
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        derived = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p)
        )
    except ValueError:
        return False
    return scheme == "scrypt" and hmac.compare_digest(derived.hex(), expected)
