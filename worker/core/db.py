"""Database engines and sessions, and migrations to head."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config


def migrations_folder() -> Path:
    """The alembic scripts: inside the package when installed from a wheel, else the checkout's."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "migrations"
    return installed if (installed / "env.py").is_file() else package.parent / "migrations"


_engines: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    """One pooled engine per database URL and process."""
    if url not in _engines:
        _engines[url] = create_engine(
            url,
            pool_pre_ping=True,  # a restarted PostgreSQL must not fail the next task
            pool_size=5,
            max_overflow=10,
            connect_args={"connect_timeout": 10},
        )
    return _engines[url]


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (`postgresql+psycopg://...`) as psycopg itself takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def dispose_engines() -> None:
    """Close every pooled connection of this process."""
    while _engines:
        _engines.popitem()[1].dispose()


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def transaction(url: str) -> Iterator[Session]:
    """A session whose work commits at the end of the block, or rolls back on error."""
    with session_factory(url).begin() as session:
        yield session


def alembic_config(url: str) -> Config:
    # Imported here: alembic costs a fifth of a second, and only migrations need it.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_folder()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database to `revision`."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
