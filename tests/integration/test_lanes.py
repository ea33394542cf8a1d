"""Lanes and deadlines over the real stack: real Redis, two `celery worker` processes, beat, the sandbox over HTTP.

Given a batch whose numbers all fail or never answer, when it has used the bulk lane up, then single payments to
good numbers are still pushed at once (the interactive reserve), and a single payment that finds even the reserve
used up ends EXPIRED at its deadline without a prompt.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producers import enqueue_payment
from producers.batch import ingest_batch
from tests.support import new_reference, pushes_for, running_stack, set_scenario, wait_for_state
from worker import runtime
from worker.ledger import PaymentState
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack

HEADER = "external_reference,phone_number,amount,customer_name\n"
BATCH_ROWS = 120
# Even rows fail after the callback delay, odd rows never get a callback (they stay in flight until settled).
FAILING = {f"0716{n:06d}": ("timeout" if n % 2 == 0 else "no_callback") for n in range(BATCH_ROWS)}
SCENARIO = {"seed": 12, "callback_delay_s": 0.2, "default": "success", "phones": FAILING}
ROUNDS, PER_ROUND = 4, 5
P95_LIMIT_S = 2.0


@pytest.fixture(scope="module")
def lanes_stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    # The batch's failure-rate brake (worker/batch_brake.py, its own tests) would pause this batch before it uses the
    # lane up, depending on how fast outcomes come back: this test is about the lanes, so it is off here.
    env = {
        "INTERACTIVE_RESERVE": "10",
        "BULK_MAX_INFLIGHT": "20",
        "ACCOUNT_FAILURE_LIMIT": "50",
        "BATCH_PAUSE_OUTCOMES": "0",
    }
    with running_stack(redis_server, 12, scenario=SCENARIO, workers=2, extra_env=env) as stack:
        yield stack


def _wait_until(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached after {timeout_s}s")
        time.sleep(0.1)


def _push_seen_after(stack: Stack, started: dict[str, float], timeout_s: float = 15) -> list[float]:
    """Seconds from each reference's start until the sandbox recorded its push (polled every 10 ms)."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < len(started) and time.monotonic() < deadline:
        by_reference = stack.sandbox_stats()["pushes_by_reference"]
        now = time.monotonic()
        for reference, at in started.items():
            if reference not in seen and by_reference.get(reference, 0):  # type: ignore[attr-defined]
                seen[reference] = now - at
        time.sleep(0.01)
    missing = [r for r in started if r not in seen]
    assert not missing, f"no push recorded for {missing} within {timeout_s}s"
    return [seen[r] for r in started]


def test_single_payments_are_pushed_at_once_while_a_failing_batch_has_used_the_bulk_lane_up(
    lanes_stack: Stack, tmp_path: Path
) -> None:
    path = tmp_path / "failing.csv"
    path.write_text(HEADER + "".join(f"LANE-{n},{phone},10,\n" for n, phone in enumerate(FAILING)))
    report = ingest_batch(path)
    assert report.counts.rows_queued == BATCH_ROWS
    guard = runtime.guard()
    bulk_budget = guard.limits.bulk_budget

    def lane_used_up() -> bool:
        account = guard.account_snapshot()
        return account.bulk_headroom == 0 and account.failures_in_window + account.in_flight >= bulk_budget

    _wait_until(lane_used_up, 60, "the bulk lane used up")
    account = guard.account_snapshot()
    print(
        f"\nbulk lane used up: failures {account.failures_in_window}, in flight {account.in_flight} "
        f"(bulk {account.bulk_in_flight}), bulk headroom {account.bulk_headroom}, headroom {account.headroom}"
    )

    latencies: list[float] = []
    for round_number in range(ROUNDS):
        started: dict[str, float] = {}
        ids = []
        for i in range(PER_ROUND):
            reference = new_reference("LIVE")
            handle = enqueue_payment(
                amount=50, phone_number=f"07170{round_number}{i:04d}", external_reference=reference
            )
            started[reference] = time.monotonic()
            assert handle.queued
            ids.append(handle.id)
        latencies += _push_seen_after(lanes_stack, started)
        for payment_id in ids:
            assert wait_for_state(payment_id, timeout_s=30).state == PaymentState.SUCCEEDED
    # Still no batch row beyond the lane: the singles took the reserve, not the batch.
    assert guard.account_snapshot().bulk_headroom == 0

    p95 = statistics.quantiles(latencies, n=20, method="inclusive")[-1]
    print(
        f"enqueue_payment -> sandbox push, {len(latencies)} single payments: "
        f"median {statistics.median(latencies):.3f}s, p95 {p95:.3f}s, max {max(latencies):.3f}s"
    )
    assert p95 <= P95_LIMIT_S
    stats = lanes_stack.sandbox_stats()
    assert stats["rule_triggers_total"] == 0, stats["rule_triggers"]
    # By the provider's own count, the batch's failures stayed inside the bulk lane.
    failures: dict[str, int] = stats["failures_in_window"]  # type: ignore[assignment]
    assert sum(failures.values()) <= bulk_budget


def test_a_single_payment_that_finds_the_whole_budget_used_expires_at_its_deadline_unsent(
    lanes_stack: Stack,
) -> None:
    guard = runtime.guard()
    # Fill what is left of the budget with single payments that never get a callback: they stay in flight.
    fillers = [f"0718{i:06d}" for i in range(guard.account_snapshot().headroom)]
    set_scenario(lanes_stack, {**SCENARIO, "phones": {**FAILING, **dict.fromkeys(fillers, "no_callback")}})
    for phone in fillers:
        enqueue_payment(amount=10, phone_number=phone)
    _wait_until(lambda: guard.account_snapshot().headroom == 0, 30, "the whole budget used")

    reference = new_reference("LATE")
    handle = enqueue_payment(amount=75, phone_number="0719000001", external_reference=reference, expires_in=4)
    enqueued = time.monotonic()
    deferred = wait_for_state(handle.id, frozenset({PaymentState.DEFERRED}), timeout_s=10)
    assert deferred.reason == "guard: account_budget"
    expired = wait_for_state(handle.id, timeout_s=20)
    waited = time.monotonic() - enqueued
    print(f"\nexpired after {waited:.1f}s (deadline 4s): {expired.reason}")
    assert expired.state == PaymentState.EXPIRED
    assert waited >= 3.5  # never before its deadline (4 s from inside enqueue_payment)
    assert pushes_for(lanes_stack, reference) == 0
