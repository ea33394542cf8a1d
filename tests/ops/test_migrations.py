"""Alembic migrations: forward from empty on SQLite and PostgreSQL, exactly the models (no drift), and the web
app and the worker refuse an unmigrated database with a message saying what to run."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text
from sqlmodel import SQLModel

from tests.ops.conftest import BIN, clean_environ, settings_env
from worker.ledger import create_schema, make_engine
from worker.local.embedded_redis import free_port
from worker.migrations import (
    NOT_MIGRATED,
    DatabaseNotMigrated,
    alembic_config,
    current_revisions,
    head_revisions,
    require_migrated,
    schema_drift,
    upgrade,
)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    # The session's private schema is shared by the module's tests: start each from empty.
    with engine.begin() as connection:
        schema = connection.execute(text("SELECT current_schema()")).scalar_one()
        assert schema.startswith("stkpush_test_"), schema
        for table in (
            "payment",
            "batch",
            "event",
            "webhook_endpoint",
            "webhook_delivery",
            "webhook_attempt",
            "alembic_version",
        ):
            connection.execute(text(f'DROP TABLE IF EXISTS "{table}" CASCADE'))
        for enum in ("paymentstate", "batchstate", "deliverystate"):
            connection.execute(text(f'DROP TYPE IF EXISTS "{enum}"'))
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_engine(request: pytest.FixtureRequest) -> Engine:
    engine: Engine = request.getfixturevalue(f"{request.param}_engine")
    return engine


def test_migrations_run_forward_from_an_empty_database(empty_engine: Engine) -> None:
    assert inspect(empty_engine).get_table_names() == []
    upgrade(empty_engine)
    assert set(inspect(empty_engine).get_table_names()) == {
        "payment",
        "batch",
        "event",
        "webhook_endpoint",
        "webhook_delivery",
        "webhook_attempt",
        "alembic_version",
    }
    assert current_revisions(empty_engine) == head_revisions()
    require_migrated(empty_engine)
    upgrade(empty_engine)  # again: nothing to do
    assert current_revisions(empty_engine) == head_revisions()


def test_migrations_describe_exactly_the_models(empty_engine: Engine) -> None:
    # What `alembic check` does: autogenerate against the migrated database must find nothing to add.
    upgrade(empty_engine)
    assert set(SQLModel.metadata.tables) == {
        "payment",
        "batch",
        "event",
        "webhook_endpoint",
        "webhook_delivery",
        "webhook_attempt",
    }
    assert schema_drift(empty_engine) == []


def test_a_model_change_without_its_migration_is_caught(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    with empty_engine.begin() as connection:
        connection.execute(text("ALTER TABLE batch ADD COLUMN stray_column INTEGER"))
    differences = schema_drift(empty_engine)
    assert [(kind, column.name) for kind, _schema, _table, column in differences] == [
        ("remove_column", "stray_column")
    ]


def test_migrations_go_down_to_empty_and_up_again(empty_engine: Engine) -> None:
    from alembic import command

    upgrade(empty_engine)
    with empty_engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert set(inspect(empty_engine).get_table_names()) <= {"alembic_version"}
    upgrade(empty_engine)
    assert schema_drift(empty_engine) == []


def test_an_unmigrated_database_is_refused_with_what_to_run(sqlite_engine: Engine) -> None:
    with pytest.raises(DatabaseNotMigrated) as refused:
        require_migrated(sqlite_engine)
    assert str(refused.value).startswith("database is not migrated: run `stkpush db upgrade`")
    assert NOT_MIGRATED == "database is not migrated: run `stkpush db upgrade`"


def test_a_database_from_a_newer_release_is_refused(sqlite_engine: Engine) -> None:
    upgrade(sqlite_engine)
    with sqlite_engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    with pytest.raises(DatabaseNotMigrated, match="does not know"):
        require_migrated(sqlite_engine)


def test_tables_made_by_create_all_are_adopted_when_they_match(sqlite_engine: Engine) -> None:
    create_schema(sqlite_engine)
    upgrade(sqlite_engine)
    require_migrated(sqlite_engine)


def test_tables_that_differ_without_history_are_refused(sqlite_engine: Engine) -> None:
    create_schema(sqlite_engine)
    with sqlite_engine.begin() as connection:
        connection.execute(text("ALTER TABLE payment ADD COLUMN stray_column INTEGER"))
    with pytest.raises(DatabaseNotMigrated, match="no migration history"):
        upgrade(sqlite_engine)


# ---- the commands and the processes ---------------------------------------------------------------------------


def _env(tmp_path: Path, redis_url: str = "redis://127.0.0.1:1/0") -> dict[str, str]:
    database_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    return {
        **clean_environ(),
        **settings_env(
            redis_url=redis_url, database_url=database_url, account="mig", web_url="http://127.0.0.1:1"
        ),
    }


def test_stkpush_db_upgrade_and_check(tmp_path: Path) -> None:
    env = _env(tmp_path)

    def stkpush(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "stkpush"), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    before = stkpush("db", "check")
    assert before.returncode == 1 and NOT_MIGRATED in before.stderr
    upgraded = stkpush("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"revision {', '.join(sorted(head_revisions()))}" in upgraded.stdout
    after = stkpush("db", "check")
    assert after.returncode == 0 and "matches the models" in after.stdout


def test_the_worker_refuses_to_start_on_an_unmigrated_database(tmp_path: Path, ops_redis_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "single", "--pool", "solo"],
        env=_env(tmp_path, ops_redis_url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert NOT_MIGRATED in result.stderr


def test_the_web_app_refuses_to_start_on_an_unmigrated_database(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "stkpush"), "web", "--port", str(free_port())],
        env=_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert NOT_MIGRATED in result.stderr
    assert "Application startup failed" in result.stderr
