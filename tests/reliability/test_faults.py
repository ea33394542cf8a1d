"""Each way a payment can go wrong, over real parts: a real Redis, real `celery worker` and `beat` processes, the
sandbox over HTTP with faults switched on for the test, callbacks over HTTP. Each ends correctly: the payment is
terminal, nothing is lost, and the customer is prompted once (the sandbox counts pushes per reference)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producers import enqueue_payment
from tests import support
from tests.support import callbacks_sent, pushes_for, running_stack, set_scenario, wait_for_state
from worker import runtime
from worker.ledger import TERMINAL_STATES, Payment, PaymentState, get_payment
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack

CALM: dict[str, Any] = {"seed": 5, "callback_delay_s": 0.1, "default": "success"}
# Short deadlines so each case settles in seconds; the rules are the production ones.
FAST = {
    "UPESIPAY_READ_TIMEOUT_S": "1.5",
    "SETTLE_AFTER_S": "3",
    "SETTLE_UNKNOWN_AFTER_S": "1",
    "STUCK_SENDING_AFTER_S": "3",
    "REQUEUE_AFTER_S": "3",
    "CREDENTIALS_PROBE_S": "2",
    "DISPATCH_INTERVAL_S": "0.5",
    "SETTLE_POLL_S": "1",
    # The sandbox lists every push at once: absence from its list may license a resend, after a short lifetime.
    "UNKNOWN_RESEND_ON_LIST_ABSENCE": "true",
    "PROMPT_LIFETIME_S": "6",
    "UNKNOWN_LOOKUP_SPACING_S": "2",
}


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    with running_stack(redis_server, 2, scenario=CALM, extra_env=FAST) as running:
        yield running


@pytest.fixture(autouse=True)
def calm_sandbox(stack: Stack) -> Iterator[None]:
    yield
    set_scenario(stack, CALM)


def new_phone() -> str:
    return "07" + str(secrets.randbelow(10**8)).zfill(8)


def new_reference() -> str:
    return support.new_reference("REL")


def wait(
    payment_id: str, states: frozenset[PaymentState] = TERMINAL_STATES, timeout_s: float = 40
) -> Payment:
    return wait_for_state(payment_id, states, timeout_s)


def pay(phone: str | None = None) -> tuple[str, str]:
    handle = enqueue_payment(amount=25, phone_number=phone or new_phone(), external_reference=new_reference())
    return handle.id, handle.external_reference


def test_callback_lost_is_settled_by_transaction_status(stack: Stack) -> None:
    phone = new_phone()
    set_scenario(stack, {**CALM, "phones": {phone: {"outcome": "success", "drop": True}}})
    payment_id, reference = pay(phone)
    payment = wait(payment_id)
    assert payment.state == PaymentState.SUCCEEDED
    assert payment.result_desc == "settled by transaction-status" and payment.receipt
    assert pushes_for(stack, reference) == 1


def test_callback_duplicated_changes_the_payment_once(stack: Stack) -> None:
    phone = new_phone()
    set_scenario(stack, {**CALM, "phones": {phone: {"outcome": "cancelled", "duplicate": True}}})
    before = runtime.guard().account_snapshot().failures_in_window
    sent_before = callbacks_sent(stack)
    payment_id, reference = pay(phone)
    payment = wait(payment_id)
    assert payment.state == PaymentState.CANCELLED
    deadline = time.monotonic() + 10
    while callbacks_sent(stack) < sent_before + 2:
        assert time.monotonic() < deadline, "the second callback never arrived"
        time.sleep(0.2)
    after = get_payment(runtime.engine(), payment_id)
    assert after is not None and (after.state, after.updated_at) == (payment.state, payment.updated_at)
    assert runtime.guard().account_snapshot().failures_in_window == before + 1  # counted once
    assert pushes_for(stack, reference) == 1


def test_callback_late_after_settlement_changes_nothing(stack: Stack) -> None:
    phone = new_phone()
    set_scenario(stack, {**CALM, "late_delay_s": 6, "phones": {phone: {"outcome": "success", "late": True}}})
    payment_id, reference = pay(phone)
    settled = wait(payment_id)
    assert settled.state == PaymentState.SUCCEEDED and settled.result_desc == "settled by transaction-status"
    sent_at_settlement = callbacks_sent(stack)
    deadline = time.monotonic() + 15
    while callbacks_sent(stack) <= sent_at_settlement:
        assert time.monotonic() < deadline, "the late callback never arrived"
        time.sleep(0.2)
    after = get_payment(runtime.engine(), payment_id)
    assert after is not None and (after.state, after.updated_at) == (settled.state, settled.updated_at)
    assert pushes_for(stack, reference) == 1


@pytest.mark.parametrize(
    "faults",
    [
        {"hang_rate": 1.0, "hang_s": 4},
        {"error_5xx_rate": 1.0},
        {"reset_rate": 1.0},
    ],
    ids=["read-timeout-after-sending", "5xx", "connection-reset"],
)
def test_ambiguous_send_is_settled_and_never_prompts_twice(stack: Stack, faults: dict[str, Any]) -> None:
    # The customer answers after the worker has given up waiting, so the payment really is UNKNOWN for a while.
    set_scenario(stack, {**CALM, "callback_delay_s": 4, "faults": faults})
    payment_id, reference = pay()
    unknown = wait(payment_id, frozenset({PaymentState.UNKNOWN, *TERMINAL_STATES}), timeout_s=15)
    set_scenario(stack, CALM)
    payment = wait(payment_id)
    assert unknown.state == PaymentState.UNKNOWN
    assert payment.state == PaymentState.SUCCEEDED
    # 5xx before recording (502/503) leaves no trace: then, and only then, it is sent again.
    assert pushes_for(stack, reference) == 1


def test_429_honours_retry_after_and_uses_no_attempt(stack: Stack) -> None:
    set_scenario(stack, {**CALM, "faults": {"rate_limit_rate": 1.0, "retry_after_s": 3}})
    payment_id, reference = pay()
    deferred = wait(payment_id, frozenset({PaymentState.DEFERRED}), timeout_s=15)
    set_scenario(stack, CALM)
    assert deferred.next_attempt_at is not None
    wait_s = (deferred.next_attempt_at - deferred.updated_at).total_seconds()
    assert 2.5 <= wait_s <= 3.5 and deferred.attempts == 0
    payment = wait(payment_id)
    assert payment.state == PaymentState.SUCCEEDED and payment.attempts == 0
    assert payment.updated_at >= deferred.next_attempt_at
    assert pushes_for(stack, reference) == 1


def test_account_restricted_defers_everything_until_it_ends(stack: Stack) -> None:
    runtime.guard().restrict_account(3, "provider restriction (test)")
    first, second = pay(), pay()
    for payment_id, _ in (first, second):
        deferred = wait(payment_id, frozenset({PaymentState.DEFERRED}), timeout_s=10)
        assert deferred.reason == "guard: account_restricted"
    for payment_id, reference in (first, second):
        assert wait(payment_id).state == PaymentState.SUCCEEDED
        assert pushes_for(stack, reference) == 1


def test_credentials_refused_pause_sending_then_resume_once_fixed(stack: Stack) -> None:
    stack.stop_process("worker1")
    stack.start_worker("worker-badtoken", overrides={"UPESIPAY_AUTH_TOKEN": "wrong-token"})
    try:
        payment_id, reference = pay()
        deferred = wait(payment_id, frozenset({PaymentState.DEFERRED}), timeout_s=15)
        assert deferred.reason == "UpesiPay refused the credentials"
        assert "refused the credentials" in stack.log_text("worker-badtoken")
        assert "wrong-token" not in stack.log_text("worker-badtoken")
    finally:
        stack.stop_process("worker-badtoken")
        stack.start_worker("worker1")  # the operator fixes the token and restarts
    payment = wait(payment_id)
    assert payment.state == PaymentState.SUCCEEDED and payment.attempts == 0
    assert pushes_for(stack, reference) == 1


@pytest.mark.parametrize("point", ["after-claim", "after-send"])
def test_worker_killed_mid_send_prompts_once(stack: Stack, tmp_path: Path, point: str) -> None:
    stack.stop_process("worker1")
    marker = tmp_path / "killed"
    stack.start_worker("worker-doomed", overrides={"FAULT_KILL_AT": point, "FAULT_MARKER_FILE": str(marker)})
    try:
        payment_id, reference = pay()
        payment = wait(payment_id, timeout_s=60)
        assert marker.exists(), "the fail-point never fired"
        assert "fail-point" in stack.log_text("worker-doomed")
    finally:
        stack.stop_process("worker-doomed")
        stack.start_worker("worker1")
    assert payment.state == PaymentState.SUCCEEDED
    assert pushes_for(stack, reference) == 1


def test_message_lost_from_redis_is_queued_again(stack: Stack) -> None:
    stack.stop_process("worker1")
    try:
        payment_id, reference = pay()
        client = runtime.redis_client()
        queue_key = f"{stack.key_prefix}single"
        assert client.llen(queue_key) >= 1
        client.delete(queue_key)  # Redis lost the message (a restart without persistence, say)
    finally:
        stack.start_worker("worker1")
    payment = wait(payment_id)
    assert payment.state == PaymentState.SUCCEEDED
    assert pushes_for(stack, reference) == 1
