"""Two ingestions of one file at the same time (two operators, or an upload retried while the first still runs):
every row is recorded once, whichever run records it, and the other run counts it as skipped. On PostgreSQL the
loser's INSERT ... ON CONFLICT DO NOTHING waits for the winner's commit and then records nothing."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from producers.batch import BatchReport, ingest_batch
from tests.integration.batch.conftest import HEADER, payments_with_references
from worker import runtime
from worker.ledger import BatchState, create_schema
from worker.local.stack import Stack

ROWS = 3000


@pytest.fixture
def on_postgres(batch_stack: Stack, postgres_url: str) -> Iterator[None]:
    """This process's ledger on PostgreSQL (a private schema); the broker stays the stack's Redis."""
    saved = os.environ["DATABASE_URL"]
    os.environ["DATABASE_URL"] = postgres_url
    runtime.reset()
    create_schema(runtime.engine())
    try:
        yield
    finally:
        runtime.engine().dispose()
        os.environ["DATABASE_URL"] = saved
        runtime.reset()


def ingest_twice_at_once(path: Path) -> list[BatchReport]:
    reports: list[BatchReport] = []
    start = threading.Barrier(2)

    def run() -> None:
        start.wait()
        reports.append(ingest_batch(path, chunk_rows=500))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(reports) == 2
    return reports


def check_each_row_recorded_once(prefix: str, reports: list[BatchReport]) -> None:
    assert {report.state for report in reports} == {BatchState.INGESTED}
    assert sum(report.counts.rows_recorded for report in reports) == ROWS
    for report in reports:
        assert report.counts.rows_recorded + report.counts.rows_skipped == ROWS
        assert (report.counts.rows_rejected, report.counts.rows_conflicting) == (0, 0)
    recorded = payments_with_references([f"{prefix}{n}" for n in range(ROWS)])
    assert len(recorded) == ROWS


def same_file(prefix: str, write_file: Callable[..., Path]) -> Path:
    return write_file(
        "twice.csv", HEADER + "".join(f"{prefix}{n},0716{n:06d},{n % 50 + 1},\n" for n in range(ROWS))
    )


def test_one_file_ingested_twice_at_once_records_each_row_once(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    check_each_row_recorded_once(prefix, ingest_twice_at_once(same_file(prefix, write_file)))


@pytest.mark.postgres
def test_one_file_ingested_twice_at_once_on_postgresql_records_each_row_once(
    on_postgres: None, prefix: str, write_file: Callable[..., Path]
) -> None:
    check_each_row_recorded_once(prefix, ingest_twice_at_once(same_file(prefix, write_file)))
