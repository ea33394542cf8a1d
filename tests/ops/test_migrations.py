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

LEDGER_TABLES = {
    "payment",
    "batch",
    "send_attempt",
    "guard_block",
    "external_failure",
    "phone_release",
    "payment_reopen",
    "unknown_lookup",
    "account",
    "event",
    "webhook_endpoint",
    "webhook_delivery",
    "webhook_attempt",
}


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
        for table in (*SQLModel.metadata.tables, "alembic_version"):
            connection.execute(text(f'DROP TABLE IF EXISTS "{table}" CASCADE'))
        for enum in (
            "paymentstate",
            "batchstate",
            "attemptoutcome",
            "guardblockkind",
            "webhookdeliverystate",
            "deliverystate",
        ):
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
    # Every table of the models, made by the migrations alone (the drift check compares their columns)
    assert set(inspect(empty_engine).get_table_names()) == {*LEDGER_TABLES, "alembic_version"}
    assert current_revisions(empty_engine) == head_revisions()
    require_migrated(empty_engine)
    upgrade(empty_engine)  # again: nothing to do
    assert current_revisions(empty_engine) == head_revisions()


def test_migrations_describe_exactly_the_models(empty_engine: Engine) -> None:
    # What `alembic check` does: autogenerate against the migrated database must find nothing to add.
    upgrade(empty_engine)
    assert set(SQLModel.metadata.tables) == LEDGER_TABLES
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


def test_held_callbacks_migration_carries_existing_payments_over_and_back(empty_engine: Engine) -> None:
    # Migration 0005 (issue 15) adds payment.held_callbacks: rows recorded at 0001 survive it, both ways.
    from alembic import command

    upgrade(empty_engine, "0001")
    with empty_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO payment (id, account, external_reference, phone, amount, channel_id, queue, state, "
                "attempts, checkout_request_id, created_at, updated_at) VALUES ('p1', 'acct', 'INV-1', "
                "'254712345678', 10, 2133, 'single', 'AWAITING_CALLBACK', 0, 'ws_CO_1', :now, :now)"
            ),
            {"now": "2026-12-01 10:00:00"},
        )
    upgrade(empty_engine)
    with empty_engine.connect() as connection:
        row = connection.execute(
            text("SELECT state, checkout_request_id, held_callbacks FROM payment WHERE id = 'p1'")
        ).one()
    assert tuple(row) == ("AWAITING_CALLBACK", "ws_CO_1", None)
    assert schema_drift(empty_engine) == []
    with empty_engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0001")
    assert "held_callbacks" not in {c["name"] for c in inspect(empty_engine).get_columns("payment")}
    with empty_engine.connect() as connection:
        assert connection.execute(text("SELECT external_reference FROM payment")).scalars().all() == ["INV-1"]
    # Leave the schema at head, as the other tests do: later tests share the session's PostgreSQL schema.
    upgrade(empty_engine)
    with empty_engine.begin() as connection:
        connection.execute(text("DELETE FROM send_attempt"))  # the 0002 data migration gave it an attempt
        connection.execute(text("DELETE FROM payment"))


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


def _refused_start(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a process that should refuse to start; it must exit non-zero saying the database is not migrated."""
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert NOT_MIGRATED in result.stderr
    return result


def test_the_worker_refuses_to_start_on_an_unmigrated_database(tmp_path: Path, ops_redis_url: str) -> None:
    _refused_start(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "single", "--pool", "solo"],
        _env(tmp_path, ops_redis_url),
        tmp_path,
    )


def test_the_web_app_refuses_to_start_on_an_unmigrated_database(tmp_path: Path) -> None:
    result = _refused_start(
        [str(BIN / "stkpush"), "web", "--port", str(free_port())], _env(tmp_path), tmp_path
    )
    assert "Application startup failed" in result.stderr


def test_send_attempts_migration_carries_existing_payments_over(empty_engine: Engine) -> None:
    # Given a ledger at 0001 with payments in flight, ended, and waiting
    upgrade(empty_engine, "0001")
    rows = {
        "p_await": ("AWAITING_CALLBACK", "p_await.ab12", "2026-11-30 10:00:00", None),
        "p_unknown": ("UNKNOWN", "p_unknown.cd34", "2026-11-30 10:01:00", None),
        "p_ok": ("SUCCEEDED", "p_ok.ef56", "2026-11-30 09:00:00", "2026-11-30 09:01:00"),
        "p_cancel": ("CANCELLED", None, "2026-11-30 08:00:00", "2026-11-30 08:01:00"),
        "p_unsent": ("FAILED", "p_unsent.aa11", None, "2026-11-30 07:00:00"),
        "p_wait": ("DEFERRED", None, None, None),
    }
    with empty_engine.begin() as connection:
        for number, (payment_id, (state, token, sent_at, settled_at)) in enumerate(rows.items()):
            connection.execute(
                text(
                    "INSERT INTO payment (id, account, external_reference, phone, amount, channel_id, queue, "
                    "state, attempts, guard_token, created_at, updated_at, sent_at, settled_at) VALUES (:id, "
                    "'acct', :ref, '254712345678', 10, 2133, 'bulk', :state, 0, :token, '2026-11-30 06:00:00', "
                    "'2026-11-30 11:00:00', :sent_at, :settled_at)"
                ),
                {
                    "id": payment_id,
                    "ref": f"INV-{number}",
                    "state": state,
                    "token": token,
                    "sent_at": sent_at,
                    "settled_at": settled_at,
                },
            )
    # When it is migrated to the head
    upgrade(empty_engine)
    # Then every claimed or sent payment has one attempt, named by its guard token, with what the guard knew
    with empty_engine.connect() as connection:
        attempts = {
            row.payment_id: row
            for row in connection.execute(
                text("SELECT payment_id, id, lane, outcome, sent_at, guard_resolved_at FROM send_attempt")
            )
        }
        tokens = {
            row.id: row.guard_token for row in connection.execute(text("SELECT id, guard_token FROM payment"))
        }
    assert set(attempts) == {"p_await", "p_unknown", "p_ok", "p_cancel", "p_unsent"}
    assert attempts["p_await"].id == "p_await.ab12" and attempts["p_await"].outcome is None
    assert attempts["p_unknown"].outcome is None and attempts["p_unknown"].guard_resolved_at is None
    assert attempts["p_ok"].outcome == "SUCCESS" and attempts["p_ok"].guard_resolved_at is not None
    assert attempts["p_cancel"].outcome == "FAILURE" and attempts["p_cancel"].id == "p_cancel.m1"
    assert attempts["p_unsent"].outcome == "RELEASED"
    assert attempts["p_await"].lane == "bulk"
    assert tokens["p_cancel"] == "p_cancel.m1" and tokens["p_wait"] is None
    assert schema_drift(empty_engine) == []
    # The PostgreSQL schema is shared with later modules: leave its tables empty.
    with empty_engine.begin() as connection:
        connection.execute(text("DELETE FROM send_attempt"))
        connection.execute(text("DELETE FROM payment"))
