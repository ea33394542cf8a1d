"""Batches share the bulk lane by turns, over the real stack: Redis, two `celery worker` processes, beat, the sandbox.

Given a batch of 1,000 rows and one of 20 queued right after it, when both run, then the small one finishes before
the large one is a tenth done: its 20 messages sit behind 1,000 on the bulk queue, but every bulk message is a turn
that goes to the batch with the fewest sends in flight.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func
from sqlmodel import col, select

from producers.batch import ingest_batch
from tests.support import running_stack
from worker import runtime
from worker.ledger import TERMINAL_STATES, Payment, session_scope
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack

HEADER = "external_reference,phone_number,amount,customer_name\n"
LARGE, SMALL = 1000, 20


@pytest.fixture(scope="module")
def turns_stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    scenario = {"seed": 21, "callback_delay_s": 0.3, "default": "success"}
    with running_stack(redis_server, 12, scenario=scenario, workers=2) as stack:
        yield stack


def _done(batch_id: str) -> int:
    with session_scope(runtime.engine()) as session:
        return int(
            session.exec(
                select(func.count()).where(
                    col(Payment.batch_id) == batch_id, col(Payment.state).in_(list(TERMINAL_STATES))
                )
            ).one()
        )


def test_a_small_batch_finishes_before_a_large_one_queued_ahead_of_it_is_a_tenth_done(
    turns_stack: Stack, tmp_path: Path
) -> None:
    large, small = tmp_path / "large.csv", tmp_path / "small.csv"
    large.write_text(HEADER + "".join(f"BIG-{n},0730{n:06d},10,\n" for n in range(LARGE)))
    small.write_text(HEADER + "".join(f"SMALL-{n},0731{n:06d},10,\n" for n in range(SMALL)))
    started = time.monotonic()
    large_batch = ingest_batch(large)
    small_batch = ingest_batch(small)
    assert (large_batch.counts.rows_queued, small_batch.counts.rows_queued) == (LARGE, SMALL)

    deadline = time.monotonic() + 120
    while _done(small_batch.batch_id) < SMALL:
        assert time.monotonic() < deadline, f"small batch: {_done(small_batch.batch_id)} of {SMALL} done"
        time.sleep(0.1)
    large_done = _done(large_batch.batch_id)
    print(
        f"\nsmall batch ({SMALL} rows) finished {time.monotonic() - started:.1f}s after ingestion began; "
        f"the large batch ({LARGE} rows, queued first) had {large_done} done ({100 * large_done / LARGE:.1f}%)"
    )
    assert large_done < LARGE // 10
    assert turns_stack.sandbox_stats()["rule_triggers_total"] == 0
