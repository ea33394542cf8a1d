"""The guard kept true to the ledger over real parts: Redis killed and started again empty, Redis paused past the
client timeout during a burst of callbacks, a worker SIGKILLed between the ledger write and the resolve.

Each stack here has a Redis of its own (an embedded redis-server it can stop, start again on the same port, or
freeze with SIGSTOP), real `celery worker` and `beat` processes, the sandbox and the web app over HTTP. The
sandbox enforces UpesiPay's abuse rules on its side, so `rule_triggers_total == 0` proves the guard never let
one trigger; `inflight_max_per_phone == 1` proves no number got a second prompt while one was open.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producers import enqueue_payment
from tests import support
from tests.support import pushes_for, set_scenario, wait_for_state
from worker import runtime
from worker.guard import GuardUnavailable, recovery
from worker.ledger import TERMINAL_STATES, PaymentState, get_payment
from worker.local.stack import Stack

FAST = {
    "UPESIPAY_READ_TIMEOUT_S": "2",
    "SETTLE_AFTER_S": "30",
    "SETTLE_UNKNOWN_AFTER_S": "2",
    "STUCK_SENDING_AFTER_S": "4",
    "REQUEUE_AFTER_S": "4",
    "DISPATCH_INTERVAL_S": "0.5",
    "SETTLE_POLL_S": "1",
}
DISPATCH_INTERVAL_S = 0.5
FAILING = [f"07001{n:05d}" for n in range(60)]  # cancelled by the customer, every time
GOOD = [f"07002{n:05d}" for n in range(10)]  # pay, every time


def scenario(callback_delay_s: float = 0.2) -> dict[str, Any]:
    return {
        "seed": 3,
        "callback_delay_s": callback_delay_s,
        "default": "success",
        "phones": {phone: "cancelled" for phone in FAILING},
    }


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack with a Redis of its own: these tests kill and freeze it."""
    running = Stack(scenario=json.dumps(scenario()), extra_env=dict(FAST), log_to=tmp_path / "stack")
    try:
        running.start()
        running.activate()
        yield running
    finally:
        running.deactivate()
        running.stop()


def pay(phone: str) -> str:
    return enqueue_payment(amount=10, phone_number=phone, external_reference=support.new_reference("GRD")).id


def wait_all(
    ids: list[str], states: frozenset[PaymentState] = TERMINAL_STATES, timeout_s: float = 60
) -> None:
    for payment_id in ids:
        wait_for_state(payment_id, states, timeout_s)


def guard_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "guard", *args],
        env=stack.child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def verify_soon(stack: Stack, within_s: float) -> subprocess.CompletedProcess[str]:
    """`stkpush guard verify` until it exits 0 (beat reconciles meanwhile), failing with its last answer."""
    deadline = time.monotonic() + within_s
    while True:
        answer = guard_cli(stack, "verify")
        if answer.returncode == 0 or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def ledger_headroom(stack: Stack) -> int:
    """The budget the ledger implies: the limit less failures in the window and attempts in flight."""
    from worker.guard_ledger import implied_image

    guard = runtime.guard()
    now_ms = round(time.time() * 1000)
    image = implied_image(runtime.engine(), stack.account, guard.limits, now_ms).image
    return max(guard.limits.account_failure_limit - len(image.failures) - len(image.reservations), 0)


def assert_provider_never_tripped(stack: Stack, references: list[str]) -> None:
    stats = stack.sandbox_stats()
    assert stats["rule_triggers_total"] == 0, stats["rule_triggers"]
    assert stats["inflight_max_per_phone"] == 1
    assert all(pushes_for(stack, reference) <= 1 for reference in references)


def references_of(ids: list[str]) -> list[str]:
    payments = [get_payment(runtime.engine(), payment_id) for payment_id in ids]
    return [payment.external_reference for payment in payments if payment is not None]


@pytest.mark.slow
def test_redis_restarted_empty_is_rebuilt_from_the_ledger_and_no_rule_triggers(stack: Stack) -> None:
    # Given 45 failures in the window
    failed = [pay(phone) for phone in FAILING[:45]]
    wait_all(failed)
    assert runtime.guard().account_snapshot().failures_in_window == 45
    # and three sends in flight whose callbacks come late (one of them will fail)
    set_scenario(stack, scenario(callback_delay_s=6))
    in_flight = [pay(FAILING[45]), pay(GOOD[0]), pay(GOOD[1])]
    wait_all(in_flight, frozenset({PaymentState.AWAITING_CALLBACK}), timeout_s=30)
    set_scenario(stack, scenario())
    # When Redis is killed and started again with nothing in it
    assert stack.embedded is not None
    stack.embedded.stop()
    stack.embedded.start()
    runtime.reset()
    # Then beat notices the marker is gone and rebuilds the guard from the ledger, within seconds
    deadline = time.monotonic() + 15
    while not rebuilt():
        assert time.monotonic() < deadline, "the guard was not rebuilt within 15 s"
        time.sleep(0.1)
    shown = json.loads(guard_cli(stack, "--json").stdout)["account"]
    assert shown["rebuilt"] and shown["failures_in_window"] >= 45  # not a guard starting from zero
    assert "rebuilt from the ledger" in stack.log_text("worker1")
    # And a good number is sent again once it is rebuilt
    good = pay(GOOD[2])
    assert wait_for_state(good, timeout_s=30).state == PaymentState.SUCCEEDED
    # And more failing numbers get only what the budget the provider still counts allows
    more = [pay(phone) for phone in FAILING[46:52]]
    wait_all(in_flight)
    deadline = time.monotonic() + 30
    while sum(wait_state(p) == PaymentState.CANCELLED for p in more) < 4:
        assert time.monotonic() < deadline, [wait_state(p) for p in more]
        time.sleep(0.2)
    time.sleep(2 * DISPATCH_INTERVAL_S)
    states = [wait_state(p) for p in more]
    assert states.count(PaymentState.CANCELLED) == 4 and states.count(PaymentState.DEFERRED) == 2, states
    assert runtime.guard().account_snapshot().failures_in_window == 50
    assert_provider_never_tripped(stack, references_of([*failed, *in_flight, good, *more]))
    answer = verify_soon(stack, within_s=DISPATCH_INTERVAL_S * 4)
    assert answer.returncode == 0, answer.stdout + answer.stderr


def rebuilt() -> bool:
    try:
        return recovery.has_state(runtime.guard())
    except GuardUnavailable:
        return False


def wait_state(payment_id: str) -> PaymentState | None:
    payment = get_payment(runtime.engine(), payment_id)
    return payment.state if payment is not None else None


@pytest.mark.slow
def test_redis_paused_past_the_client_timeout_during_callbacks_leaks_nothing(stack: Stack) -> None:
    # Given a burst of sends whose callbacks arrive in two seconds
    set_scenario(stack, scenario(callback_delay_s=2))
    ids = [pay(phone) for phone in [*FAILING[:6], *GOOD[:6]]]
    wait_all(ids, frozenset({PaymentState.AWAITING_CALLBACK, *TERMINAL_STATES}), timeout_s=30)
    # When Redis freezes for longer than the clients' 5 s socket timeout while the callbacks come in
    assert stack.embedded is not None and stack.embedded.process is not None
    os.kill(stack.embedded.process.pid, signal.SIGSTOP)
    try:
        time.sleep(7)
    finally:
        os.kill(stack.embedded.process.pid, signal.SIGCONT)
    # Then every payment ends, the ledger owes nothing within a dispatch interval or so, and the guard agrees
    wait_all(ids, timeout_s=60)
    answer = verify_soon(stack, within_s=DISPATCH_INTERVAL_S * 6)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    snapshot = runtime.guard().account_snapshot()
    assert snapshot.in_flight == 0 and snapshot.failures_in_window == 6
    assert snapshot.headroom == ledger_headroom(stack)
    assert_provider_never_tripped(stack, references_of(ids))


@pytest.mark.slow
def test_worker_killed_between_the_ledger_write_and_the_resolve_is_reconciled(
    stack: Stack, tmp_path: Path
) -> None:
    # Given a worker that dies right after the ledger ends an attempt, before the guard hears of it
    stack.stop_process("worker1")
    marker = tmp_path / "killed"
    stack.start_worker(
        "worker-doomed", overrides={"FAULT_KILL_AT": "before-resolve", "FAULT_MARKER_FILE": str(marker)}
    )
    # (the sandbox rejects this one with a 400: the worker records REJECTED, then would resolve a failure)
    set_scenario(stack, {**scenario(), "phones": {**scenario()["phones"], FAILING[0]: "reject"}})
    try:
        payment_id = pay(FAILING[0])
        rejected = wait_for_state(payment_id, timeout_s=30)
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert time.monotonic() < deadline, "the fail-point never fired"
            time.sleep(0.1)
    finally:
        stack.stop_process("worker-doomed")
        stack.start_worker("worker1")
    assert rejected.state == PaymentState.REJECTED
    # Then beat pays the owed resolve: the failure is counted once, the number is free again
    answer = verify_soon(stack, within_s=DISPATCH_INTERVAL_S * 6)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    snapshot = runtime.guard().account_snapshot()
    assert (snapshot.failures_in_window, snapshot.in_flight) == (1, 0)
    assert snapshot.headroom == ledger_headroom(stack)
    assert runtime.guard().phone_snapshot("254" + FAILING[0][1:]).in_flight == 0
