"""A batch's payments wait on the bulk queue; a single payment that arrives later is still sent first."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producers import enqueue_payment
from producers.batch import ingest_batch
from tests.integration.batch.conftest import HEADER, payments_with_references, queue_length
from tests.support import running_stack
from worker import runtime
from worker.ledger import get_payment
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack


@pytest.fixture
def idle_stack(redis_server: EmbeddedRedis, batch_stack: Stack) -> Iterator[Stack]:
    """A stack of its own with no worker yet: messages wait on the broker until the test starts one."""
    batch_stack.deactivate()
    scenario = {"callback_delay_s": 0.05, "default": "success"}
    try:
        with running_stack(redis_server, 7, scenario=scenario, workers=0, beat=False) as stack:
            yield stack
    finally:
        batch_stack.activate()


def test_a_single_payment_overtakes_a_waiting_batch(idle_stack: Stack, tmp_path: Path) -> None:
    rows = "".join(f"FAIR-{n},0714{n:06d},{n},\n" for n in range(1, 31))
    path = tmp_path / "waiting.csv"
    path.write_text(HEADER + rows)
    report = ingest_batch(path)
    assert report.counts.rows_queued == 30 and queue_length(idle_stack) == 30

    single = enqueue_payment(amount=99, phone_number="0715000001", external_reference="FAIR-SINGLE")
    assert single.queued and queue_length(idle_stack, "single") == 1
    idle_stack.start_worker("worker1", concurrency=1)

    deadline = time.monotonic() + 30
    batch = payments_with_references([f"FAIR-{n}" for n in range(1, 31)])
    while time.monotonic() < deadline and sum(p.sent_at is not None for p in batch) < 3:
        time.sleep(0.2)
        batch = payments_with_references([f"FAIR-{n}" for n in range(1, 31)])
    sent_single = get_payment(runtime.engine(), single.id)
    assert sent_single is not None and sent_single.sent_at is not None
    batch_sent = [p.sent_at for p in batch if p.sent_at is not None]
    assert len(batch_sent) >= 3, "the worker should have moved on to the batch"
    assert sent_single.sent_at < min(batch_sent)
