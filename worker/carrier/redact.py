"""Keeping carrier API keys out of messages, exceptions and the HTTP libraries' logs.

API keys travel in the query string of every tracking URL, and the HTTP libraries put that URL
into log lines and exception messages; everything here removes the key before it can travel on.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import quote, quote_plus

__all__ = ["redact", "redact_http_logs", "scrubbed", "secret_forms"]

_REDACTED = "[redacted]"
_APIKEY_PARAM = re.compile(r"(apikey=)[^&\s'\"#]*", re.IGNORECASE)
# The HTTP libraries log full request URLs (httpx at INFO) and describe responses, connections
# and exceptions with them; records made by these loggers are redacted before any handler.
_LOGGERS_SEEING_URLS = (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.proxy",
    "aiohttp.client",
    "aiohttp.internal",
    "asyncio",
    "py.warnings",
)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with every `secrets` form and every `apikey=` query value replaced."""
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    return _APIKEY_PARAM.sub(rf"\1{_REDACTED}", text)


def secret_forms(api_key: str) -> tuple[str, ...]:
    """The key as written and as it may appear percent-encoded in a URL, longest first."""
    forms = {api_key, quote(api_key, safe=""), quote_plus(api_key, safe="")}
    return tuple(sorted(forms, key=len, reverse=True))


class _RedactApiKeys(logging.Filter):
    """Replaces `apikey=` query values in a record's message, traceback and stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            if _APIKEY_PARAM.search(message):
                record.msg, record.args = redact(message), None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
            if record.stack_info:
                record.stack_info = redact(record.stack_info)
        except Exception:  # noqa: S110 - a broken record is the logging system's to report
            pass
        return True


_LOG_FILTER = _RedactApiKeys()


def redact_http_logs() -> None:
    """Installs the redacting filter once on every logger that may see a carrier URL."""
    for name in _LOGGERS_SEEING_URLS:
        logger = logging.getLogger(name)
        if _LOG_FILTER not in logger.filters:
            logger.addFilter(_LOG_FILTER)


def scrubbed(error: BaseException, secrets: tuple[str, ...]) -> BaseException | None:
    """`error` with the key removed from its message and its causes', or None if it cannot be.

    aiohttp and httpx put the request URL, key included, into some exception messages; a
    traceback logged later would print them. A cause whose text cannot be cleaned is cut off.
    """
    if not _scrub(error, secrets):
        return None
    current, seen = error, {id(error)}
    while True:
        cause = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        if cause is None or id(cause) in seen:
            return error
        seen.add(id(cause))
        if not _scrub(cause, secrets):
            current.__cause__ = current.__context__ = None
            current.__suppress_context__ = True
            return error
        current = cause


def _scrub(error: BaseException, secrets: tuple[str, ...]) -> bool:
    """Redacts the key in `error`'s arguments; whether its text is now free of the key."""
    try:
        error.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in error.args)
        text = f"{error}{error!r}"
    except Exception:
        return False
    return not any(secret in text for secret in secrets)
