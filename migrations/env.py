"""Alembic's environment: migrations target the SQLModel metadata of worker/ledger.py.

`stkpush db upgrade` (worker/migrations.py) hands in an open connection through `config.attributes`; the
`alembic` command line (alembic.ini) connects to the settings' DATABASE_URL instead. Logging is left alone: the
process that runs the migration has already configured it (worker/logs.py).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import worker.ledger  # noqa: F401  (registers the payment and batch tables on SQLModel.metadata)

config = context.config
target_metadata = SQLModel.metadata


def configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: batch mode rebuilds the table, so later migrations work on both.
        render_as_batch=connection.dialect.name == "sqlite",
    )


def run_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or _settings_url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from worker.ledger import make_engine

    engine = make_engine(config.get_main_option("sqlalchemy.url") or _settings_url())
    try:
        with engine.begin() as own_connection:
            configure(own_connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


def _settings_url() -> str:
    from worker.settings import get_settings

    return get_settings().sqlalchemy_url


if context.is_offline_mode():
    run_offline()
else:
    run_online()
