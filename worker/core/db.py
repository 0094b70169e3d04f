"""Database engines and sessions, and migrations to head."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import ARRAY, Column, Engine, String, bindparam, create_engine, func
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.selectable import TableValuedAlias

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


def unnested(*columns: Column[Any]) -> TableValuedAlias:
    """Rows passed as one array parameter per column (named by `as_arrays`), unnested by
    PostgreSQL, with these columns' names and types.

    A statement over them has the same SQL whatever the number of rows, so SQLAlchemy compiles
    it once, psycopg parses it once and PostgreSQL prepares it; a VALUES list or an IN list of
    bound rows is a new statement for every row count, parsed anew each time once it holds over
    50 parameters.
    """
    # Each array is cast to its type (`%(name)s::BIGINT[]`), VARCHAR without its length: a
    # cast to VARCHAR(n) would cut what the column would refuse.
    arrays = [
        bindparam(c.key, type_=ARRAY(String() if isinstance(c.type, String) else c.type))
        for c in columns
    ]
    return func.unnest(*arrays).table_valued(*(c.key for c in columns)).render_derived()


def as_arrays(rows: Iterable[Mapping[str, Any]], columns: Iterable[str]) -> dict[str, list[Any]]:
    """The parameters of `unnested` for these rows: each column's values, in row order."""
    listed = list(rows)
    return {name: [row[name] for row in listed] for name in columns}
