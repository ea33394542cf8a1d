"""The ledger's schema history: Alembic migrations (migrations/) over the SQLModel metadata of worker/ledger.py.

`stkpush db upgrade` runs them; the web app and the worker call `require_migrated` at start-up and refuse to run
on a database whose schema is behind (or ahead of) the code. `schema_drift` compares the migrated database with
the models, so a model change without its migration is caught by a test rather than in production.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlmodel import SQLModel

import worker.ledger  # noqa: F401  (registers the tables on SQLModel.metadata)

__all__ = [
    "MIGRATIONS_DIR",
    "DatabaseNotMigrated",
    "current_revisions",
    "head_revisions",
    "migration_problem",
    "require_migrated",
    "schema_drift",
    "upgrade",
]

log = logging.getLogger("stkpush.migrations")

# Beside the worker package in the source tree (and in the Docker image, which copies the tree).
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
NOT_MIGRATED = "database is not migrated: run `stkpush db upgrade`"
# Any constant works: it only has to be the same in every process that migrates this database.
_PG_LOCK_KEY = 0x57C9_0001


class DatabaseNotMigrated(RuntimeError):
    """The database's schema is not the one this code was written for. The message says what to do."""


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revisions() -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(MigrationContext.configure(connection).get_current_heads())


def _ledger_tables_exist(connection: Connection) -> bool:
    names = set(inspect(connection).get_table_names())
    return bool(names & set(SQLModel.metadata.tables))


def _drift(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, SQLModel.metadata))


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (the newest by default). Safe to run again, and from several processes."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Two deploys migrating at once would both try to create the same tables: take turns.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        before = set(MigrationContext.configure(connection).get_current_heads())
        if not before and _ledger_tables_exist(connection):
            _adopt(connection)
        command.upgrade(alembic_config(connection), revision)
    after = current_revisions(engine)
    if after != before:
        log.info("database schema upgraded from %s to %s", _names(before), _names(after))


def _names(revisions: set[str]) -> str:
    return ", ".join(sorted(revisions)) or "nothing"


def _adopt(connection: Connection) -> None:
    """Tables made by `create_all` before migrations existed: adopt them only if they already match the models."""
    differences = _drift(connection)
    if differences:
        raise DatabaseNotMigrated(
            "database has stkpush tables but no migration history, and they differ from this version's schema "
            f"({len(differences)} differences): back it up, then bring it to a known revision with "
            "`alembic stamp <revision>` and run `stkpush db upgrade`"
        )
    command.stamp(alembic_config(connection), "head")
    log.warning("database had the current schema but no migration history: stamped it as migrated")


def require_migrated(engine: Engine) -> None:
    """Raise DatabaseNotMigrated unless the database is exactly at the migrations' head."""
    heads = head_revisions()
    current = current_revisions(engine)
    if current == heads:
        return
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current - known:
        raise DatabaseNotMigrated(
            f"database is at revision {_names(current)}, which this version of stkpush does not know: "
            "it was migrated by a newer release; deploy that release (or downgrade the database)"
        )
    at = _names(current) if current else "no revision"
    raise DatabaseNotMigrated(f"{NOT_MIGRATED} (database at {at}, this version needs {_names(heads)})")


def migration_problem(engine: Engine) -> DatabaseNotMigrated | None:
    """Why the database is not usable by this code, or None; for callers that met a database error first and
    want to say "run `stkpush db upgrade`" rather than "no such table". Never raises for a broken database."""
    try:
        require_migrated(engine)
    except DatabaseNotMigrated as problem:
        return problem
    except Exception:  # the database itself is unreachable: the caller's own error says more
        return None
    return None


def schema_drift(engine: Engine) -> list[Any]:
    """Differences between the database and the models (empty when the migrations describe the models)."""
    with engine.connect() as connection:
        return _drift(connection)
