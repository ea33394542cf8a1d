"""Issue 11 over real parts (a `celery worker` and `beat`, the sandbox over HTTP, a real Redis): a number UpesiPay
blocked without saying until when is not probed again within the rule's 24 h, and a 60 s outage fails no payment.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, timedelta
from typing import Any

import httpx
import pytest

from producers import enqueue_payment
from tests.support import pushes_for, running_stack, wait_for_state
from worker import runtime
from worker.attempts import attempts_of
from worker.ledger import PaymentState, get_payment, utcnow
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack

CALM: dict[str, Any] = {"seed": 11, "callback_delay_s": 0.1, "default": "success"}
FAST = {"DISPATCH_INTERVAL_S": "0.5", "SETTLE_AFTER_S": "3", "SETTLE_POLL_S": "1", "REQUEUE_AFTER_S": "3"}
DAY_S = 24 * 3600


def new_phone() -> str:
    return "07" + str(secrets.randbelow(10**8)).zfill(8)


def refused(stack: Stack, kind: str) -> int:
    counts: Any = stack.sandbox_stats()["requests_refused"]
    return int(counts.get(kind, 0))


def test_a_number_blocked_without_retry_after_is_sent_to_at_most_once_in_24_hours(
    redis_server: EmbeddedRedis,
) -> None:
    scenario = {
        **CALM,
        "abuse_answer": "bare",
    }  # no Retry-After, no "until": only the rule's duration is known
    with running_stack(redis_server, 16, scenario=scenario, extra_env=FAST) as stack:
        phone = new_phone()
        # Given a number UpesiPay blocked (11 failures from another channel), answering without an end
        answer = httpx.post(
            f"{stack.sandbox_url}/sandbox/other-channel", json={"count": 11, "phone": phone}, timeout=5
        )
        assert answer.status_code == 200 and answer.json()["rule_triggers"] == 1, answer.text
        # When two payments to it are made
        first = enqueue_payment(amount=10, phone_number=phone, external_reference="BLK-1", expires_in=None)
        wait_for_state(first.id, frozenset({PaymentState.DEFERRED}), timeout_s=20)
        second = enqueue_payment(amount=10, phone_number=phone, external_reference="BLK-2", expires_in=None)
        # Then over many dispatcher ticks UpesiPay is asked once, and the sandbox's block running out on its
        # clock changes nothing: our own wait is the rule's 24 h
        time.sleep(4)
        httpx.post(f"{stack.sandbox_url}/sandbox/clock/advance", json={"seconds": DAY_S + 1}, timeout=5)
        time.sleep(4)
        assert refused(stack, "blocked") == 1
        assert pushes_for(stack, "BLK-1") == 0 and pushes_for(stack, "BLK-2") == 0
        for payment_id in (first.id, second.id):
            stored = get_payment(runtime.engine(), payment_id)
            assert stored is not None and stored.state == PaymentState.DEFERRED
            assert stored.next_attempt_at is not None
            due = stored.next_attempt_at.replace(tzinfo=stored.next_attempt_at.tzinfo or UTC)
            assert due - utcnow() >= timedelta(seconds=DAY_S - 120), stored.reason
        snapshot = runtime.guard().phone_snapshot(f"254{phone[1:]}")
        assert snapshot.blocked_until is not None and snapshot.blocked_until - time.time() >= DAY_S - 120


@pytest.mark.slow
def test_a_60_second_outage_fails_no_payment_and_each_is_sent_once_after(redis_server: EmbeddedRedis) -> None:
    # Backoff capped at 10 s so the test sees the end of the outage soon; the budget is the default (3 h)
    env = {**FAST, "SEND_BACKOFF_CAP_S": "10"}
    with running_stack(redis_server, 17, scenario=CALM, extra_env=env) as stack:
        # Given UpesiPay unreachable (connection refused)
        stack.stop_process("sandbox")
        references = [f"OUT-{index}" for index in range(8)]
        ids = [
            enqueue_payment(amount=10, phone_number=new_phone(), external_reference=ref, expires_in=None).id
            for ref in references
        ]
        # When the outage lasts 60 s
        time.sleep(60)
        during = [get_payment(runtime.engine(), payment_id) for payment_id in ids]
        assert all(p is not None and p.state != PaymentState.FAILED for p in during)
        assert all(p is not None and p.attempts >= 3 for p in during)  # they did keep trying
        stack._start_sandbox()
        # Then every payment is sent once it is over, none FAILED, each prompted once
        for payment_id in ids:
            assert wait_for_state(payment_id, timeout_s=60).state == PaymentState.SUCCEEDED
        assert [pushes_for(stack, ref) for ref in references] == [1] * len(references)


def test_result_1001_is_retried_as_new_attempts_then_fails(redis_server: EmbeddedRedis) -> None:
    phone = new_phone()
    scenario = {**CALM, "phones": {phone: "in_progress"}}
    env = {**FAST, "IN_PROGRESS_RETRY_S": "1", "IN_PROGRESS_RETRIES": "3"}
    with running_stack(redis_server, 18, scenario=scenario, extra_env=env) as stack:
        payment = enqueue_payment(amount=10, phone_number=phone, external_reference="BUSY-1", expires_in=None)
        stored = wait_for_state(payment.id, timeout_s=60)
        # Then it was prompted 4 times (the first and 3 retries), each a failure for the guard, then FAILED
        assert stored.state == PaymentState.FAILED and stored.result_code == 1001
        assert pushes_for(stack, "BUSY-1") == 4
        assert len(attempts_of(runtime.engine(), payment.id)) == 4
        assert runtime.guard().phone_snapshot(f"254{phone[1:]}").streak == 4
        assert int(stack.sandbox_stats()["inflight_max_per_phone"]) <= 1  # type: ignore[call-overload]


@pytest.mark.slow
def test_with_a_30_second_list_lag_and_10_percent_ambiguous_sends_no_reference_is_pushed_twice(
    redis_server: EmbeddedRedis,
) -> None:
    # The looser reading (the list trusted) is the one that could go wrong: the evidence rule must still wait
    # out a list that lags. The sandbox hides every push from its list for 30 s; a tenth of sends answer a 5xx
    # (half after recording the push, half before).
    scenario = {
        **CALM,
        "seed": 21,
        "list_lag_s": 30,
        "faults": {"error_5xx_rate": 0.1, "endpoints": ["payments"]},
    }
    env = {
        **FAST,
        "SETTLE_UNKNOWN_AFTER_S": "2",
        "UNKNOWN_RESEND_ON_LIST_ABSENCE": "true",
        "PROMPT_LIFETIME_S": "35",
        "UNKNOWN_LOOKUP_SPACING_S": "5",
    }
    with running_stack(redis_server, 19, scenario=scenario, extra_env=env) as stack:
        references = [f"LAG-{index}" for index in range(40)]
        ids = [
            enqueue_payment(amount=10, phone_number=new_phone(), external_reference=ref, expires_in=None).id
            for ref in references
        ]
        settled = [wait_for_state(payment_id, timeout_s=120) for payment_id in ids]
        faults: Any = stack.sandbox_stats()["faults"]
        recorded, unrecorded = (
            faults.get("error_500", 0),
            faults.get("error_502", 0) + faults.get("error_503", 0),
        )
        assert recorded >= 1 and unrecorded >= 1, faults  # both kinds of ambiguous send happened
        by_reference: Any = stack.sandbox_stats()["pushes_by_reference"]
        assert sum(1 for count in by_reference.values() if count > 1) == 0
        assert all(payment.state == PaymentState.SUCCEEDED for payment in settled)
        assert [pushes_for(stack, ref) for ref in references] == [1] * len(references)
