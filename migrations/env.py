"""Alembic environment: migrations are production code, so they run with timeouts.

The URL comes from the caller (`shipmon db upgrade`) or, for plain `alembic` commands, from
the same settings the worker uses.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from worker.domain.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    # Set by `shipmon db upgrade`; the plain `alembic` command has no .ini and uses settings.
    if config.file_config.has_section(config.config_ini_section):
        url = config.get_main_option("sqlalchemy.url")
        if url:
            return url
    from worker.core.config import get_settings
    from worker.core.servers import resolve

    return resolve(get_settings()).database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url())
    with engine.connect() as connection:
        # Never wait behind a long lock on a live table, and never hang a deploy.
        connection.execute(text("SET lock_timeout = '5s'"))
        connection.execute(text("SET statement_timeout = '10min'"))
        # End the implicit transaction the SETs began, so each migration commits its own.
        connection.commit()
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=True,
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
