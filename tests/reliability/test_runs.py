"""Whole runs of hundreds of payments through several `celery worker` processes against the sandbox, which
enforces UpesiPay's abuse rules on its side: the guard must never let one trigger, and nothing may be lost."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from typing import Any

import pytest
from sqlmodel import col, select

from producers import enqueue_payment
from worker import runtime
from worker.ledger import TERMINAL_STATES, Payment, PaymentState, count_by_state, session_scope
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack

pytestmark = pytest.mark.slow

UNSETTLED = (PaymentState.PENDING, PaymentState.SENDING, PaymentState.AWAITING_CALLBACK, PaymentState.UNKNOWN)

CANCELLING = [f"07220000{i:02d}" for i in range(1, 6)]  # always cancel
SILENT = [f"07220000{i:02d}" for i in range(11, 16)]  # never answer: no callback, FAILED at the provider


def hostile_scenario() -> dict[str, Any]:
    phones: dict[str, Any] = {phone: "cancelled" for phone in CANCELLING}
    phones.update({phone: "no_callback" for phone in SILENT})
    # 75 cancelling + 50 silent + 31.4% of 175 others = 60% of 300 payments fail
    others = {"success": 0.686, "insufficient": 0.11, "wrong_pin": 0.1, "timeout": 0.104}
    return {"seed": 3, "callback_delay_s": 0.2, "default": {"outcomes": others}, "phones": phones}


def wait_until_settled(timeout_s: float) -> dict[str, int]:
    """Until no payment is on its way (only terminal or DEFERRED) for 3 s in a row."""
    deadline = time.monotonic() + timeout_s
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        counts = count_by_state(runtime.engine())
        if sum(counts[state.value] for state in UNSETTLED) == 0:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 3:
                return counts
        else:
            quiet_since = None
        time.sleep(0.25)
    raise AssertionError(f"still unsettled after {timeout_s}s: {count_by_state(runtime.engine())}")


def test_guard_keeps_a_hostile_batch_inside_the_abuse_rules(redis_server: EmbeddedRedis) -> None:
    payments: list[str] = CANCELLING * 15 + SILENT * 10 + [f"0733{i:06d}" for i in range(175)]
    random.Random(9).shuffle(payments)
    with Stack(
        redis_url=redis_server.url.rsplit("/", 1)[0] + "/8",
        scenario=json.dumps(hostile_scenario()),
        workers=2,
        extra_env={"SETTLE_AFTER_S": "2", "SETTLE_POLL_S": "1"},
    ) as stack:
        stack.activate()
        for index, phone in enumerate(payments):
            enqueue_payment(amount=100, phone_number=phone, external_reference=f"HOSTILE-{index:04d}")
        counts = wait_until_settled(timeout_s=240)
        stats: Any = stack.sandbox_stats()
        guard = runtime.guard().account_snapshot()
        with session_scope(runtime.engine()) as session:
            deferred = session.exec(select(Payment).where(col(Payment.state) == PaymentState.DEFERRED)).all()
        stack.deactivate()

    # Nothing lost: every payment is terminal or waiting in the ledger with the guard's reason.
    assert sum(counts.values()) == len(payments)
    assert sum(counts[s.value] for s in TERMINAL_STATES) + counts["DEFERRED"] == len(payments)
    assert counts["DEFERRED"] > 0, "a 60% failure rate must exhaust the budget and defer the excess"
    assert all((row.reason or "").startswith("guard: ") for row in deferred)
    # The account stayed inside UpesiPay's rules, by the provider's own count.
    assert stats["rule_triggers_total"] == 0, stats["rule_triggers"]
    assert stats["blocked_numbers"] == [] and not any(stats["account_restricted_until"].values())
    failures = counts["FAILED"] + counts["CANCELLED"] + counts["REJECTED"]
    assert failures <= 50 and guard.failures_in_window <= 50
    assert max(stats["pushes_by_reference"].values()) == 1


@pytest.mark.timeout(360)
def test_faults_run_ends_terminal_with_one_push_per_accepted_payment(redis_server: EmbeddedRedis) -> None:
    """`stkpush demo --scenario faults`: 500 payments while the sandbox drops 20% of callbacks, duplicates 10%,
    times out 10% of sends and answers 5% with a 5xx."""
    env = {**os.environ, "REDIS_URL": redis_server.url.rsplit("/", 1)[0] + "/9"}
    # The demo stops its stack on SIGTERM; a SIGKILL on timeout would orphan the processes it started.
    demo = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "demo", "--scenario", "faults", "--payments", "500",
         "--workers", "2", "--json", "--timeout", "240"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        stdout, stderr = demo.communicate(timeout=270)
    except subprocess.TimeoutExpired:
        demo.terminate()
        stdout, stderr = demo.communicate(timeout=60)
    run = subprocess.CompletedProcess(demo.args, demo.returncode, stdout, stderr)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["all_settled"] is True
    assert sum(summary["counts"].get(state.value, 0) for state in TERMINAL_STATES) == 500
    assert summary["rule_triggers_total"] == 0
    pushes = summary["pushes"]
    assert pushes["references_pushed_more_than_once"] == 0
    assert pushes["accepted_payments"] >= 450
    assert pushes["accepted_payments_with_exactly_one_push"] == pushes["accepted_payments"]
    faults = summary["sandbox"]["faults"]
    assert faults["hang"] > 0 and faults["error_500"] + faults["error_502"] + faults["error_503"] > 0
