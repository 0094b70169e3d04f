"""Encryption at rest for API keys and webhook secrets, keyed by SHIPMON_SECRET_KEY."""

from __future__ import annotations

import base64
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


class SecretKeyMismatch(Exception):
    """A stored secret cannot be decrypted with the configured SHIPMON_SECRET_KEY."""


@lru_cache(maxsize=4)
def _fernet(secret_key: str) -> Fernet:
    # Any string of 32+ characters works as a secret key; HKDF turns it into a cipher key.
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"shipmon at-rest encryption"
    ).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def encrypt(plaintext: str, secret_key: str) -> str:
    """The plaintext, encrypted and authenticated, as URL-safe text."""
    return _fernet(secret_key).encrypt(plaintext.encode()).decode()


def decrypt(token: str, secret_key: str) -> str:
    """The plaintext of `encrypt`'s output."""
    try:
        return _fernet(secret_key).decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretKeyMismatch(
            "a stored secret cannot be decrypted: SHIPMON_SECRET_KEY differs from the key it "
            "was stored with; set the original key"
        ) from None
