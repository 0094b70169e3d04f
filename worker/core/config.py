"""Configuration: every `SHIPMON_*` environment variable, validated once, with actionable errors."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Self
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Shorter keys are guessable, or a key file cut short; HKDF would accept them all the same.
MIN_SECRET_KEY_LENGTH = 32


class ConfigError(Exception):
    """The configuration cannot be used; the message says which variable and what to do."""


def mask_url(url: str) -> str:
    """The URL with any user and password in it replaced by `***`, for showing to people.

    Database and Redis URLs carry passwords, and a webhook URL may carry credentials of the
    merchant's receiver (`https://user:pass@host/...`): none is ever printed or mailed whole.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        # Not a URL one can take apart safely: show nothing of what might be a password.
        return "(unreadable URL)" if "@" in url else url
    if "@" not in parts.netloc:
        return url
    netloc = "***@" + (host or "") + (f":{port}" if port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _url_with_scheme(value: str, schemes: tuple[str, ...], what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.query or parts.path):
        raise ValueError(
            f"{mask_url(value)!r} is not a {what} URL; expected a URL starting with "
            + " or ".join(f"{s}://" for s in schemes)
        )
    return value


def _postgres_url(value: str) -> str:
    _url_with_scheme(value, ("postgresql", "postgres", "postgresql+psycopg"), "PostgreSQL")
    # SQLAlchemy needs the driver named; users write the plain libpq form.
    scheme, rest = value.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme != "postgresql+psycopg" else value


def _redis_url(value: str) -> str:
    return _url_with_scheme(value, ("redis", "rediss", "unix"), "Redis")


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{mask_url(value)!r} is not an http:// or https:// URL")
    return value.rstrip("/")


def _smtp_url(value: SecretStr) -> SecretStr:
    parts = urlsplit(value.get_secret_value())
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        # The URL may carry a password: never echo it back.
        raise ValueError("expected smtp://[user:password@]host[:port] or smtps://...")
    return value


PostgresURL = Annotated[str, AfterValidator(_postgres_url)]
RedisURL = Annotated[str, AfterValidator(_redis_url)]
HttpURL = Annotated[str, AfterValidator(_http_url)]
SmtpURL = Annotated[SecretStr, AfterValidator(_smtp_url)]


class Settings(BaseSettings):
    """shipmon's settings, read from `SHIPMON_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SHIPMON_", extra="ignore", frozen=True)

    database_url: PostgresURL | None = Field(
        None, description="PostgreSQL URL; unset: an embedded PostgreSQL under SHIPMON_HOME."
    )
    redis_url: RedisURL | None = Field(
        None, description="Redis URL for quota counters and the broker; unset: an embedded Redis."
    )
    broker_url: RedisURL | None = Field(
        None, description="Celery broker URL; defaults to SHIPMON_REDIS_URL."
    )
    home: Path = Field(Path(".shipmon"), description="State folder for the embedded servers.")
    embedded_idle_timeout: float = Field(
        600.0,
        ge=0,
        description="Seconds the embedded servers stay up after the last command using them.",
    )
    carrier_base_url: HttpURL = Field(
        "https://tracking.247express.vn", description="Base URL of the carrier's tracking API."
    )
    key_daily_quota: int = Field(
        200_000, gt=0, description="Lookups allowed per API key per carrier day."
    )
    global_daily_quota: int = Field(
        3_000_000, gt=0, description="Lookups allowed in total per carrier day."
    )
    quota_timezone: str = Field(
        "Asia/Ho_Chi_Minh", description="Timezone whose midnight starts the carrier day."
    )
    smtp_url: SmtpURL | None = Field(
        None, description="Outgoing mail server, smtp:// or smtps://; unset: email is off."
    )
    smtp_user: str | None = Field(None, description="SMTP user, if not in SHIPMON_SMTP_URL.")
    smtp_password: SecretStr | None = Field(
        None, description="SMTP password, if not in SHIPMON_SMTP_URL."
    )
    email_from: str = Field("shipmon@localhost", description="Sender address of emails.")
    templates_dir: Path | None = Field(
        None,
        description="Folder whose email/event.*.j2 files replace the built-in email templates.",
    )
    secret_key: SecretStr | None = Field(
        None,
        min_length=MIN_SECRET_KEY_LENGTH,
        description="Encrypts API keys and webhook secrets at rest (32+ characters); "
        "generated into SHIPMON_HOME with the embedded servers, required otherwise.",
    )
    old_secret_keys: Annotated[list[SecretStr], NoDecode] = Field(
        [],
        description="Comma-separated keys that stored secrets may still be encrypted with, "
        "while `shipmon secrets rotate` re-encrypts them with SHIPMON_SECRET_KEY.",
    )
    max_poll_interval: int | None = Field(
        None,
        gt=0,
        description="Longest time in seconds between two polls of an open shipment (24 hours "
        "when unset), while the key's quota can afford it; else twice what it affords.",
    )
    webhook_allow_private: bool = Field(
        False, description="Allow webhook endpoints on private and loopback addresses."
    )
    poll_concurrency: int = Field(
        32, gt=0, description="Carrier requests in flight per worker process."
    )
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING or ERROR.")
    retention_days: int = Field(
        180, gt=0, description="Days a finished shipment and its events are kept."
    )
    stalled_floor_hours: float = Field(
        48,
        gt=0,
        description="Shortest time without a new scan or status before an open shipment is "
        "called stalled; longer where the learned normal stay in its status is longer.",
    )
    api_port: int = Field(
        8000, ge=0, le=65535, description="Port of the HTTP API started by `shipmon run`."
    )
    api_rate_limit: int = Field(
        50, gt=0, description="HTTP API requests per second allowed per token, in every process."
    )

    @field_validator("quota_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{value!r} is not a known timezone; use an IANA name like Asia/Ho_Chi_Minh"
            ) from None
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"{value!r} is not a log level; use DEBUG, INFO, WARNING or ERROR")
        return level

    @field_validator("old_secret_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("old_secret_keys")
    @classmethod
    def _long_enough(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(len(k.get_secret_value()) < MIN_SECRET_KEY_LENGTH for k in value):
            raise ValueError(
                f"every old key has {MIN_SECRET_KEY_LENGTH}+ characters; one given is shorter "
                "(check the commas between keys)"
            )
        return value

    @model_validator(mode="after")
    def _whole_or_embedded(self) -> Self:
        # Half a configuration would give each host an embedded server of its own: its own
        # quota counters, its own database.
        if (self.database_url is None) != (self.redis_url is None):
            missing = "REDIS_URL" if self.redis_url is None else "DATABASE_URL"
            raise ValueError(
                f"SHIPMON_{missing} is unset while the other server's URL is set: set both "
                "SHIPMON_DATABASE_URL and SHIPMON_REDIS_URL for shared servers, or neither "
                "for embedded ones under SHIPMON_HOME"
            )
        if self.database_url is not None and self.secret_key is None:
            raise ValueError(
                "SHIPMON_SECRET_KEY is required when SHIPMON_DATABASE_URL and SHIPMON_REDIS_URL "
                "are set: set it to a random string of 32+ characters and keep it safe "
                "(it decrypts the stored API keys and webhook secrets)"
            )
        return self

    @property
    def timezone(self) -> ZoneInfo:
        return ZoneInfo(self.quota_timezone)


def load_settings() -> Settings:
    """Read the environment, turning validation errors into one readable ConfigError."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            if not error["loc"]:  # a rule across settings names its variables itself
                lines.append(error["msg"].removeprefix("Value error, "))
                continue
            name = "SHIPMON_" + "_".join(str(p) for p in error["loc"]).upper()
            lines.append(f"{name}: {error['msg']}")
        raise ConfigError("Invalid configuration:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return load_settings()
