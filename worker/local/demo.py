"""`stkpush demo`: the whole pipeline on this machine, with a sample of payments whose outcomes are known."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.ledger import TERMINAL_STATES, Payment, PaymentState, count_by_state, session_scope
from worker.local.stack import Stack
from worker.phones import mask_phone, normalise_phone


class DemoEnvironment(BaseSettings):
    """The demo reads one thing from the environment: a Redis to use (under a private prefix) if it answers."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")
    redis_url: str = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class SamplePhone:
    phone: str
    outcome: str  # the sandbox scenario's outcome name for this number
    expected: PaymentState


# One number per outcome, so the table shows each way a payment can end.
SAMPLE_PHONES = (
    SamplePhone("0700000101", "success", PaymentState.SUCCEEDED),
    SamplePhone("0700000102", "success", PaymentState.SUCCEEDED),
    SamplePhone("0700000103", "cancelled", PaymentState.CANCELLED),
    SamplePhone("0700000104", "insufficient", PaymentState.FAILED),
    SamplePhone("0700000105", "wrong_pin", PaymentState.FAILED),
    SamplePhone("0700000106", "timeout", PaymentState.FAILED),
    SamplePhone("0700000107", "no_callback", PaymentState.FAILED),  # settled by transaction-status
    SamplePhone("0700000108", "reject", PaymentState.REJECTED),
    SamplePhone("0700000109", "success", PaymentState.SUCCEEDED),
)


def mixed_scenario(seed: int = 7) -> dict[str, Any]:
    phones = {normalise_phone(sample.phone): {"outcome": sample.outcome} for sample in SAMPLE_PHONES}
    return {"seed": seed, "callback_delay_s": 0.3, "default": "success", "phones": phones}


def faults_scenario(seed: int = 7) -> dict[str, Any]:
    """DESIGN's hard cases at once: 20% of callbacks dropped, 10% duplicated, 10% of sends time out after
    UpesiPay recorded them, 5% answered with a 5xx; a few customers cancel (well inside the failure budget)."""
    return {
        "seed": seed,
        "callback_delay_s": 0.3,
        "default": {"outcomes": {"success": 0.96, "cancelled": 0.04}, "drop": 0.2, "duplicate": 0.1},
        "faults": {"hang_rate": 0.1, "hang_s": 4, "error_5xx_rate": 0.05},
    }


SCENARIOS = {"mixed": mixed_scenario, "faults": faults_scenario}
# The sandbox lists every push at once (list_lag_s 0), so the demo may trust absence from its transactions list
# after a short prompt lifetime; against UpesiPay the defaults keep such a payment UNKNOWN (worker/ambiguous.py).
SANDBOX_EVIDENCE_ENV = {
    "UNKNOWN_RESEND_ON_LIST_ABSENCE": "true",
    "PROMPT_LIFETIME_S": "10",
    "UNKNOWN_LOOKUP_SPACING_S": "3",
}


def sample_phone(scenario: str, index: int) -> str:
    if scenario == "mixed":
        return SAMPLE_PHONES[index % len(SAMPLE_PHONES)].phone
    return f"0711{index:06d}"  # one number per payment: the faults run is about the provider, not the streaks


def _rows(stack: Stack) -> list[Payment]:
    from worker import runtime

    with session_scope(runtime.engine()) as session:
        from sqlmodel import col, select

        return list(session.exec(select(Payment).order_by(col(Payment.created_at))).all())


def push_counts(stack: Stack, rows: list[Payment]) -> dict[str, int]:
    """How many pushes UpesiPay (the sandbox) holds per reference, summarised against the ledger."""
    by_reference: dict[str, int] = stack.sandbox_stats()["pushes_by_reference"]  # type: ignore[assignment]
    # UpesiPay accepted a push if it gave us a reference (201 or transaction lookup) or a callback named it.
    accepted = [row for row in rows if row.provider_reference or row.checkout_request_id]
    return {
        "references_pushed": len(by_reference),
        "references_pushed_more_than_once": sum(1 for count in by_reference.values() if count > 1),
        "accepted_payments": len(accepted),
        "accepted_payments_with_exactly_one_push": sum(
            1 for row in accepted if by_reference.get(row.external_reference, 0) == 1
        ),
    }


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(143)


def run_demo(
    *,
    payments: int,
    timeout_s: float,
    echo: Callable[[str], Any] | None,
    scenario: str = "mixed",
    workers: int = 1,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    say = echo or (lambda _text: None)
    # SIGTERM (a timeout, an impatient parent) unwinds like Ctrl-C, so the stack below stops what it started.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = time.monotonic()
    environment = DemoEnvironment()
    scenario_json = json.dumps(SCENARIOS[scenario]())
    with Stack(
        redis_url=environment.redis_url,
        scenario=scenario_json,
        workers=workers,
        log_to=log_dir,
        extra_env=dict(SANDBOX_EVIDENCE_ENV),
    ) as stack:
        say(
            f"stack up in {time.monotonic() - started:.1f}s: sandbox {stack.sandbox_url}, web {stack.web_url}, "
            f"redis {'embedded' if stack.embedded else 'shared (private key prefix)'}"
        )
        stack.activate()
        from producers import enqueue_payment
        from worker import runtime

        for index in range(payments):
            enqueue_payment(
                amount=10 + index % 1000,
                phone_number=sample_phone(scenario, index),
                external_reference=f"DEMO-{index + 1:04d}",
            )
        say(f"enqueued {payments} payments; waiting for them to settle ...")
        deadline = time.monotonic() + timeout_s
        counts = count_by_state(runtime.engine())
        while time.monotonic() < deadline:
            counts = count_by_state(runtime.engine())
            if sum(counts[state.value] for state in TERMINAL_STATES) >= payments:
                break
            time.sleep(0.5)
        rows = _rows(stack)
        stats = stack.sandbox_stats()
        account = runtime.guard().account_snapshot()
        summary: dict[str, Any] = {
            "scenario": scenario,
            "payments": payments,
            "pushes": push_counts(stack, rows),
            "rule_triggers_total": stats.get("rule_triggers_total"),
            "counts": {state: count for state, count in counts.items() if count},
            "all_settled": sum(counts[state.value] for state in TERMINAL_STATES) >= payments,
            "sandbox": stats,
            "guard": {
                "failures_in_window": account.failures_in_window,
                "in_flight": account.in_flight,
                "headroom": account.headroom,
                "restricted_until": account.restricted_until,
            },
            "elapsed_s": round(time.monotonic() - started, 2),
        }
        say("")
        say(f"{'reference':<12} {'phone':<13} {'amount':>6}  {'state':<18} detail")
        for row in rows[:40]:
            detail = row.receipt or row.reason or ""
            say(
                f"{row.external_reference:<12} {mask_phone(row.phone):<13} {row.amount:>6}  {row.state.value:<18} "
                f"{detail[:60]}"
            )
        say("")
        say("by state: " + ", ".join(f"{state} {count}" for state, count in summary["counts"].items()))
        say(
            f"sandbox: {stats.get('pushes_total')} pushes, abuse-rule triggers {stats.get('rule_triggers_total')}"
        )
        say(
            f"guard: {account.failures_in_window} failures in the window, {account.in_flight} in flight, "
            f"headroom {account.headroom}"
        )
    say(f"elapsed {summary['elapsed_s']}s; everything stopped")
    return summary
