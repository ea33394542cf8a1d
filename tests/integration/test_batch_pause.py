"""A batch that burns the budget stops itself, over the real stack: Redis, two `celery worker` processes, beat, the
sandbox over HTTP (which refuses a channel id that is not the account's with a 400, as UpesiPay would).

Given a batch whose rows name a wrong channel id, another good batch and single payments at the same time, when
they run, then the bad batch pauses after at most K pushes, its other rows held (not failed), `stkpush
batch-status` says why, and the rest goes on; `stkpush batch-resume` lets it try again (and pause again).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from producers import enqueue_payment
from producers.batch import batch_status, ingest_batch
from tests.support import running_stack, wait_for_state
from worker import runtime
from worker.batch_brake import HELD_PREFIX
from worker.cli import main
from worker.ledger import Payment, PaymentState, session_scope
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import SANDBOX_CHANNEL_ID, Stack

HEADER = "external_reference,phone_number,amount,customer_name,channel_id\n"
WRONG_CHANNEL = 9999
K = 5


@pytest.fixture(scope="module")
def pause_stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    scenario = {"seed": 13, "callback_delay_s": 0.2, "default": "success", "channels": [SANDBOX_CHANNEL_ID]}
    env = {"BATCH_PAUSE_REJECTIONS": str(K)}
    with running_stack(redis_server, 13, scenario=scenario, workers=2, extra_env=env) as stack:
        yield stack


def _rows(batch_id: str) -> list[Payment]:
    with session_scope(runtime.engine()) as session:
        return list(session.query(Payment).filter(Payment.batch_id == batch_id))  # type: ignore[arg-type]


def _wait_paused(batch_id: str, timeout_s: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = batch_status(batch_id)
        assert status is not None
        if status["paused"]:
            return status
        assert time.monotonic() < deadline, (
            f"batch not paused after {timeout_s}s: {status['payments_by_state']}"
        )
        time.sleep(0.1)


def _settled(batch_id: str, states: frozenset[PaymentState], timeout_s: float = 30) -> list[Payment]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = _rows(batch_id)
        if all(row.state in states for row in rows):
            return rows
        assert time.monotonic() < deadline, f"rows still {sorted({row.state.value for row in rows})}"
        time.sleep(0.1)


def test_a_batch_with_a_wrong_channel_pauses_after_at_most_k_pushes_and_the_rest_goes_on(
    pause_stack: Stack, tmp_path: Path
) -> None:
    bad, good = tmp_path / "wrong-channel.csv", tmp_path / "good.csv"
    bad.write_text(HEADER + "".join(f"BAD-{n},0720{n:06d},10,,{WRONG_CHANNEL}\n" for n in range(40)))
    good.write_text(HEADER + "".join(f"GOOD-{n},0721{n:06d},10,,\n" for n in range(15)))
    bad_batch = ingest_batch(bad).batch_id
    good_batch = ingest_batch(good).batch_id
    singles = [enqueue_payment(amount=20, phone_number=f"0722{n:06d}") for n in range(3)]

    status = _wait_paused(bad_batch)
    assert f"{K} rejections in a row with the same error" in str(status["pause_reason"])
    # Give any send already under way time to land, then count what reached UpesiPay.
    time.sleep(1.0)
    rows = _rows(bad_batch)
    rejected = [row for row in rows if row.state == PaymentState.REJECTED]
    held = [row for row in rows if row.state == PaymentState.DEFERRED]
    assert 1 <= len(rejected) <= K
    assert len(rejected) + len(held) == len(rows)  # nothing failed, nothing else sent
    assert all((row.reason or "").startswith(HELD_PREFIX) and row.next_attempt_at is None for row in held)
    refused = pause_stack.sandbox_stats()["requests_refused"]
    assert refused["rejected"] == len(rejected)  # type: ignore[index]

    # The other batch and the single payments go on.
    good_rows = _settled(good_batch, frozenset({PaymentState.SUCCEEDED}))
    assert len(good_rows) == 15
    for handle in singles:
        assert wait_for_state(handle.id).state == PaymentState.SUCCEEDED
    assert not batch_status(good_batch)["paused"]  # type: ignore[index]

    shown = CliRunner().invoke(main, ["batch-status", bad_batch])
    assert shown.exit_code == 0, shown.output
    assert "PAUSED since" in shown.output and "rejections in a row" in shown.output
    print(f"\nwrong-channel batch: {len(rejected)} pushes rejected, {len(held)} rows held; {shown.output}")

    resumed = CliRunner().invoke(main, ["batch-resume", bad_batch])
    assert resumed.exit_code == 0, resumed.output
    assert f"{len(held)} held payments released" in resumed.output
    # Still the wrong channel: it pauses again after at most K more pushes.
    _wait_paused(bad_batch)
    time.sleep(1.0)
    again = [row for row in _rows(bad_batch) if row.state == PaymentState.REJECTED]
    assert len(rejected) < len(again) <= len(rejected) + K
    assert CliRunner().invoke(main, ["batch-resume", good_batch]).exit_code == 3  # not paused
