"""Failures the merchant caused through UpesiPay's other channels (payment buttons, the dashboard) fill the same
window at the provider, so beat reads the transactions list and the guard counts them: once each, at their time,
never our own pushes twice. Over real parts: a `celery worker` and `beat`, the sandbox over HTTP, a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlmodel import col, func, select

from producers import enqueue_payment
from tests.support import running_stack, set_scenario, wait_for_state
from worker import other_channels, runtime
from worker.ledger import ExternalFailure, PaymentState, session_scope
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack

CANCELLING = "0700300001"
SCENARIO: dict[str, Any] = {
    "seed": 3,
    "callback_delay_s": 0.2,
    "default": "success",
    "phones": {CANCELLING: "cancelled"},
}


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    env = {"OTHER_CHANNELS_POLL_S": "1", "DISPATCH_INTERVAL_S": "0.5"}
    with running_stack(redis_server, 15, scenario=SCENARIO, extra_env=env) as running:
        yield running


def other_channel(stack: Stack, **body: Any) -> None:
    answer = httpx.post(f"{stack.sandbox_url}/sandbox/other-channel", json=body, timeout=5)
    assert answer.status_code == 200, answer.text


def eventually(check: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        time.sleep(0.2)


def recorded() -> int:
    with session_scope(runtime.engine()) as session:
        return int(session.exec(select(func.count()).select_from(ExternalFailure)).one())


def failures() -> int:
    return runtime.guard().account_snapshot().failures_in_window


def test_other_channel_failures_reduce_the_headroom_once_each(stack: Stack) -> None:
    # Given 30 failed prompts the merchant sent from UpesiPay's dashboard
    other_channel(stack, count=30, outcome="timeout")
    # When beat reads the list, Then the guard counts them, and the headroom shrinks by as much
    eventually(lambda: failures() == 30, "30 other-channel failures counted")
    assert runtime.guard().account_snapshot().headroom == 50 - 30
    assert recorded() == 30
    with session_scope(runtime.engine()) as session:
        untold = session.exec(
            select(func.count())
            .select_from(ExternalFailure)
            .where(col(ExternalFailure.guard_told_at).is_(None))
        ).one()
    assert untold == 0
    # And reading the same list again and again counts nothing twice
    time.sleep(3)
    assert failures() == 30 and recorded() == 30

    # Given one of our own prompts that the customer cancels: the guard counts it through its send...
    handle = enqueue_payment(amount=10, phone_number=CANCELLING, external_reference="OC-OURS-1")
    assert wait_for_state(handle.id).state == PaymentState.CANCELLED
    eventually(lambda: failures() == 31, "our cancelled prompt counted once")
    # ...and the list, which shows it FAILED too, does not count it again
    time.sleep(3)
    assert failures() == 31 and recorded() == 30

    # The dashboard and /metrics say how many came from elsewhere
    data = httpx.get(f"{stack.web_url}/dashboard/data", timeout=5).json()
    assert data["other_channels"]["failures_in_window"] == 30 and data["other_channels"]["readable"] is True
    metrics = httpx.get(f"{stack.web_url}/metrics", timeout=5).text
    assert "stkpush_other_channel_failures_in_window 30.0" in metrics
    assert "stkpush_transactions_list_readable 1.0" in metrics


def test_a_failure_recorded_but_not_confirmed_by_the_guard_is_told_once(stack: Stack) -> None:
    # Given a failure the ledger recorded while the guard's write was lost (the row says: not confirmed)
    before = failures()
    with runtime.engine().begin() as connection:
        connection.execute(
            ExternalFailure.__table__.insert().values(  # type: ignore[attr-defined]
                account=runtime.settings().upesipay_account,
                provider_reference="LOSTWRITE1",
                failed_at=other_channels.utcnow(),
                seen_at=other_channels.utcnow(),
                guard_told_at=None,
            )
        )
    # When the owed failures are told, twice (a retry after a crash), Then it is counted exactly once
    assert other_channels.tell_guard_owed() == 1
    assert other_channels.tell_guard_owed() == 0
    assert failures() == before + 1


def test_an_unreadable_list_is_said_and_counts_nothing(stack: Stack) -> None:
    set_scenario(stack, {**SCENARIO, "faults": {"error_5xx_rate": 1.0, "endpoints": ["transactions"]}})
    try:
        before = failures()
        other_channel(stack, count=2)

        def unreadable() -> bool:
            reading = other_channels.last_reading(runtime.settings().upesipay_account)
            return reading is not None and reading["readable"] is False

        eventually(unreadable, "the list reported unreadable")
        assert failures() == before
        metrics = httpx.get(f"{stack.web_url}/metrics", timeout=5).text
        assert "stkpush_transactions_list_readable 0.0" in metrics
        data = httpx.get(f"{stack.web_url}/dashboard/data", timeout=5).json()
        assert data["other_channels"]["readable"] is False and "HTTP 50" in data["other_channels"]["problem"]
    finally:
        set_scenario(stack, SCENARIO)
    # Once the list reads again, the two are counted
    eventually(lambda: failures() == before + 2, "the two failures counted once the list reads again")
