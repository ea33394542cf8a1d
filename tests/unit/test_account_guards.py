"""Each account's guard on the suite's private Redis, derived from the ledger on its own: a failure of one account
fills that account's window only, a rebuild or a verify of one account reads that account's attempts only, and an
owed resolve reaches the attempt's own account's guard."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import account_ledger
from worker import reconcile, runtime
from worker.accounts import add_account
from worker.attempts import claim_for_send, end_attempt
from worker.guard import Lane, recovery
from worker.ledger import AttemptOutcome, Payment, PaymentState, session_scope


@pytest.fixture(autouse=True)
def ledger(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for _ in account_ledger(tmp_path, monkeypatch, REDIS_URL=redis_url):
        add_account(runtime.engine(), runtime.settings(), "acme", [7001], "tok_acme_value")
        yield


def failed_send(account: str, reference: str, phone: str) -> str:
    """A payment of `account` admitted by its guard, then failed in the ledger (the guard not told yet)."""
    row = Payment(account=account, external_reference=reference, phone=phone, amount=10, channel_id=7001)
    with session_scope(runtime.engine()) as session:
        session.add(row)
        session.commit()
    token = f"{row.id}.0001"
    assert claim_for_send(runtime.engine(), row.id, token)
    assert reconcile.admit(phone, token, Lane.INTERACTIVE, account).admitted
    ended = end_attempt(
        runtime.engine(),
        token,
        AttemptOutcome.FAILURE,
        payment_from=[PaymentState.SENDING],
        payment_to=PaymentState.FAILED,
    )
    assert ended.attempt_ended
    return token


def test_an_owed_resolve_is_paid_to_the_attempts_own_account() -> None:
    failed_send("acme", "R1", "254712000001")
    assert runtime.guard("acme").account_snapshot().in_flight == 1
    reconcile.keep_guard()  # beat's tick walks every account
    acme, env = runtime.guard("acme").account_snapshot(), runtime.guard().account_snapshot()
    assert (acme.in_flight, acme.failures_in_window) == (0, 1)
    assert (env.in_flight, env.failures_in_window) == (0, 0)


def test_a_rebuild_and_a_verify_of_one_account_read_its_attempts_only() -> None:
    token = failed_send("acme", "R1", "254712000001")
    reconcile.tell_guard(token, AttemptOutcome.FAILURE)  # account read from the attempt
    failed_send("acct-env", "R2", "254712000002")
    reconcile.pay_owed()  # the environment's
    recovery.forget(runtime.guard("acme"))
    assert reconcile.rebuild_guard(account="acme")
    assert runtime.guard("acme").account_snapshot().failures_in_window == 1
    assert runtime.guard().account_snapshot().failures_in_window == 1
    assert reconcile.verify_guard(account="acme").count == 0
    assert reconcile.verify_guard().count == 0
    assert reconcile.last_drift("acme") == 0


def test_beat_passes_touch_only_accounts_with_work() -> None:
    from worker import dispatch

    for index in range(5):
        add_account(runtime.engine(), runtime.settings(), f"idle-{index}", [7001], "tok_idle_value")
    failed_send("acme", "R1", "254712000001")
    assert reconcile._accounts_owed(runtime.accounts()) == ["acme"]
    assert reconcile.accounts_to_verify() == ["acct-env", "acme"]
    assert dispatch._accounts_with_due_rows() == []
